"""The triggers' polling without aiobotocore.

The provider's triggers poll through aiobotocore, and no aiobotocore release accepts the botocore this project
pins (aiobotocore 3.10 wants botocore < 1.43.118; the lock has 1.44.5). So the operators (operators.py) defer to the
provider's own triggers with one change: their hook's async client is the synchronous boto3 client, and each
single poll of the provider's waiter runs in a thread (`asyncio.to_thread`), so the triggerer's event loop never
blocks and a cancelled trigger leaves at most one request in flight. The waiting logic (attempts, delays, terminal
states, the EMR trigger's cancel-on-kill) is the provider's, unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

from airflow.providers.amazon.aws.hooks.emr import EmrServerlessHook
from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.triggers.emr import EmrServerlessStartApplicationTrigger, EmrServerlessStartJobTrigger
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger


class _SyncClientAsAsync:
    """`async with await hook.get_async_conn() as client` yielding the synchronous client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def __aenter__(self) -> Any:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None


class _ThreadedWaiter:
    """A botocore waiter whose `wait` is awaitable: one poll (MaxAttempts 1, as the provider asks) in a thread."""

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter

    async def wait(self, **kwargs: Any) -> None:
        await asyncio.to_thread(self.waiter.wait, **kwargs)


class _ThreadedPolling:
    async def get_async_conn(self) -> Any:
        return _SyncClientAsAsync(await asyncio.to_thread(lambda: self.conn))  # type: ignore[attr-defined]

    def get_waiter(self, waiter_name: str, parameters: dict[str, str] | None = None,
                   config_overrides: dict[str, Any] | None = None, deferrable: bool = False, client: Any = None) -> Any:
        waiter = super().get_waiter(waiter_name, parameters, config_overrides)  # type: ignore[misc]
        return _ThreadedWaiter(waiter) if deferrable else waiter


class ThreadedEmrServerlessHook(_ThreadedPolling, EmrServerlessHook):
    pass


class ThreadedSageMakerHook(_ThreadedPolling, SageMakerHook):
    pass


class EmrServerlessJobTrigger(EmrServerlessStartJobTrigger):
    aws_hook_class = ThreadedEmrServerlessHook


class EmrServerlessApplicationTrigger(EmrServerlessStartApplicationTrigger):
    aws_hook_class = ThreadedEmrServerlessHook


class SageMakerJobTrigger(SageMakerTrigger):
    def hook(self) -> ThreadedSageMakerHook:
        return ThreadedSageMakerHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, verify=self.verify,
                                     config=self.botocore_config)


_THREADED: dict[type, type] = {EmrServerlessStartJobTrigger: EmrServerlessJobTrigger,
             EmrServerlessStartApplicationTrigger: EmrServerlessApplicationTrigger, SageMakerTrigger: SageMakerJobTrigger}


def _threaded(trigger: Any) -> Any:
    """The same trigger (its serialized arguments) polling through `_ThreadedPolling`."""
    cls = _THREADED.get(type(trigger))
    return trigger if cls is None else cls(**trigger.serialize()[1])


class DeferThreaded:
    """Operator mixin: every trigger it defers to polls through `_ThreadedPolling`."""

    def defer(self, *, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None, timeout: Any = None) -> NoReturn:
        super().defer(trigger=_threaded(trigger), method_name=method_name, kwargs=kwargs, timeout=timeout)  # type: ignore[misc]
        raise AssertionError("defer() returned")  # pragma: no cover
