"""A tracking URI with credentials (user:password@, ?token=): nothing printed or logged shows them, and a server
that is down is one line, quickly (issue 32, items 5 and 10)."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.cli.main import main

from .conftest import NAME
from .test_registry_load import closed_port_uri

SECRETS = ("alice", "s3cret", "t0k")


def leaks(*texts: str) -> list[tuple[str, str]]:
    """(secret, where) for every secret found in `texts`."""
    return [(w, t[max(0, t.find(w) - 80): t.find(w) + 40]) for t in texts for w in SECRETS if w in t]


@pytest.mark.parametrize("command", ["train", "gate", "promote", "rollback"])
def test_down_server_with_credentials_is_one_quick_line_without_them(home, synth_snapshot: str, capsys, caplog,
                                                                     command: str) -> None:
    uri = closed_port_uri("alice:s3cret@", "?token=t0k")
    argv = {"train": ["train", "--snapshot", synth_snapshot, "--device", "cpu", "--epochs", "1",
                      "--registered-name", NAME],
            "gate": ["gate", "--model", NAME, "--model-version", "1"],
            "promote": ["promote", "--model", NAME, "--model-version", "1", "--reason", "x"],
            "rollback": ["rollback", "--model", NAME]}[command]
    caplog.set_level(logging.DEBUG)  # urllib3's retry lines name the request path (and its query)
    t0 = time.perf_counter()
    assert main(["-v", *argv, "--tracking-uri", uri]) == 2
    assert time.perf_counter() - t0 < 30
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "is unreachable or not answering (Connection refused)" in err[0], err
    assert "Fix: start the tracking server, or point --tracking-uri / MLFLOW_TRACKING_URI" in err[0]
    assert "Retrying" in caplog.text  # the retries were logged, masked
    assert not leaks(out.out, out.err, caplog.text)
