"""pipeline.io.registry: load_bundle(model_uri) -> (ModelBundle, version), the inference job's entry point."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.io.registry import load_bundle, parse_model_uri, tracking_uri

from .conftest import NAME


def test_load_bundle_by_alias_and_by_version(trained: dict[str, str]) -> None:
    bundle, version = load_bundle(f"models:/{NAME}@challenger")
    assert version == trained["bad"]  # the newest trained version is the challenger
    b1, v1 = load_bundle(f"models:/{NAME}/{trained['good']}", device="cpu")
    assert v1 == trained["good"] and b1.n_items == bundle.n_items == 150
    assert b1.item_ids[0] == 1000 and b1.snapshot_id == "snap-synth" and b1.name == "multivae-pia"
    top, scores = b1.recommend(sp.csr_matrix(np.eye(3, 150, dtype=np.float32)), 5)
    assert top.shape == (3, 5) and np.isfinite(scores).all() and top[0, 0] != 0


def test_bad_uris_are_clear_errors(trained: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="registered model URI"):
        load_bundle("runs:/abc/model")
    with pytest.raises(ValueError, match="no alias 'champion'"):
        load_bundle(f"models:/{NAME}@champion")
    assert parse_model_uri("models:/a.b-c/7") == ("a.b-c", None, "7")


def test_default_tracking_is_sqlite_under_recsys_home(home) -> None:
    assert tracking_uri() == f"sqlite:///{home / 'mlflow.db'}" and tracking_uri().startswith("sqlite:////")


def test_versions_are_canonical_positive_integers(trained: dict[str, str]) -> None:
    from pipeline.errors import DataError
    from pipeline.io.registry import canonical_version, version_tags

    assert canonical_version("007") == "7" and canonical_version(3) == "3"
    assert parse_model_uri("models:/m/02") == ("m", None, "2")
    assert version_tags(NAME, f"0{trained['good']}")["snapshot_id"] == "snap-synth"
    _, v = load_bundle(f"models:/{NAME}/0{trained['good']}")
    assert v == trained["good"]
    for bad in ("0", "-2", "x", "", "2.0"):
        with pytest.raises(DataError, match="is not a positive integer"):
            canonical_version(bad)
    with pytest.raises(DataError, match="'latest' is not a positive integer"):
        parse_model_uri("models:/m/latest")


# -- a down server is not "no alias"; a missing version is one line (issue 32, item 10) --------------------------

def closed_port_uri(userinfo: str = "", query: str = "") -> str:
    """A tracking URI on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://{userinfo}127.0.0.1:{port}/{query}"


def test_a_down_server_is_not_reported_as_no_alias(home) -> None:
    import time

    from pipeline.errors import DataError
    from pipeline.io.registry import alias_version, resolve_version, version_exists

    uri = closed_port_uri()
    t0 = time.perf_counter()
    for call in (lambda: resolve_version(f"models:/{NAME}@champion", uri), lambda: alias_version(NAME, "champion", uri),
                 lambda: load_bundle(f"models:/{NAME}@champion", tracking=uri),
                 lambda: version_exists(NAME, "1", uri)):
        with pytest.raises(DataError, match=rf"tracking server {uri} is unreachable or not answering \(Connection "
                                            r"refused\). Fix: start the tracking server") as e:
            call()
        assert "no alias" not in str(e.value)
    assert time.perf_counter() - t0 < 60  # bounded retries: seconds per call, not MLflow's default minutes


@pytest.mark.parametrize(("model", "expect"), [
    ("models:/recsys-test/99", "registered model 'recsys-test' has no version 99"),
    ("models:/recsys-test@champion", "registered model 'recsys-test' has no alias 'champion'"),
    ("models:/no-such-model@champion", "registered model 'no-such-model' has no alias 'champion'"),
])
def test_infer_with_a_missing_version_or_alias_is_one_line(trained: dict[str, str], tmp_path, capsys,
                                                           model: str, expect: str) -> None:
    from pipeline.cli.main import main

    assert main(["infer", "--date", "2024-05-03", "--events", str(tmp_path / "events"), "--out", str(tmp_path / "lake"),
                 "--model", model, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0] and "Fix:" in err[0], err
    assert not (tmp_path / "lake").exists()
