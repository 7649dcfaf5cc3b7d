"""The promotion ledger: append-only JSON Lines, one line per alias-moving event (promotion, rejection,
manual-promotion, rollback, repair), each stamped with its UTC time.

Where: a local path or s3:// (through pipeline.io.lake); default RECSYS_HOME/promotion-ledger.jsonl, or
RECSYS_LEDGER. S3 has no append: the object is rewritten whole, which assumes one writer at a time (gate runs
are serialized by the DAG).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from pipeline.io import registry
from pipeline.io.lake import resolve


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
        """Append one event (a `time` is added); returns the line as written."""
        line = json.dumps({"time": utc_now(), **event}, sort_keys=True, default=str) + "\n"
        if self.loc.uri.startswith("s3://"):
            old = self.loc.read_bytes() if self.loc.exists() else b""
            self.loc.write_bytes(old + line.encode())
        else:
            self.loc.mkdir_parent()
            with open(self.loc.path, "a", encoding="utf-8") as f:  # one write of one line: append-only
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return json.loads(line)

    def read(self) -> list[dict[str, Any]]:
        """Every event, oldest first (empty when the ledger does not exist yet)."""
        if not self.loc.exists():
            return []
        return [json.loads(x) for x in self.loc.read_bytes().decode().splitlines() if x.strip()]
