"""One filesystem layer for the lake: local folders, file:// and s3:// URIs, through pyarrow.fs.

S3 settings come from the environment only (never from code or logs): AWS_ENDPOINT_URL (or
RECSYS_S3_ENDPOINT) for a non-AWS endpoint such as a moto server, AWS_REGION, and the usual credential chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from pipeline.errors import DataError

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

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes, durable: bool = False) -> None:
        """Write a file whole. On a local disk readers see the old content or the new, never a torn file (a
        temporary file in the same folder, then a rename); `durable` also fsyncs it before the rename and the folder
        after (pipeline.io.publish's commit points). S3 PUTs are atomic and durable already."""
        self.mkdir_parent()
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        head, name = os.path.split(self.path)
        tmp = os.path.join(head, f".{name}.tmp-{secrets.token_hex(4)}")  # dot: dataset discovery skips it
        try:
            with open(tmp, "wb") as f:
                f.write(data)
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

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def mkdir_parent(self) -> None:
        if isinstance(self.fs, pafs.LocalFileSystem):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove a file or a folder tree; absent is fine."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def list(self) -> list[str]:
        """Names directly under this folder (empty when absent)."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(i.base_name for i in infos)


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("RECSYS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
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
    if not text or "\x00" in text:
        raise DataError(f"invalid location {text!r}", "pass a local path, file:///path or s3://bucket/prefix")
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if not _BUCKET.match(bucket):
            raise DataError(f"invalid S3 bucket name {bucket!r} in {text!r}", "use s3://<bucket>/<prefix>")
        key = parsed.path.strip("/")
        if ".." in key.split("/"):
            raise DataError(f"'..' in S3 key of {text!r}", "use a plain prefix")
        path = f"{bucket}/{key}" if key else bucket
        return Location(s3_filesystem(), path, f"s3://{path}")
    if parsed.scheme == "file":
        if parsed.netloc.lower() not in ("", "localhost"):  # file://host/path would silently drop the host
            raise DataError(f"file URI {text!r} names host {parsed.netloc!r}",
                            "use file:///absolute/path (three slashes) or a plain local path")
        decoded = unquote(parsed.path)
        if "\x00" in decoded:
            raise DataError(f"invalid location {text!r}", "pass a local path, file:///path or s3://bucket/prefix")
        local = Path(decoded)
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = Path(text)
    else:
        raise DataError(f"unsupported URI scheme {parsed.scheme!r} in {text!r}",
                        "use a local path, file:///path or s3://bucket/prefix")
    local = local.expanduser().resolve()
    return Location(pafs.LocalFileSystem(), str(local), str(local))
