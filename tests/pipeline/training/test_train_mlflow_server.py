"""Against a real `mlflow server` (SQLite backend, artifacts in moto S3): train → gate → promote → load champion."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import registry

from .conftest import NAME, aliases, gate, point_at, tiny

REPO = Path(__file__).resolve().parents[3]


def test_train_gate_promote_and_serve_from_server(mlflow_server: str, synth_snapshot: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, easy_gates) -> None:
    import boto3
    import mlflow.pyfunc

    point_at(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # by configuration only
    r = tiny(synth_snapshot, epochs=2).run()
    o = gate(r.version, gates=easy_gates)
    assert o.promoted and aliases()["champion"] == r.version
    # the HTML gate report is an artifact of the version's run, in the server's store
    assert o.html_report is not None and o.html_report.endswith("gate/enabled/gate_report.html")
    assert "gate/enabled/gate_report.html" in {a.path for a in registry.client().list_artifacts(r.run_id, "gate/enabled")}
    m = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = m.predict(pd.DataFrame({"item_ids": [[1000, 1001, 1002]]}), params={"k": 5})
    assert len(out["item_ids"][0]) == 5 and not {1000, 1001, 1002} & set(out["item_ids"][0])
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith("recommender.pt") for k in keys) and any(k.endswith("gate_report.md") for k in keys)
    assert not (tmp_path / "artifacts").exists()  # remote tracking: the server decides artifact storage


def test_credentials_in_the_tracking_uri_are_never_printed_or_logged(mlflow_server: str, synth_snapshot: str,
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     easy_gates, capsys, caplog) -> None:
    """`recsys -v train` (a real process: every byte it prints) and gate/promote/rollback against a real server
    addressed as http://alice:s3cret@host (a server without auth ignores the credentials)."""
    import logging
    import os
    import subprocess
    import sys

    from pipeline.cli.main import main

    from .test_tracking_credentials import leaks

    point_at(monkeypatch, tmp_path)
    uri = mlflow_server.replace("http://", "http://alice:s3cret@")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 100\ncompare_base: false\nvae: {hidden_dims: [32], latent_dim: 8}\n")
    from pipeline.io.registry import MLFLOW_DEFAULTS

    unset = {"MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", *MLFLOW_DEFAULTS}  # the process sets its own
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"RECSYS_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "-v", "train", "--snapshot", synth_snapshot,
                        "--config", str(cfg), "--device", "cpu", "--registered-name", NAME, "--tracking-uri", uri],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"registered {NAME} version" in p.stdout and "View run" not in p.stdout
    assert not leaks(p.stdout, p.stderr)
    version = p.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1]
    gates = tmp_path / "easy.yaml"
    gates.write_text("floors: {ndcg@100: 0.0}\npopularity_margin: -1.0\nease_margin: 1.0\ncoverage_floor: 0.0\n")
    caplog.set_level(logging.DEBUG)
    for argv in (["gate", "--model-version", version, "--config", str(gates)],
                 ["promote", "--model-version", version, "--reason", "x"], ["rollback"]):
        main(["-v", *argv, "--model", NAME, "--tracking-uri", uri])  # the outcome does not matter here, the output does
    out = capsys.readouterr()
    assert "promoted to champion" in out.out or "stays challenger" in out.out
    assert not leaks(out.out, out.err, caplog.text)
