"""TrainJob with `distributed`: launched through pyspark's TorchDistributor on a real Spark local[2] (2 gloo ranks,
each a torchrun process started by a Spark barrier task); rank 0 logs and registers as the single-process job.

"Close to the single-process run": these runs use a deterministic loss (Multi-VAE without the sampling noise and
with input dropout 0; PIA on), because data-parallel ranks draw their own noise (tests/model/test_distributed.py
shows each step is the single-process step). What remains is float rounding: the ranks sum their weighted
gradients in another order than one process does, which changes weights by ~1e-7 relative per step; over the run's
25 Adam steps the test metrics must agree to 1e-3 (absolute, NDCG/recall in [0, 1]).

A rank's failure reaches the driver as a value, not an exception: pyspark 4.3's torch_run_process_wrapper exits 0
whatever torchrun returns (pipeline/training/distributed.py, `_on_rank`).
"""

from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.distributed import DistributedConfig, WorkerFailed, _root_cause, check, launch_failure, rank_failure
from pipeline.training.train_job import TrainJob, train_distributed

from .conftest import NAME, TINY_VAE, aliases, tiny

DETERMINISTIC = TINY_VAE.model_copy(update={"variational": False, "dropout": 0.0})
DDP = DistributedConfig(num_processes=2)


@pytest.mark.slow  # ~1-3 min on 2 loaded cores: Spark barrier tasks, torchrun and 2 interpreters importing torch
def test_ddp_job_registers_a_challenger_logs_world_size_and_matches_one_process(home, synth_snapshot: str, spark) -> None:
    single = tiny(synth_snapshot, vae=DETERMINISTIC, baselines=False).run()
    ddp = tiny(synth_snapshot, vae=DETERMINISTIC, baselines=False, distributed=DDP).run()
    assert ddp.model_name == NAME and ddp.version != single.version
    assert aliases() == {"challenger": ddp.version}  # the newest version is the challenger; champion untouched
    c = registry.client()
    run = c.get_run(ddp.run_id)
    assert run.data.params["world_size"] == "2" and run.data.params["ddp_backend"] == "gloo"
    assert run.data.params["distributed.num_processes"] == "2"
    assert "world_size" not in c.get_run(single.run_id).data.params  # the single-process run is as before
    assert [m.step for m in c.get_metric_history(ddp.run_id, "loss")] == [1, 2, 3, 4, 5]  # rank 0 logged once
    assert c.get_model_version(NAME, ddp.version).tags["run_id"] == ddp.run_id
    for k in ("test.ndcg_at_100", "test.recall_at_20", "test.recall_at_50", "best_epoch"):
        assert ddp.metrics[k] == pytest.approx(single.metrics[k], abs=1e-3), k
    assert ddp.metrics["test.ndcg_at_100"] > 0.05  # it learned something


@pytest.mark.slow
def test_a_rank_that_fails_fails_the_job_in_one_line_and_registers_nothing(home, synth_snapshot: str, spark) -> None:
    def fail_on_rank_1(record: dict) -> None:  # pickled by value into both ranks
        import torch.distributed as dist

        if dist.get_rank() == 1 and record["epoch"] == 2:
            raise OSError("disk full on worker 1")

    with pytest.raises(WorkerFailed) as e:
        train_distributed(tiny(synth_snapshot, baselines=False, distributed=DDP), on_epoch=fail_on_rank_1)
    msg = str(e.value)
    assert "\n" not in msg and "rank 1 of 2" in msg and "OSError: disk full on worker 1" in msg, msg
    assert not registry.client().search_model_versions(f"name='{NAME}'")  # nothing registered


def test_bad_distributed_settings_are_one_line_data_errors(synth_snapshot: str) -> None:
    import torch

    cases = [(DistributedConfig(num_processes=0), "num_processes to 1 or more"),
             (DistributedConfig(backend="nccl"), "use_gpu")]
    if not torch.cuda.is_available():
        cases.append((DistributedConfig(use_gpu=True), "use_gpu: false"))
    for cfg, fix in cases:
        with pytest.raises(DataError) as e:
            check(cfg)
        assert fix in e.value.fix and "\n" not in str(e.value)
    # the job refuses them before Spark starts or MLflow is touched (no `home`: nothing may be written)
    with pytest.raises(DataError, match="num_processes"):
        TrainJob(snapshot=synth_snapshot, distributed=DistributedConfig(num_processes=0)).run()
    with pytest.raises(DataError, match="cuda_graph"):
        TrainJob(snapshot=synth_snapshot, cuda_graph=True, distributed=DDP).run()


def test_the_root_cause_is_the_earliest_error_that_is_not_a_lost_peer() -> None:
    import torch.distributed as dist

    store = dist.HashStore()  # the in-process twin of torchrun's TCPStore
    cause = {"rank": 1, "world": 2, "type": "KeyError", "text": "user 7", "time": 10.0, "comm": False}
    peer_gone = {"rank": 0, "world": 2, "type": "DistBackendError", "text": "Connection closed by peer", "time": 11.0,
                 "comm": True}
    assert _root_cause(store, cause) == cause  # posted, and nothing else is known yet
    assert _root_cause(store, peer_gone) == cause  # rank 0 lost its peer: the cause is rank 1's error
    assert str(rank_failure(cause)) == "distributed training failed on rank 1 of 2: KeyError: user 7"
    lonely = _root_cause(dist.HashStore(), peer_gone, wait_s=0.3)  # no other report: its own, after the wait
    assert lonely == peer_gone
    data = rank_failure(cause | {"type": "DataError", "problem": "no GPU", "fix": "set use_gpu: false"})
    assert isinstance(data, DataError) and data.fix == "set use_gpu: false" and "rank 1 of 2: no GPU" in data.problem
    bare = launch_failure(RuntimeError("An error occurred while calling o53.collectToPython.\n"
                                       "org.apache.spark.SparkException: Job aborted due to stage failure\nat ..."))
    assert isinstance(bare, WorkerFailed) and "\n" not in str(bare) and "Job aborted due to stage failure" in str(bare)
