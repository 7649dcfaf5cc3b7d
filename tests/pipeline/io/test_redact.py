"""pipeline.io.redact: credentials never survive; everything that is not a secret comes back unchanged."""

from __future__ import annotations

import pytest

from pipeline.io.redact import MASK, redact_text, redact_uri, redact_values


@pytest.mark.parametrize(("uri", "expected"), [
    ("https://alice:s3cret@mlflow.example.com:5000/api", "https://mlflow.example.com:5000/api"),
    ("https://alice@mlflow.example.com", "https://mlflow.example.com"),
    ("https://a%40b:p@ss@host/x", "https://host/x"),  # a stray '@' in the password
    ("https://host/?x=1&token=t0k&X-Amz-Signature=s1g&api_key=k3y", f"https://host/?x=1&token={MASK}"
                                                                   f"&X-Amz-Signature={MASK}&api_key={MASK}"),
    ("https://u:p@host/#access_token=t0k", f"https://host/#access_token={MASK}"),
    ("mysql://root:pw@db:3306/mlflow?password=pw", f"mysql://db:3306/mlflow?password={MASK}"),
])
def test_credentials_are_removed(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


@pytest.mark.parametrize("value", ["sqlite:////tmp/home/mlflow.db", "s3://lake/snapshots/as_of=2026-01-01", "/data/x",
                                   "http://127.0.0.1:5000", "https://h/p?", "2026-01-01", "cuda:0", "weight>=4", ""])
def test_harmless_values_are_unchanged(value: str) -> None:
    assert redact_uri(value) == value


def test_unparseable_uri_is_masked_whole() -> None:
    assert redact_uri("https://u:pw@[::1") == MASK


def test_text_redacts_every_url_in_it() -> None:
    text = "API request to https://u:pw@h/api/2.0/x?token=t failed; retry http://a:b@other:5000/ later (u:pw stays)"
    assert redact_text(text) == (f"API request to https://h/api/2.0/x?token={MASK} failed; "
                                 "retry http://other:5000/ later (u:pw stays)")
    assert redact_text("no URL here: s3 bucket 'x'") == "no URL here: s3 bucket 'x'"


def test_nested_config_values() -> None:
    cfg = {"tracking_uri": "https://u:pw@h", "epochs": 3, "vae": {"dims": [16, "https://u:pw@x"]}, "none": None}
    assert redact_values(cfg) == {"tracking_uri": "https://h", "epochs": 3, "vae": {"dims": [16, "https://x"]},
                                  "none": None}
    assert cfg["tracking_uri"] == "https://u:pw@h"  # a copy: the caller's config still connects
