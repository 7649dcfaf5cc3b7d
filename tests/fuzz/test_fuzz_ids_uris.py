"""Ids and URIs from outside: the id rule (pipeline.io.ids), the lake's URI resolver and the credential redaction.
A value or one DataError; never another exception; never a credential in what is printed."""

from __future__ import annotations

import string
from urllib.parse import quote

import pyarrow.fs as pafs
import pytest
from fuzz_support import scaled
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.ids import INT64_MAX, INT64_MIN, MAX_STRING_ID, check_id, string_id_problem
from pipeline.io.redact import redact_text, redact_uri

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300),
                      st.binary(max_size=8), st.lists(st.integers(), max_size=2), st.dates())


@settings(max_examples=scaled(300))
@given(ANY_VALUE)
@example(INT64_MAX + 1)
@example(INT64_MIN)
@example("x" * (MAX_STRING_ID + 1))
@example("\x00")
@example("\ud800")
@example("ü/ß 😀")
@example(True)
@example(" ")
def test_check_id_keeps_a_valid_id_or_raises_one_data_error(value: object) -> None:
    try:
        got = check_id(value, "user id")
    except DataError as e:
        assert "\n" not in str(e) and ". Fix: " in str(e)
        valid = (isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX) or \
            (isinstance(value, str) and string_id_problem(value) is None)
        assert not valid, f"a valid id was refused: {value!r}"
        return
    assert got is value
    assert (isinstance(got, int) and not isinstance(got, bool) and INT64_MIN <= got <= INT64_MAX) or \
        (isinstance(got, str) and 1 <= len(got) <= MAX_STRING_ID and string_id_problem(got) is None)


SCHEMES = st.sampled_from(["", "s3://", "file://", "file:///", "S3://", "http://", "hdfs://", "gs://", "s3a://", "c:"])
URI_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(lambda scheme, rest: scheme + rest, SCHEMES, st.text(max_size=30)),
    st.builds(lambda b, k: f"s3://{b}/{k}", st.from_regex(r"\A[a-z0-9.\-]{0,8}\Z"), st.text(max_size=20)),
)


@settings(max_examples=scaled(300))
@given(text=URI_TEXT)
@example(text="s3://[bucket/x")
@example(text="file://[::1/x")
@example(text="/tmp/\ud800")
@example(text="s3://bucket/a/../b")
@example(text="s3://bucket")
@example(text="~/lake")
@example(text="file:///tmp/%ff%fe")
@example(text="s3://a..b/x")
@example(text="~nosuchuser/x")
@example(text="s3://bucket/a?versionId=1")
@example(text="file:///tmp/a#b")
def test_resolve_gives_a_location_or_one_data_error(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lake, "s3_filesystem", pafs.LocalFileSystem)  # parsing only: no AWS SDK set-up per example
    try:
        loc = lake.resolve(text)
    except DataError as e:
        assert "\n" not in str(e) and ". Fix: " in str(e)
        return
    if loc.uri.startswith("s3://"):
        assert loc.uri == "s3://" + text.split("://", 1)[1].strip("/")  # nothing dropped, nothing added
        assert not {"", ".", ".."} & set(loc.path.split("/")) and "\x00" not in loc.path
        assert lake.resolve(loc.uri).path == loc.path  # the canonical URI resolves to the same place
    else:
        assert loc.path.startswith("/") and "\x00" not in loc.path


USERINFO = string.ascii_letters + string.digits + "-._~!$&'()*+,;=%"
HOSTS = st.sampled_from(["mlflow", "mlflow.internal:5000", "127.0.0.1:5000", "[::1]:8080", "h"])


@settings(max_examples=scaled(200))
@given(scheme=st.sampled_from(["http", "https", "postgresql", "mysql+pymysql", "s3"]),
       user=st.text(alphabet=USERINFO, min_size=1, max_size=12),
       password=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
       host=HOSTS, path=st.sampled_from(["", "/", "/api/2.0", "/#/experiments/1/runs/abc", "/db?x=1"]))
def test_redaction_never_leaks_userinfo(scheme: str, user: str, password: str, host: str, path: str) -> None:
    """Credentials as they appear in a real URI (percent-encoded where the RFC requires it)."""
    secret = f"{quote(user, safe=USERINFO)}:{quote(password, safe='')}@"
    uri = f"{scheme}://{secret}{host}{path}"
    assert secret not in redact_uri(uri)
    line = redact_text(f"🏃 View run bright-owl-42 at: {uri} (and again: '{uri}')")
    assert secret not in line and "View run bright-owl-42 at: " in line


@settings(max_examples=scaled(200))
@given(st.text(max_size=60))
@example("http://[::1")
@example("http://u:p@[x/")
@example("a://b:c@d:99999999999/")
def test_redaction_never_raises(text: str) -> None:
    out = redact_text(text)
    assert isinstance(out, str) and isinstance(redact_uri(text), str)
    assert "@" not in out.split("://", 1)[1].split("/", 1)[0] if "://" in out and "@" not in text else True
