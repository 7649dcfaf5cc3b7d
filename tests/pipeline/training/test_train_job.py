"""recsys train: what one run logs to MLflow and registers; a failed or killed run registers nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli.main import main
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
        load_config(None, {"snapshot": "s", "model": "popularity"})  # a baseline, not a model the job trains
    with pytest.raises(ValueError, match="extra"):
        load_config(None, {"snapshot": "s", "no_such_key": 1})
    with pytest.raises(ValueError, match="frozen"):
        job.epochs = 4  # type: ignore[misc]


def test_multidae_trains_a_dae_not_the_vae_default() -> None:
    """model multidae without a vae section gets the DAE reference config; a variational vae section is refused (it
    would silently train a Multi-VAE under the DAE's name)."""
    from model.vae import dae_config

    assert load_config(None, {"snapshot": "s", "model": "multidae"}).vae == dae_config()
    job = load_config(None, {"snapshot": "s", "model": "multidae", "vae": {"variational": False, "latent_dim": 64}})
    assert (job.vae.variational, job.vae.latent_dim) == (False, 64)
    with pytest.raises(ValueError, match=r"vae\.variational: false"):
        load_config(None, {"snapshot": "s", "model": "multidae", "vae": {"latent_dim": 64}})
    assert load_config(None, {"snapshot": "s", "model": "multivae"}).vae.variational  # Multi-VAE unchanged


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


# -- bad input is one line, exit 2, nothing registered (issue 32, item 10) -----------------------------------------

def versions() -> set[str]:
    return {v.version for v in registry.client().search_model_versions(f"name='{NAME}'")}


@pytest.mark.parametrize(("text", "expect"), [
    ("epochs: [1\n", r"is not valid YAML \(.* at line 2, column 1\)"),
    ("epochs: !!python/object/apply:os.system ['touch {marker}']\n", "uses a YAML tag that is not allowed"),
    ("vae: !!python/name:os.system\n", "uses a YAML tag that is not allowed"),
    ("just text\n", "is not a mapping"),
    ("? [a, b]\n: 1\n", r"is not valid YAML \(found unhashable key"),
    ("1: 2\n", "non-text key"),
])
def test_bad_train_config_is_one_line_naming_the_file(trained: dict[str, str], synth_snapshot: str, tmp_path: Path,
                                                      capsys, text: str, expect: str) -> None:
    import re

    before = versions()
    marker = tmp_path / "pwned"
    f = tmp_path / "train.yaml"
    f.write_text(text.replace("{marker}", str(marker)))
    capsys.readouterr()
    assert main(["train", "--snapshot", synth_snapshot, "--config", str(f), "--registered-name", NAME]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config file {f}" in err[0] and re.search(expect, err[0]), err
    assert "Fix: write plain `key: value` YAML" in err[0] or "Fix: write `key: value` lines" in err[0]
    assert versions() == before and not marker.exists()


def _unreadable_copy(src: str, dst: Path) -> Path:
    """A copy of the snapshot whose train file is corrupted inside its compressed data, its manifest hash updated
    to match (tampered, not merely damaged): the hash check passes, Parquet decoding fails."""
    import hashlib
    import json
    import shutil

    import pyarrow.parquet as pq

    probe = dst.with_name("probe.parquet")  # read from a file: a failed read from Python bytes can abort at exit
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    rel = next(r for r in manifest["files"] if r.split("/")[1] == "train")
    f = dst / rel
    data = f.read_bytes()
    for at in range(4, len(data) - 8):
        bad = bytearray(data)
        bad[at] ^= 0xFF
        probe.write_bytes(bytes(bad))
        try:
            pq.read_table(probe)
        except Exception as e:
            if "Data corruption detected" in str(e):  # inside a data page, not the footer: the case that aborted
                break
    else:
        pytest.fail("no single-byte change makes a data page of the train file unreadable")
    f.write_bytes(bytes(bad))
    manifest["files"][rel]["sha256"] = hashlib.sha256(bytes(bad)).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return f


@pytest.mark.slow
def test_tampered_snapshot_exits_2_not_an_abort(home: Path, synth_snapshot: str, tmp_path: Path) -> None:
    """Arrow aborted the interpreter at exit (C++ terminate, rc 134) after a failed read from Python bytes: an
    I/O task still held them when the interpreter shut down, in roughly one `recsys train` in ten. Real processes
    (an in-process failed read could abort pytest itself at exit), each must exit 2 with its one line
    (probabilistic: 8 runs catch that abort about half the time)."""
    f = _unreadable_copy(synth_snapshot, tmp_path / "tampered")
    for _ in range(8):
        p = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "train", "--snapshot", str(tmp_path / "tampered"),
                            "--device", "cpu", "--registered-name", NAME], cwd=REPO, env=os.environ.copy(),
                           capture_output=True, text=True, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1, (p.returncode, p.stderr[-1500:])
        assert f"snapshot file {f} is not readable Parquet" in err[0] and "Fix: rebuild the snapshot" in err[0]
    assert versions() == set()  # nothing registered


@pytest.mark.parametrize("requested, device, native, expect, warned", [
    (None, "cpu", True, True, False),    # auto on a CPU with native bf16: measured 1.4x faster, same NDCG
    (None, "cpu", False, False, False),  # auto elsewhere: fp32, no regression
    (True, "cpu", False, True, True),    # asked for on an emulating CPU: allowed, warned
    (False, "cpu", True, False, False),
    (None, "cuda", True, False, False),  # CUDA keeps its explicit opt-in
    (True, "cuda", False, True, False),
])
def test_training_precision_by_capability(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                          requested, device, native, expect, warned) -> None:
    """TrainJob.bf16 (issue 30): the CPU default follows the detected capability (faked here: flags + calibration)."""
    import logging

    from pipeline.io import hardware
    from pipeline.training import train_job

    cap = hardware.Bf16Capability(native, "faked", hardware.CpuInfo("x", "x", "25", "17", 2, frozenset()), None)
    monkeypatch.setattr(hardware, "detect", lambda: cap)
    with caplog.at_level(logging.WARNING, logger=train_job.__name__):
        bf16, why = train_job.training_bf16(requested, device)
    assert bf16 is expect and why
    assert any("emulated" in r.getMessage() for r in caplog.records) is warned
