"""The promotion ledger: append-only JSON Lines, one line per alias-moving event (promotion, rejection,
manual-promotion, rollback, repair), each stamped with its UTC time.

Where: a local path or s3:// (through pipeline.io.lake); default RECSYS_HOME/promotion-ledger.jsonl, or
RECSYS_LEDGER. S3 has no append: the object is rewritten whole, which assumes one writer at a time (gate runs
are serialized by the DAG).

A ledger that cannot be read (a line that is not a JSON object) or written is a DataError naming it; commands that
move aliases call `check()` before moving anything (pipeline.training.aliases).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.io.lake import resolve

LEDGER_FIX = "pass --ledger (or RECSYS_LEDGER) naming a file this user can write, or fix the path; nothing was moved"


def utc_now() -> str:
    """Now, as the ISO-8601 UTC string (to the second) of ledger lines, intents and `gate.time` tags."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def ledger_uri(explicit: str | None = None) -> str:
    """The ledger's URI: `explicit`, else RECSYS_LEDGER, else RECSYS_HOME/promotion-ledger.jsonl."""
    return explicit or os.environ.get("RECSYS_LEDGER") or str(registry.recsys_home() / "promotion-ledger.jsonl")


class Ledger:
    """One promotion ledger (see module doc)."""

    def __init__(self, uri: str | None = None):
        self.loc = resolve(ledger_uri(uri))

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append one event (a `time` is added); returns the line as written. A DataError when it cannot be written."""
        line = json.dumps({"time": utc_now(), **event}, sort_keys=True, default=str) + "\n"
        try:
            if self.loc.uri.startswith("s3://"):
                old = self.loc.read_bytes() if self.loc.exists() else b""
                self.loc.write_bytes(old + line.encode())
            else:
                self.loc.mkdir_parent()
                with open(self.loc.path, "a", encoding="utf-8") as f:  # one write of one line: append-only
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise DataError(f"promotion ledger {self.loc.uri} cannot be written ({_why(e)})", LEDGER_FIX) from e
        return json.loads(line)

    def read(self) -> list[dict[str, Any]]:
        """Every event, oldest first (empty when the ledger does not exist yet); a DataError naming the file and
        line when a line is not a JSON object."""
        try:
            if not self.loc.exists():
                return []
            text = self.loc.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"promotion ledger {self.loc.uri} is not UTF-8 text", _REPAIR) from e
        except OSError as e:
            raise DataError(f"promotion ledger {self.loc.uri} cannot be read ({_why(e)})", LEDGER_FIX) from e
        out = []
        for n, x in enumerate(text.splitlines(), 1):
            if not x.strip():
                continue
            try:
                event = json.loads(x)
            except ValueError as e:
                raise DataError(f"promotion ledger {self.loc.uri} line {n} is not JSON ({e.args[0][:80]})", _REPAIR) from e
            if not isinstance(event, dict):
                raise DataError(f"promotion ledger {self.loc.uri} line {n} is a JSON {type(event).__name__}, "
                                "not an object", _REPAIR)
            out.append(event)
        return out

    def check(self) -> None:
        """Before moving aliases: the ledger reads back (every line JSON) and can be appended to; a DataError
        otherwise. Writes nothing new (creates an empty ledger when there is none)."""
        self.read()
        try:
            if self.loc.uri.startswith("s3://"):
                self.loc.write_bytes(self.loc.read_bytes() if self.loc.exists() else b"")  # same bytes back
            else:
                self.loc.mkdir_parent()
                with open(self.loc.path, "a", encoding="utf-8"):
                    pass
        except OSError as e:
            raise DataError(f"promotion ledger {self.loc.uri} cannot be written ({_why(e)})", LEDGER_FIX) from e


_REPAIR = ("move the damaged line out of the ledger (keep a copy: it is the audit record) or point --ledger / "
           "RECSYS_LEDGER at a good one; nothing was moved")


def _why(e: OSError) -> str:
    if isinstance(e, FileExistsError | NotADirectoryError):
        return f"a file is in the way of its folder: {e.filename}"
    if isinstance(e, IsADirectoryError):
        return "it is a folder"
    return e.strerror or " ".join(str(e).split())[:160] or type(e).__name__
