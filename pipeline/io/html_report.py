"""Self-contained HTML reports (one file, figures inlined as PNG data URIs) for people who would rather look
than read: the gate's decision, the daily output's monitoring. Opens from an MLflow artifact view or a laptop
without a server or network.

    r = HtmlReport("Gate report: recsys-pia v7")
    r.heading("Gates"); r.table(["gate", "value", "threshold", "verdict"], rows, marks=[True, False])
    r.figure(fig)  # a matplotlib figure
    path.write_text(r.render())

Every text passes through html.escape: model names, metric names and messages come from outside.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f6}td:first-child,th:first-child{text-align:left}
tr.pass td:first-child::before{content:"\\2714  ";color:#1a7f37}tr.fail td:first-child::before{content:"\\2718  ";color:#cf222e}
tr.fail{background:#fff0f0}tr.warn{background:#fff8e1}.verdict{font-size:1.1rem;font-weight:600;padding:.5rem;border-radius:4px}
.ok{background:#e6f4ea;color:#1a7f37}.bad{background:#fdecea;color:#cf222e}img{max-width:100%}p.note{color:#555}
"""


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant decimals, None as an em dash, the rest as text."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class HtmlReport:
    """Sections appended in order, rendered to one HTML document."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def verdict(self, text: str, ok: bool) -> None:
        """A coloured banner: the decision a reader looks for first."""
        self._parts.append(f'<div class="verdict {"ok" if ok else "bad"}">{html.escape(text)}</div>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]],
              marks: Sequence[bool | str | None] | None = None) -> None:
        """A table; `marks[i]` True/False tags row i as pass/fail (a check or cross before its first cell),
        "warn" highlights it, None leaves it plain."""
        if marks is not None and len(marks) != len(rows):
            raise ValueError(f"{len(marks)} marks for {len(rows)} rows")
        out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
        for i, row in enumerate(rows):
            mark = None if marks is None else marks[i]
            cls = {True: "pass", False: "fail", "warn": "warn"}.get(mark, "") if mark is not None else ""
            attr = f' class="{cls}"' if cls else ""
            out.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
        out.append("</table>")
        self._parts.append("".join(out))

    def figure(self, fig: Any, alt: str = "", dpi: int = 100) -> None:
        """A matplotlib figure, inlined as a PNG; the figure is closed."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.image(buf.getvalue(), alt)

    def image(self, png: bytes, alt: str = "") -> None:
        """PNG bytes (e.g. a plot already written for MLflow), inlined."""
        data = base64.b64encode(png).decode("ascii")
        self._parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def render(self) -> str:
        body = "\n".join(self._parts)
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")
