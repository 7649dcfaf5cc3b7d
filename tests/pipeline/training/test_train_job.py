"""recsys train: what one run logs to MLflow and registers; a failed or killed run registers nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io import registry
from pipeline.io.snapshot import load_snapshot, manifest_digest
from pipeline.training import DEFAULT_REGISTERED_NAME
from pipeline.training.evaluation import metric_key
from pipeline.training.train_job import TrainResult, load_config, train

from .conftest import NAME, aliases, cwd_has_mlruns, tiny

REPO = Path(__file__).resolve().parents[3]


def test_run_logs_params_curves_metrics_plots_input_and_registers_challenger(trained: dict[str, str],
                                                                            synth_snapshot: str) -> None:
    c = registry.client()
    r = c.get_run(trained["good_run"])
    assert r.data.params["vae.hidden_dims"] == "[32]" and r.data.params["pia.weight"] == "1.0"
    assert r.data.tags["snapshot_id"] == "snap-synth" and r.data.tags["git_commit"] and r.data.tags["device"] == "cpu"
    loss = c.get_metric_history(r.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 6))
    assert len(c.get_metric_history(r.info.run_id, "beta")) == 5
    assert len(c.get_metric_history(r.info.run_id, metric_key("val_ndcg@100"))) == 5
    assert len(c.get_metric_history(r.info.run_id, "compare.multivae.loss")) == 5  # the no-PIA base
    m = r.data.metrics
    for k in ("test.ndcg_at_100", "test.recall_at_20", "test.coverage_at_20", "test.mean_popularity_at_20",
              "test.group.11-50.ndcg_at_100", "baseline.popularity.ndcg_at_100", "baseline.ease.ndcg_at_100",
              "compare.multivae.test.ndcg_at_100", "train_seconds_total"):
        assert k in m, k
    arts = {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
    assert arts == {"plots/training_curves.png", "plots/latent_space.png"}
    assert r.inputs.dataset_inputs[0].dataset.name == "snapshot-snap-synth"
    v = c.get_model_version(NAME, trained["good"])
    assert v.tags["snapshot_id"] == "snap-synth" and v.tags["run_id"] == r.info.run_id
    assert float(v.tags["baseline.popularity.ndcg_at_100"]) > 0 and "test.ndcg_at_100" in v.tags
    assert v.tags["snapshot_digest"] == manifest_digest(load_snapshot(synth_snapshot).manifest)  # what the gate checks
    assert aliases() == {"challenger": trained["bad"]}  # training never sets champion
    assert not cwd_has_mlruns()


def test_yaml_config_merges_under_cli_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nvae: {hidden_dims: [16], latent_dim: 4}\ncompare_base: false\n")
    job = load_config(f, {"snapshot": "s", "epochs": 3, "device": None})
    assert job.epochs == 3 and job.vae.hidden_dims == (16,) and not job.compare_base and job.device == "auto"
    assert job.registered_name == DEFAULT_REGISTERED_NAME == "recsys-multivae-pia"
    with pytest.raises(ValueError, match="unknown model"):
        load_config(None, {"snapshot": "s", "model": "ease"})
    with pytest.raises(ValueError, match="extra"):
        load_config(None, {"snapshot": "s", "no_such_key": 1})
    with pytest.raises(ValueError, match="frozen"):
        job.epochs = 4  # type: ignore[misc]


def test_failure_midway_registers_nothing(trained: dict[str, str], synth_snapshot: str) -> None:
    c = registry.client()
    c.set_registered_model_alias(NAME, "champion", trained["good"])
    before = {v.version for v in c.search_model_versions(f"name='{NAME}'")}

    def boom(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt("stopped by the operator")

    with pytest.raises(KeyboardInterrupt):
        train(tiny(synth_snapshot, epochs=5), on_epoch=boom)
    assert {v.version for v in c.search_model_versions(f"name='{NAME}'")} == before
    assert aliases()["champion"] == trained["good"]


def test_killed_training_process_registers_nothing(trained: dict[str, str], synth_snapshot: str, tmp_path: Path) -> None:
    """SIGKILL after the first epoch line of a real `recsys train` process: no version, champion untouched."""
    c = registry.client()
    c.set_registered_model_alias(NAME, "champion", trained["good"])
    before = {v.version for v in c.search_model_versions(f"name='{NAME}'")}
    cfg = tmp_path / "long.yaml"
    cfg.write_text("epochs: 100000\npatience: null\nbatch_size: 100\ncompare_base: false\n"
                   "vae: {hidden_dims: [32], latent_dim: 8}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "train", "--snapshot", synth_snapshot, "--config",
                             str(cfg), "--device", "cpu", "--registered-name", NAME],
                            cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("model.epoch 1 "):
                break
            assert time.time() < deadline, "no epoch line"
        else:
            pytest.fail(f"train exited before its first epoch (rc {proc.wait()})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert {v.version for v in c.search_model_versions(f"name='{NAME}'")} == before
    assert aliases()["champion"] == trained["good"]


def test_tracking_credentials_reach_no_param_tag_bundle_or_log(home: Path, synth_snapshot: str,
                                                               monkeypatch: pytest.MonkeyPatch, capsys,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    secret_uri = "https://alice:s3cret@mlflow.example.com/?token=t0k"
    local = registry.tracking_uri
    monkeypatch.setattr(registry, "tracking_uri", lambda explicit=None: local(None))  # the secret URI's stand-in
    res = tiny(synth_snapshot, epochs=1, baselines=False, tracking_uri=secret_uri).run()
    c = registry.client()
    r = c.get_run(res.run_id)
    v = c.get_model_version(NAME, res.version)
    bundle, _ = registry.load_bundle(f"models:/{NAME}/{res.version}")
    assert r.data.params["tracking_uri"] == bundle.config["tracking_uri"] == "https://mlflow.example.com/?token=***"
    out = capsys.readouterr()
    seen = [str(r.data.params), str(r.data.tags), str(v.tags), str(bundle.config), out.out, out.err, caplog.text]
    assert not [(w, t) for t in seen for w in ("alice", "s3cret", "t0k") if w in t]
    assert v.tags["snapshot_digest"] == manifest_digest(load_snapshot(synth_snapshot).manifest)
    assert isinstance(res, TrainResult) and res.model_name == NAME and res.metrics["test.ndcg_at_100"] >= 0
    assert TrainResult.model_validate(res.to_xcom()).to_xcom() == res.to_xcom()  # travels between tasks as JSON (NaN too)
