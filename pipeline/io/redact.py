"""Credentials out of anything logged: a tracking URI may be https://user:password@host/?token=..."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# substring match on the parameter name: over-redacting a harmless value is cheap, leaking a secret is not
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# userinfo right after "scheme://": whatever precedes an "@" before the host (quotes are legal raw in it)
_USERINFO = re.compile(r"(?<=://)[^\s/@]+@")
_SECRET_PARAM = re.compile(r"token|passw|pwd|secret|key|sig|credential|auth", re.IGNORECASE)


def _params(text: str) -> str:
    parts = []
    for p in text.split("&"):
        name, eq, _ = p.partition("=")
        parts.append(f"{name}={MASK}" if eq and _SECRET_PARAM.search(name) else p)
    return "&".join(parts)


def redact_uri(value: str) -> str:
    """`value` without userinfo (user:password@) and with secret-looking query/fragment values masked;
    anything else (paths, plain words) comes back unchanged."""
    try:
        u = urlsplit(value)
    except ValueError:
        return MASK  # unparseable: say nothing rather than risk the raw text
    netloc = u.netloc.rpartition("@")[2]
    query, fragment = _params(u.query), _params(u.fragment)
    if (netloc, query, fragment) == (u.netloc, u.query, u.fragment):
        return value  # untouched: no re-serialisation that could alter a harmless value
    return urlunsplit((u.scheme, netloc, u.path, query, fragment))


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with redact_uri applied to every URL in it, and any userinfo
    left after a scheme (a URL the URL pattern cut short, e.g. at a quote) removed."""
    return _URL.sub(lambda m: redact_uri(m.group(0)), _USERINFO.sub("", text))


def redact_values(obj: Any) -> Any:
    """A copy of a JSON-like config with redact_uri applied to every string in it."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_values(v) for v in obj]
    return redact_uri(obj) if isinstance(obj, str) else obj
