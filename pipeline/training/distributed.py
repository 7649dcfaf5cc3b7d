"""Data-parallel training launched with pyspark's TorchDistributor: one process per rank (one per GPU with
`use_gpu`), on the Spark executors as barrier tasks or, with `local_mode`, on the driver; torch DDP arithmetic
over gloo (CPU) or NCCL (GPU). The training code is model.train.Trainer's own data-parallel path.

`launch(config, fn, *args)` runs `fn(*args)` in every rank's process inside an initialised process group and
returns rank 0's result to the caller. TorchDistributor pickles the function and its arguments to each process
(so callers pass plain data: a job's JSON, not live objects) and brings back what the function returns; with
several ranks on one torchrun (local mode, or several GPUs per task) every rank writes that return value to the
same file, so `launch` hands rank 0's result to every rank first and they all return it.

A failure on any rank fails the launch with one line naming the rank and its root cause (not the "connection
closed by peer" of the ranks that lost it): see `_on_rank`. A rank's DataError stays a DataError.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import DataError
from pipeline.io.redact import redact_text

# What a local master's Python workers need from the driver's environment: they are children of the JVM and
# have its environment as it was when the JVM started (tracking store, lake endpoint, credentials). On a cluster
# the executors use their own environment (their role, spark.executorEnv.*), so nothing is shipped.
SHIPPED_ENV_PREFIXES = ("RECSYS_", "MLFLOW_", "AWS_")
RESULT_TIMEOUT = dt.timedelta(hours=24)  # ranks > 0 wait this long for rank 0's evaluation, logging and registration


class DistributedConfig(BaseModel):
    """How many training processes, where, on what. Checked at launch (`check`): a bad value is a DataError before
    Spark starts or anything is logged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_processes: int = Field(2, description="ranks: training processes (one per GPU with use_gpu); at least 1")
    use_gpu: bool = Field(False, description="one GPU per rank, NCCL; else CPU processes and gloo")
    local_mode: bool = Field(False, description="run the ranks on the driver (torchrun there) instead of as Spark "
                                                "barrier tasks on the executors")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with use_gpu, else gloo")
    spark_master: str = Field("local[2]", description="the Spark master the ranks are launched on")
    threads_per_process: int | None = Field(None, description="torch threads per rank; default: this machine's "
                                                              "cores / the ranks sharing it")

    @property
    def resolved_backend(self) -> str:
        return self.backend if self.backend != "auto" else ("nccl" if self.use_gpu else "gloo")

    @property
    def runs_on_this_machine(self) -> bool:
        """Whether the ranks run where this process runs (local mode, or a local master's executors)."""
        return self.local_mode or self.spark_master == "local" or self.spark_master.startswith("local[")


def check(cfg: DistributedConfig) -> None:
    """A DataError for a configuration that cannot launch, naming the fix."""
    if cfg.num_processes < 1:
        raise DataError(f"distributed.num_processes is {cfg.num_processes}: data-parallel training needs at least 1 "
                        "process", "set distributed.num_processes to 1 or more (one per GPU with use_gpu)")
    if cfg.threads_per_process is not None and cfg.threads_per_process < 1:
        raise DataError(f"distributed.threads_per_process is {cfg.threads_per_process}",
                        "set it to 1 or more, or leave it unset (cores / ranks)")
    if cfg.resolved_backend == "nccl" and not cfg.use_gpu:
        raise DataError("distributed.backend is nccl but use_gpu is false (NCCL reduces GPU tensors only)",
                        "set distributed.use_gpu: true, or backend: gloo / auto for CPU processes")
    if cfg.use_gpu and cfg.runs_on_this_machine:
        import torch

        if not torch.cuda.is_available():
            raise DataError("distributed.use_gpu is true but this machine has no CUDA device for the ranks",
                            "set distributed.use_gpu: false to train on CPU processes (gloo), or launch on a master "
                            "whose executors have GPUs")
        if cfg.num_processes > torch.cuda.device_count():
            raise DataError(f"distributed.num_processes is {cfg.num_processes} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s) (one rank per GPU)",
                            f"set distributed.num_processes to at most {torch.cuda.device_count()}")


class WorkerFailed(RuntimeError):
    """A rank (or the launch itself) failed; the message is one line naming the rank and its error."""


def world_params() -> dict[str, Any]:
    """What a run logs about its process group (world_size, ddp_backend); empty outside one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    return {"world_size": dist.get_world_size(), "ddp_backend": str(dist.get_backend())}


def launch(cfg: DistributedConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on `cfg.num_processes` ranks through TorchDistributor on `cfg.spark_master`; returns rank 0's
    return value. `fn` and `args` must pickle (cloudpickle: module-level functions by reference)."""
    check(cfg)
    from pyspark.ml.torch.distributor import TorchDistributor

    from pipeline.io.spark import spark_session

    spark_session(cfg.spark_master, "recsys-train-ddp")  # TorchDistributor uses the active session
    env = {k: v for k, v in os.environ.items() if k.startswith(SHIPPED_ENV_PREFIXES)} if cfg.runs_on_this_machine else {}
    try:  # it reads the session's GPU resources: a cluster without them is refused here
        distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=cfg.use_gpu)
    except RuntimeError as e:
        raise DataError(f"TorchDistributor cannot place {cfg.num_processes} GPU rank(s): {_line(str(e), 200)}",
                        "give the Spark session GPU resources (spark.executor.resource.gpu.amount and "
                        "spark.task.resource.gpu.amount=1, or the driver's with local_mode), or set use_gpu: false") from None
    try:
        out = distributor.run(_on_rank, cfg.model_dump_json(), env, fn, *args)
    except Exception as e:  # the launch itself failed (Spark, torchrun, a process killed): no rank's report
        raise launch_failure(e) from None
    if not isinstance(out, dict) or not ({"ok", "failed"} & out.keys()):
        raise WorkerFailed(f"distributed training returned no result ({type(out).__name__}); the workers' output is "
                           "in the driver's log")
    if "failed" in out:
        raise rank_failure(out["failed"])
    return out["ok"]


# -- inside each rank's process ----------------------------------------------------------------------------------

FAILED_KEY = "recsys/failed/"
COMM_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")


def _on_rank(cfg_json: str, env: dict[str, str], fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """One rank's process (started by torchrun): set up the process group, run `fn`, hand rank 0's result to all.

    Returns {"ok": result} (the same on every rank), or {"failed": report} naming the root cause. A failing rank
    posts its report to the process group's store before it lets go of its connections, so the ranks that fail
    only because a peer went away (a gloo/NCCL error) find the real cause there. Returning, not raising: pyspark
    4.3's torch_run_process_wrapper exits 0 whatever torchrun returns, so a raised error would reach the driver
    only as "TorchDistributor failed during training", without its cause."""
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    cfg = DistributedConfig.model_validate_json(cfg_json)
    rank = int(os.environ.get("RANK", "0"))
    store = None
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        sharing = cfg.num_processes if cfg.runs_on_this_machine else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.threads_per_process or max(1, (os.cpu_count() or 1) // sharing))
        if cfg.use_gpu:
            if not torch.cuda.is_available():
                raise DataError(f"rank {rank} has no CUDA device (use_gpu is true)",
                                "launch on executors with GPUs (spark.task.resource.gpu.amount), or set use_gpu: false")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(cfg.resolved_backend)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=dt.timedelta(seconds=60))  # torchrun's store: failure reports
        # rank 0's result goes to every rank over gloo with a long timeout: the others wait out its evaluation,
        # logging and registration, which can outlast the default group's timeout
        hand_over = dist.new_group(backend="gloo", timeout=RESULT_TIMEOUT)
        box = [fn(*args)]
        dist.broadcast_object_list(box, src=0, group=hand_over)
        return {"ok": box[0]}
    except Exception as e:
        report = {"rank": rank, "world": cfg.num_processes, "type": type(e).__name__, "text": _line(str(e)),
                  "time": time.time(), "comm": _is_comm_error(e)}
        if isinstance(e, DataError):
            report |= {"problem": e.problem, "fix": e.fix}
        print(f"rank {rank} failed: {report['type']}: {report['text']}", flush=True)  # the workers' log
        return {"failed": _root_cause(store, report)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _is_comm_error(e: BaseException) -> bool:
    """An error that says a peer went away (so the cause is on another rank)."""
    text = str(e)
    return type(e).__name__ in COMM_ERRORS or "Connection closed by peer" in text or "Connection reset" in text


def _root_cause(store: Any, mine: dict[str, Any], wait_s: float = 5.0) -> dict[str, Any]:
    """Post this rank's report, and return the earliest report that is not a communication error (waiting up to
    `wait_s` for one when this rank's own error is only that a peer went away)."""
    if store is None:
        return mine
    try:
        store.set(f"{FAILED_KEY}{mine['rank']}", json.dumps(mine))
        deadline = time.time() + (wait_s if mine["comm"] else 0.0)
        while True:
            keys = [f"{FAILED_KEY}{r}" for r in range(mine["world"]) if r != mine["rank"]]
            reports = [mine] + [json.loads(store.get(k)) for k in keys if store.check([k])]
            real = [r for r in reports if not r["comm"]]
            if real or time.time() >= deadline:
                return min(real or reports, key=lambda r: r["time"])
            time.sleep(0.2)
    except Exception:  # the store went away too: this rank's own report is all there is
        return mine


def _line(text: str, limit: int = 400) -> str:
    one = redact_text(" ".join(text.split()))
    return one if len(one) <= limit else one[: limit - 3] + "..."


def rank_failure(report: dict[str, Any]) -> Exception:
    """The one-line error for a rank's report (a rank's DataError stays a DataError, with its fix)."""
    where = f"distributed training failed on rank {report['rank']} of {report['world']}"
    if "problem" in report:
        return DataError(f"{where}: {report['problem']}", report["fix"])
    return WorkerFailed(f"{where}: {report['type']}: {report['text']}")


def launch_failure(e: BaseException) -> Exception:
    """The one-line error for a launch that failed outside the ranks' code."""
    text = str(e)
    cause = next((ln.strip() for ln in text.splitlines() if "Error:" in ln or "Exception:" in ln), None)
    first = cause or next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return WorkerFailed(f"distributed training could not run ({type(e).__name__}: {_line(first, 300)}); the "
                        "workers' output is in the driver's log")
