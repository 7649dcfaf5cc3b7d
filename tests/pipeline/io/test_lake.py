"""pipeline.io.lake: local writes land whole (a reader never sees a torn file), and file:// URIs are read exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.io import lake


def test_local_write_replaces_the_file_whole(tmp_path: Path) -> None:
    loc = lake.resolve(tmp_path / "snap" / "manifest.json")
    loc.write_bytes(b"old content")
    with open(loc.path, "rb") as reader:  # a reader that opened the file before the rewrite...
        loc.write_bytes(b"new")
        assert reader.read() == b"old content"  # ...still reads the whole old file (in place it would see b"")
    assert loc.read_bytes() == b"new"
    assert os.listdir(tmp_path / "snap") == ["manifest.json"]  # no temporary file left


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    loc = lake.resolve(tmp_path / "manifest.json")
    loc.write_bytes(b"old content")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        loc.write_bytes(b"new")
    assert loc.read_bytes() == b"old content" and os.listdir(tmp_path) == ["manifest.json"]


def test_file_uris(tmp_path: Path) -> None:
    spaced = tmp_path / "my lake"
    assert lake.resolve(f"file://{tmp_path}/my%20lake").path == str(spaced)
    assert lake.resolve(f"file://localhost{tmp_path}/x").path == str(tmp_path / "x")
    assert lake.resolve(str(tmp_path / "a%20b")).path == str(tmp_path / "a%20b")  # plain paths are taken as given
    for bad in ("file://lake/out", "file://otherhost/tmp/x", "file://localhost:8080/tmp/x"):
        with pytest.raises(DataError, match=r"names host .*Fix: use file:///absolute/path"):
            lake.resolve(bad)
    with pytest.raises(DataError, match="invalid location"):
        lake.resolve("file:///tmp/a%00b")


# -- S3 endpoint down or hanging: a bounded wait, then one DataError -------------------------------------------

@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch):
    """Dummy credentials (no lookup of an instance role), a fresh record of unreachable endpoints; yields a
    function that points S3 at http://127.0.0.1:PORT."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RECSYS_S3_ENDPOINT", "AWS_SESSION_TOKEN", *lake.S3_DEFAULTS):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(lake, "_down", {})

    def point(port: int) -> str:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        return endpoint

    return point


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_endpoint_down_fails_fast_with_one_data_error(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    endpoint = s3_env(_closed_port())
    monkeypatch.setenv("RECSYS_S3_MAX_ATTEMPTS", "2")
    loc = lake.resolve("s3://bucket/lake/recommendations")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"^S3 endpoint {endpoint} unreachable after 2 tries \(s3://bucket/lake/rec"
                                        r"ommendations\)\. Fix: check AWS_ENDPOINT_URL / network") as e:
        loc.exists()
    assert time.monotonic() - t0 < 10 and "curlCode" not in str(e.value)
    # the endpoint is known to be down: the next calls (a clean-up, an abort) fail at once, each one line
    for call in (loc.list, loc.read_bytes, lambda: loc.join("x").write_bytes(b"1"), loc.delete, loc.mkdir):
        t0 = time.monotonic()
        with pytest.raises(DataError, match="unreachable after 2 tries"):
            call()
        assert time.monotonic() - t0 < 0.5


def test_s3_endpoint_that_accepts_but_never_answers_is_bounded(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts, reads nothing, answers nothing
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        endpoint = s3_env(server.getsockname()[1])
        monkeypatch.setenv("RECSYS_S3_REQUEST_TIMEOUT", "2")  # the defaults (3 tries of 3 s) take ~11 s
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"^S3 endpoint {endpoint} unreachable after 3 tries"):
            lake.resolve("s3://bucket/snap/manifest.json").read_bytes()
        assert 4 < time.monotonic() - t0 < 15  # it did wait for each try, and not for ever
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()


def test_s3_settings_from_the_environment(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [lake.s3_setting(k) for k in lake.S3_DEFAULTS] == [2.0, 3.0, 3, 30.0]
    monkeypatch.setenv("RECSYS_S3_REQUEST_TIMEOUT", "0.5")
    assert lake.s3_setting("RECSYS_S3_REQUEST_TIMEOUT") == 0.5
    for name, bad in (("RECSYS_S3_MAX_ATTEMPTS", "1.5"), ("RECSYS_S3_CONNECT_TIMEOUT", "-1"),
                      ("RECSYS_S3_REQUEST_TIMEOUT", "nan"), ("RECSYS_S3_RETRY_AFTER", "soon")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(DataError, match=rf"{name}='{bad}' is not .*Fix: set {name} to"):
            lake.s3_setting(name)
        monkeypatch.delenv(name)


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    loc = lake.resolve(tmp_path / "state.json")
    loc.write_bytes(b'{"run": ')
    with pytest.raises(DataError, match=rf"^{tmp_path}/state.json is not valid JSON \(.*\)\. Fix: rebuild it\.$"):
        loc.read_json(fix="rebuild it")
    loc.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="is not valid JSON"):
        loc.read_json()


def test_check_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake.resolve(tmp_path / "new" / "deeper").check_writable()  # absent: fine, it can be made
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "below" / "dt=2024-01-01"):
        with pytest.raises(DataError, match=rf"cannot write {target}: {tmp_path}/file is a file, not a folder"):
            lake.resolve(target).check_writable()
    denied = str(tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == denied else real(p, mode))
    with pytest.raises(DataError, match=rf"no permission to write in {denied}\. Fix: pass a folder this user"):
        lake.resolve(tmp_path / "ro" / "lake").check_writable()


def test_a_stream_stopped_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    loc = lake.resolve(tmp_path / "state.pt")
    loc.write_with(lambda f: f.write(b"saved at epoch 3"))

    def fill(f) -> None:  # a stop arriving while GBs are streamed out
        f.write(b"x" * 1_000_000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loc.write_with(fill)
    assert loc.read_bytes() == b"saved at epoch 3" and os.listdir(tmp_path) == ["state.pt"]
