"""pipeline.orchestration.settings: one validated value per RECSYS_* variable, defaults under RECSYS_HOME, the
execution profile chosen by RECSYS_PROFILE, and a bad value named by its variable (credentials never echoed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.orchestration.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("RECSYS_") or k == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(k)


def test_defaults_live_under_home_and_the_profile_is_embedded(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.profile == "embedded" and s.home == tmp_path.resolve()
    assert s.lake_uri == str(tmp_path / "lake") and s.staging_uri == f"{tmp_path / 'lake'}/_jobs"
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.spark_master == "local[2]" and s.spark_driver_host is None and s.train_processes == 2


def test_every_setting_comes_from_its_variable(monkeypatch, tmp_path: Path) -> None:
    env = {"RECSYS_HOME": str(tmp_path), "RECSYS_PROFILE": "spark", "RECSYS_SPARK_MASTER": "spark://10.0.0.1:7077",
           "RECSYS_SPARK_DRIVER_HOST": "10.0.0.9", "RECSYS_SPARK_CONF": '{"spark.executor.cores": 4}',
           "RECSYS_TRAIN_PROCESSES": "8", "RECSYS_TRAIN_GPU": "true", "RECSYS_LAKE_URI": "s3://lake",
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "RECSYS_TOP_N": "50"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings.from_env()
    assert (s.profile, s.spark_master, s.spark_driver_host) == ("spark", "spark://10.0.0.1:7077", "10.0.0.9")
    assert s.spark_conf == {"spark.executor.cores": "4"} and s.train_processes == 8 and s.train_gpu
    assert s.staging_uri == "s3://lake/_jobs" and s.tracking_uri == "http://127.0.0.1:5000" and s.top_n == 50


@pytest.mark.parametrize(("var", "value", "message"), [
    ("RECSYS_PROFILE", "gpu-farm", "RECSYS_PROFILE is not valid: Input should be 'embedded', 'spark' or 'aws'"),
    ("RECSYS_TOP_N", "lots", "RECSYS_TOP_N is not valid"),
    ("RECSYS_TRAIN_PROCESSES", "0", "RECSYS_TRAIN_PROCESSES is not valid: Input should be greater than or equal to 1"),
    ("RECSYS_SPARK_CONF", "{spark.x=1", "RECSYS_SPARK_CONF is not valid"),
    ("RECSYS_AVAILABILITY_URI", "s3://lake/availability/latest/", "must contain {date} exactly once"),
    ("RECSYS_AVAILABILITY_URI", "s3://lake/{date}/{dt}/", "must contain {date} exactly once"),
    ("RECSYS_AVAILABILITY_URI", "s3://lake/{date}/{date}/", "must contain {date} exactly once"),
    ("RECSYS_EXCLUSIONS_URI", "s3://lake/exclusions/latest/", "RECSYS_EXCLUSIONS_URI must contain {date} exactly once"),
    ("RECSYS_EXCLUSIONS_URI", "s3://lake/exclusions/dt={day}/", "RECSYS_EXCLUSIONS_URI must contain {date} exactly once"),
    ("RECSYS_EXCLUSIONS_URI", "s3://lake/{date}/dt={date}/", "RECSYS_EXCLUSIONS_URI must contain {date} exactly once"),
])
def test_a_bad_value_names_its_variable_and_the_fix(monkeypatch, var: str, value: str, message: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(DataError, match=message) as e:
        Settings.from_env()
    assert "Fix: set " + var in str(e.value) and "\n" not in str(e.value)


def test_a_bad_tracking_uri_is_named_without_its_password(monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_TOP_N", "x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.com")
    with pytest.raises(DataError) as e:
        Settings.from_env()
    assert "s3cret" not in str(e.value)


def test_keyword_arguments_override_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSYS_TOP_N", "50")
    s = Settings(home=tmp_path, top_n=5, tracking_uri="sqlite:///x.db")
    assert s.top_n == 5 and s.tracking_uri == "sqlite:///x.db"
