"""The self-contained HTML report: escaping, pass/fail rows, inlined figures."""

from __future__ import annotations

import base64
import re

import pytest

from pipeline.io.html_report import HtmlReport, fmt


def test_text_from_outside_is_escaped() -> None:
    r = HtmlReport("model <script>alert(1)</script>")
    r.heading("a & b")
    r.paragraph("<b>x</b>")
    r.table(["metric"], [["<img src=x onerror=y>"]])
    page = r.render()
    assert "<script>" not in page and "<img src=x" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;" in page and "a &amp; b" in page


def test_rows_are_marked_pass_fail_or_warn() -> None:
    r = HtmlReport("t")
    r.table(["gate", "value"], [["ndcg", 0.41234], ["coverage", 12], ["drift", None]], marks=[True, False, "warn"])
    page = r.render()
    rows = re.findall(r'<tr class="(\w+)"><td>([^<]*)</td><td>([^<]*)</td>', page)
    assert rows == [("pass", "ndcg", "0.4123"), ("fail", "coverage", "12"), ("warn", "drift", "—")]


def test_marks_must_match_rows() -> None:
    with pytest.raises(ValueError, match="2 marks for 1 rows"):
        HtmlReport("t").table(["a"], [[1]], marks=[True, False])


def test_figure_is_inlined_as_png() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    r = HtmlReport("t")
    r.figure(fig, alt="curve")
    m = re.search(r'<img alt="curve" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', r.render())
    assert m is not None
    assert base64.b64decode(m.group(1)).startswith(b"\x89PNG")
    assert not plt.get_fignums()  # closed


def test_fmt() -> None:
    assert fmt(True) == "yes" and fmt(1234567) == "1,234,567" and fmt(123456.7) == "123,457" and fmt(0.5) == "0.5000"
