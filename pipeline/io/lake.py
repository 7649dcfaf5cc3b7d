"""One filesystem layer for the lake: local folders, file:// and s3:// URIs, through pyarrow.fs.

S3 settings come from the environment only (never from code or logs): AWS_ENDPOINT_URL (or
RECSYS_S3_ENDPOINT) for a non-AWS endpoint such as a moto server, AWS_REGION, and the usual credential chain.

Waits on S3 are bounded (an endpoint that is down or hangs fails the call in seconds, not minutes):
RECSYS_S3_CONNECT_TIMEOUT (seconds to open a connection, default 2), RECSYS_S3_REQUEST_TIMEOUT (seconds a
request may stall without receiving a byte, default 3; a slow but moving transfer is not cut) and
RECSYS_S3_MAX_ATTEMPTS (tries per call, first included, default 3, with the SDK's backoff between them): a
hanging endpoint fails a call after about MAX_ATTEMPTS x REQUEST_TIMEOUT seconds. A call that fails on the
network raises one DataError ("S3 endpoint ... unreachable after N tries"), and further calls to that endpoint
from the same process fail at once for RECSYS_S3_RETRY_AFTER seconds (default 30), so that clean-up after the
failure does not wait again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from pipeline.errors import DataError
from pipeline.io.redact import redact_uri

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path inside it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        for p in parts:
            if not p or p.startswith("/") or ".." in p.split("/"):
                raise DataError(f"unsafe path component {p!r}", "use relative names without '..'")
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)

    @contextlib.contextmanager
    def _s3_faults(self) -> Iterator[None]:
        """Translate an S3 network or permission failure into one DataError (a missing key stays a
        FileNotFoundError: callers rely on it); local errors pass unchanged."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            yield
            return
        _fail_fast()
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as e:
            translated = s3_error(e, self.uri)
            if translated is None:
                raise
            raise translated from e

    def exists(self) -> bool:
        with self._s3_faults():
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        with self._s3_faults():
            return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self._s3_faults(), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes, durable: bool = False) -> None:
        """Write a file whole. On a local disk readers see the old content or the new, never a torn file (a
        temporary file in the same folder, then a rename); `durable` also fsyncs it before the rename and the folder
        after (pipeline.io.publish's commit points). S3 PUTs are atomic and durable already."""
        self.write_with(lambda f: f.write(data), durable)

    def write_with(self, fill: Callable[[IO[bytes]], object], durable: bool = False) -> None:
        """`write_bytes` for content streamed by `fill(file)` (e.g. torch.save of GBs, never held in memory twice).
        A failure or stop inside `fill` leaves the old file and no temporary behind."""
        self.mkdir_parent()
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self._s3_faults(), self.fs.open_output_stream(self.path) as f:
                fill(f)  # a pyarrow NativeFile: S3 PUTs land whole already
            return
        head, name = os.path.split(self.path)
        tmp = os.path.join(head, f".{name}.tmp-{secrets.token_hex(4)}")  # dot: dataset discovery skips it
        try:
            with open(tmp, "wb") as f:
                fill(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            fd = os.open(head, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_json(self, fix: str = "re-run the job that writes it") -> Any:
        """The JSON document in this file; a DataError naming the file (and `fix`) when it is not JSON."""
        data = self.read_bytes()
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"{self.uri} is not valid JSON ({e})", fix) from e

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def mkdir_parent(self) -> None:
        if isinstance(self.fs, pafs.LocalFileSystem):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def mkdir(self) -> None:
        with self._s3_faults():
            self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove a file or a folder tree; absent is fine."""
        with self._s3_faults():
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)

    def list(self) -> list[str]:
        """Names directly under this folder (empty when absent)."""
        if not self.exists():
            return []
        with self._s3_faults():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(i.base_name for i in infos)

    def check_writable(self) -> None:
        """Raise a DataError, before any work is done, when this local folder cannot be created or written to: a
        file is in the way (the folder itself or one above it), or no write permission where it would be made.
        Nothing to check on S3 (no folders; a denied write fails with its own DataError)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return
        p = Path(self.path)
        while not os.path.lexists(p) and p != p.parent:
            p = p.parent
        if not p.is_dir():
            raise DataError(f"cannot write {self.uri}: {p} is a file, not a folder",
                            "pass a folder (or a path that does not exist yet), or move the file away")
        if not os.access(p, os.W_OK | os.X_OK):
            raise DataError(f"cannot write {self.uri}: no permission to write in {p}",
                            "pass a folder this user can write to, or fix its permissions")


# -- S3: bounded waits, one clear error ---------------------------------------------------------------------

S3_DEFAULTS = {"RECSYS_S3_CONNECT_TIMEOUT": 2.0, "RECSYS_S3_REQUEST_TIMEOUT": 3.0, "RECSYS_S3_MAX_ATTEMPTS": 3,
               "RECSYS_S3_RETRY_AFTER": 30.0}
_NETWORK = re.compile(r"NETWORK_CONNECTION|curlCode: \d+|Could not resolve|Failed to connect|Timeout was reached")
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|Forbidden")
_down: dict[str, tuple[float, DataError]] = {}  # endpoint → (when it was found unreachable, the error)
_down_lock = threading.Lock()


def s3_setting(name: str) -> float:
    """One of S3_DEFAULTS from the environment: a positive number (MAX_ATTEMPTS a whole one), else a DataError."""
    default = S3_DEFAULTS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if isinstance(default, int) else float(text)
    except ValueError:
        value = -1
    if not value > 0 or value != value:  # NaN
        kind = "a whole number >= 1" if isinstance(default, int) else "a number of seconds > 0"
        raise DataError(f"{name}={text[:40]!r} is not {kind}", f"set {name} to {kind} (default {default}) or unset it")
    return value


def s3_endpoint() -> str:
    """The S3 endpoint calls go to (without credentials), for messages."""
    endpoint = os.environ.get("RECSYS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return redact_uri(endpoint)
    return f"AWS S3 ({os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or 'us-east-1'})"


def s3_error(e: OSError, uri: str | None = None) -> DataError | None:
    """The DataError for an S3 failure raised by pyarrow (endpoint unreachable or hanging, access denied), or
    None when `e` is something else. An unreachable endpoint is remembered (see the module doc)."""
    if isinstance(e, FileNotFoundError):
        return None
    text = str(e)
    if "AWS Error" not in text and "curlCode" not in text:
        return None
    where = f" ({uri})" if uri else ""
    if _NETWORK.search(text):
        endpoint = s3_endpoint()
        err = DataError(f"S3 endpoint {endpoint} unreachable after {int(s3_setting('RECSYS_S3_MAX_ATTEMPTS'))} "
                        f"tries{where}", "check AWS_ENDPOINT_URL / network (waits: RECSYS_S3_CONNECT_TIMEOUT, "
                        "RECSYS_S3_REQUEST_TIMEOUT, RECSYS_S3_MAX_ATTEMPTS), then re-run")
        with _down_lock:
            _down[endpoint] = (time.monotonic(), err)
        return err
    if _DENIED.search(text):
        return DataError(f"S3 denied access{where}: {text[:200]}",
                         "check the credentials (AWS_ACCESS_KEY_ID / the instance role) and the bucket's policy")
    return DataError(f"S3 request failed{where}: {text[:300]}", "check the bucket and the prefix, then re-run")


def _fail_fast() -> None:
    """Raise the remembered error while the endpoint counts as down (RECSYS_S3_RETRY_AFTER seconds)."""
    endpoint = s3_endpoint()
    with _down_lock:
        seen = _down.get(endpoint)
        if seen is not None and time.monotonic() - seen[0] >= s3_setting("RECSYS_S3_RETRY_AFTER"):
            del _down[endpoint]
            seen = None
    if seen is not None:
        raise DataError(seen[1].problem, seen[1].fix)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment, with bounded waits (see the module doc)."""
    endpoint = os.environ.get("RECSYS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": s3_setting("RECSYS_S3_CONNECT_TIMEOUT"),
        "request_timeout": s3_setting("RECSYS_S3_REQUEST_TIMEOUT"),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(s3_setting("RECSYS_S3_MAX_ATTEMPTS")))}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**kwargs)


def is_temporary(name: str, target: str) -> bool:
    """Whether `name` is a left-over temporary file of a write to `target` (this module's, or the older
    `<target>.tmp-*` naming), e.g. after a process was killed mid-write."""
    return name.startswith((f".{target}.tmp-", f"{target}.tmp-"))


def resolve(uri: str | Path) -> Location:
    """A local path, file:///abs/path or s3://bucket/prefix → Location. Anything else is a clear error."""
    text = str(uri)
    fix = "pass a local path, file:///path or s3://bucket/prefix"
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):  # urlparse drops tabs and newlines
        raise DataError(f"invalid location {text[:200]!r} (empty, or a control character)", fix)
    try:
        text.encode("utf-8")
        parsed = urlparse(text)
    except ValueError as e:  # a lone surrogate; an unclosed '[' (IPv6 host)
        raise DataError(f"invalid location {text[:200]!r} ({e})", fix) from e
    if parsed.scheme in ("s3", "file") and (parsed.query or parsed.fragment or parsed.params):
        raise DataError(f"'?' or '#' in {text[:200]!r}: that part would be dropped", "use a plain path or prefix")
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if not _BUCKET.fullmatch(bucket):
            raise DataError(f"invalid S3 bucket name {bucket!r} in {text!r}", "use s3://<bucket>/<prefix>")
        key = parsed.path.strip("/")
        if key and any(part in ("", ".", "..") for part in key.split("/")):
            raise DataError(f"empty, '.' or '..' segment in the S3 key of {text!r}", "use a plain prefix")
        path = f"{bucket}/{key}" if key else bucket
        return Location(s3_filesystem(), path, f"s3://{path}")
    if parsed.scheme == "file":
        if parsed.netloc.lower() not in ("", "localhost"):  # file://host/path would silently drop the host
            raise DataError(f"file URI {text!r} names host {parsed.netloc!r}",
                            "use file:///absolute/path (three slashes) or a plain local path")
        try:
            decoded = unquote(parsed.path, errors="strict")
        except UnicodeDecodeError as e:
            raise DataError(f"file URI {text[:200]!r} percent-encodes bytes that are not UTF-8", fix) from e
        if "\x00" in decoded:
            raise DataError(f"invalid location {text[:200]!r}", fix)
        local = Path(decoded)
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = Path(text)
    else:
        raise DataError(f"unsupported URI scheme {parsed.scheme!r} in {text!r}",
                        "use a local path, file:///path or s3://bucket/prefix")
    try:
        local = local.expanduser().resolve()
    except RuntimeError as e:  # ~user of no such user
        raise DataError(f"invalid location {text[:200]!r} ({e})", fix) from e
    return Location(pafs.LocalFileSystem(), str(local), str(local))
