"""Against a real `mlflow server` (SQLite backend, artifacts in moto S3): train → gate → promote → load champion."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from .conftest import NAME, aliases, gate, point_at, tiny


def test_train_gate_promote_and_serve_from_server(mlflow_server: str, synth_snapshot: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, easy_gates) -> None:
    import boto3
    import mlflow.pyfunc

    point_at(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # by configuration only
    r = tiny(synth_snapshot, epochs=2).run()
    o = gate(r.version, gates=easy_gates)
    assert o.promoted and aliases()["champion"] == r.version
    m = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = m.predict(pd.DataFrame({"item_ids": [[1000, 1001, 1002]]}), params={"k": 5})
    assert len(out["item_ids"][0]) == 5 and not {1000, 1001, 1002} & set(out["item_ids"][0])
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith("recommender.pt") for k in keys) and any(k.endswith("gate_report.md") for k in keys)
    assert not (tmp_path / "artifacts").exists()  # remote tracking: the server decides artifact storage
