"""The gate's HTML report (`gate_report.html` on the candidate's run, next to the markdown one): the decision first,
then each gate with its value and threshold, every model side by side, the training curves, the latent
diagnostics and the warnings. Pure: the GateResult, its GateConfig and what was read from the candidate's
training run (RunFacts, read by pipeline.training.gate_report) in, one self-contained HTML document out.

Whatever the run could not provide (no per-epoch metrics, no twin, no diagnostics, an unreadable run) is a
note in its section, never an error: the report is best-effort, like its upload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.html_report import HtmlReport
from pipeline.training.gates import GateCheck, GateConfig, GateResult

SELECT_METRIC = "val_ndcg@100"  # the trainer's epoch selection metric (model.train.TrainConfig.select_metric)
NO_HISTORY = "Training curves unavailable"


@dataclass(frozen=True)
class RunFacts:
    """What the report reads from the candidate's training run; every part may be empty.

    `histories`: label ('multivae-pia (candidate)', 'multivae (no PIA)') → per-epoch records (`epoch`, and
    `loss`, `beta`, `val_ndcg@100` when logged; the candidate's label ends in '(candidate)'); `twin`: the no-PIA
    twin's name and its test metrics (gate metric names, measured by training on the same test users);
    `diagnostics`: label → latent diagnostics (`diag.*` without the prefix, per-group values left out), labelled
    as `histories`; `diag_status`: the run's `diag.status` tag; `history_note`: why there are no histories;
    `notes`: problems reading the run (listed with the warnings); `cold_head`: the run's `cold_head.*` tags without
    the prefix (how the bundle's cold head was built, and the δ × neighbours grid it was tuned on)."""

    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    twin: tuple[str, dict[str, float]] | None = None
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    diag_status: str | None = None
    history_note: str = "the run has no per-epoch metrics"
    notes: tuple[str, ...] = ()
    cold_head: dict[str, str] = field(default_factory=dict)


def report_html(result: GateResult, cfg: GateConfig, mode: str, facts: RunFacts | None = None) -> str:
    """The whole report as one HTML document (figures inlined). `facts` None: the version has no training run."""
    facts = facts if facts is not None else RunFacts(history_note="the version names no training run (no run_id tag)")
    r = HtmlReport(f"Gate report: {result.model_name} version {result.version}")
    banner, ok = verdict_text(result, mode)
    r.verdict(banner, ok)
    champ = f"version {result.champion}" if result.champion else "none (first model, or the candidate itself)"
    r.paragraph(f"Mode: {mode}. Champion at gate time: {champ}. Warnings: {len(result.warnings)}.")
    _gates(r, result, cfg, facts)
    _ablation(r, result, cfg)
    _candidates(r, result, cfg)
    _side_by_side(r, result, cfg, facts)
    _curves(r, facts)
    _latent(r, result, facts)
    _cold_head(r, facts)
    _warnings(r, result, facts)
    return r.render()


def verdict_text(result: GateResult, mode: str) -> tuple[str, bool]:
    """The banner: the decision and why, and whether it is good news."""
    failed = [v.gate for v in result.verdicts if v.status == "fail"]
    skipped = sum(v.status == "skipped" for v in result.verdicts)
    warned = [v.gate for v in result.verdicts if v.status == "warn"]
    who = f"{result.model_name} version {result.version}"
    why_ok = f"all {len(result.verdicts) - skipped - len(warned)} applicable gates passed" + \
        (f", {skipped} skipped" if skipped else "") + (f", warning: {', '.join(warned)}" if warned else "")
    why_bad = "failed: " + ", ".join(failed)
    if mode == "dry-run":
        return (f"PASSED (dry-run): {who} would be promoted; nothing was moved ({why_ok})" if result.passed else
                f"FAILED (dry-run): {who} would be rejected; nothing was moved ({why_bad})"), result.passed
    if result.promoted:
        return f"PROMOTED: {who} is now champion ({why_ok})", True
    if result.passed and result.held:
        return f"PASSED but not promoted: {who} ({why_ok}); {result.held}", True
    if result.passed:
        return f"PASSED but not promoted: {who} ({why_ok})", True
    return f"REJECTED: {who} stays challenger ({why_bad})", False


# -- sections -----------------------------------------------------------------------------------------------------


def _columns(result: GateResult) -> tuple[dict[str, float], dict[str, float] | None, dict[str, dict[str, float]]]:
    """The candidate's, the champion's and the baselines' metrics from the result's table (GateJob's column names)."""
    cand = next((v for k, v in result.metrics.items() if k.startswith("candidate")), {})
    champ = next((v for k, v in result.metrics.items() if k.startswith("champion")), None)
    base = {k.removeprefix("baseline "): v for k, v in result.metrics.items() if k.startswith("baseline ")}
    return cand, champ, base


def gate_rows(result: GateResult, cfg: GateConfig, facts: RunFacts) -> list[list[Any]]:
    """One row per gate: gate, candidate's value, threshold, compared with, its value, status, detail. The values
    are re-derived with the rules of pipeline.training.gates (the detail is the gate's own line)."""
    cand, champ, base = _columns(result)
    latent = facts.diagnostics.get(_candidate_label(facts), {})
    p, cov = cfg.primary, f"coverage@{cfg.top_n}"
    rows = []
    for v in result.verdicts:
        value: float | None = None
        threshold: float | None = None
        against, other = "", None
        g = v.gate
        if g.startswith("floor."):
            m = g.removeprefix("floor.")
            value, threshold, against = cand.get(m), cfg.floors.get(m), "absolute floor"
        elif g.startswith("champion."):
            m = g.removeprefix("champion.")
            value = cand.get(m)
            if champ is not None and m in champ and v.status != "skipped":
                other = champ[m]
                threshold = other * (1 - cfg.champion_tolerance)
                against = f"champion v{result.champion} (tolerance {cfg.champion_tolerance:g})"
            else:
                against = "champion"
        elif g in ("baseline.popularity", "baseline.ease"):
            name = g.removeprefix("baseline.")
            value = cand.get(p)
            b = base.get(name, {}).get(p)
            if b is not None:
                margin = cfg.popularity_margin if name == "popularity" else -cfg.ease_margin
                other, threshold = b, b * (1 + margin)
                against = f"{'EASE' if name == 'ease' else name} {p} (margin {margin:+g})"
            else:
                against = f"{name} baseline (none recorded)"
        elif g == "coverage":
            value, threshold, against = cand.get(cov), cfg.coverage_floor, f"{cov} floor"
        elif g.startswith("sanity."):
            value, threshold, against = _leading_number(v.detail), 0, "must be zero"
        elif g == "ablation.pia":
            value = cand.get(p)
            twin = next(((k.removeprefix("no-PIA twin "), v) for k, v in result.metrics.items()
                         if k.startswith("no-PIA twin ")), facts.twin)
            if twin is not None and p in twin[1] and v.status != "skipped":
                other = twin[1][p]
                threshold = other * (1 - cfg.ablation_tolerance)
                against = f"no-PIA twin {twin[0]} {p} (tolerance {cfg.ablation_tolerance:g})"
            else:
                against = "no-PIA twin"
        elif g.startswith("latent."):
            name = g.removeprefix("latent.")
            value, threshold, against = latent.get(name), cfg.latent_floors.get(name), "latent floor (collapse)"
        rows.append([g, value, threshold, against, other, v.status, v.detail])
    return rows


def _mark(v: GateCheck) -> bool | str | None:
    marks: dict[str, bool | str] = {"pass": True, "fail": False, "warn": "warn"}
    return marks.get(v.status)


def _gates(r: HtmlReport, result: GateResult, cfg: GateConfig, facts: RunFacts) -> None:
    r.heading("Gates")
    r.table(["gate", "candidate", "threshold", "compared with", "its value", "status", "detail"],
            gate_rows(result, cfg, facts), marks=[_mark(v) for v in result.verdicts])
    r.paragraph(f"Metrics on the candidate's snapshot test users; the champion is re-scored on the same users. "
                f"Primary metric: {cfg.primary}; coverage and sanity over top-{cfg.top_n} lists.", note=True)


def _ablation(r: HtmlReport, result: GateResult, cfg: GateConfig) -> None:
    r.heading("Ablation: PIA against its no-PIA twin")
    v = next((v for v in result.verdicts if v.gate == "ablation.pia"), None)
    if v is None:
        r.paragraph("No ablation verdict (gated by an older gate).", note=True)
        return
    r.table(["gate", "status", "detail"], [[v.gate, v.status, v.detail]], marks=[_mark(v)])
    r.paragraph(f"A PIA model must reach its no-PIA twin's {cfg.primary} within a relative tolerance of "
                f"{cfg.ablation_tolerance:g}; " + ("a shortfall fails the gate (ablation_blocks: true)." if
                                                   cfg.ablation_blocks else "a shortfall warns (ablation_blocks: false)."),
                note=True)


def candidate_table(result: GateResult, cfg: GateConfig) -> tuple[list[str], list[list[Any]], list[bool | None]]:
    """Every candidate of the group side by side: header, rows (candidate, family, primary metric, each gate's status,
    promoted) and the row marks (the promoted one ticked)."""
    gates = list(dict.fromkeys(g for row in result.candidates for g in row.verdicts))
    header = ["candidate", "family", cfg.primary, *gates, "passed", "promoted"]
    rows = [[f"v{c.version}" + (" (this report)" if c.version == result.version else ""), c.model, c.primary,
             *(c.verdicts.get(g, "-") for g in gates), "yes" if c.passed else "no",
             "yes" if c.promoted else ("no: " + c.note if c.note else "no")] for c in result.candidates]
    return header, rows, [True if c.promoted else None for c in result.candidates]


def _candidates(r: HtmlReport, result: GateResult, cfg: GateConfig) -> None:
    if not result.candidates:
        return
    r.heading("Candidates")
    header, rows, marks = candidate_table(result, cfg)
    r.table(header, rows, marks=marks)
    r.paragraph(f"Trained on the same snapshot and gated on the same test users; the best {cfg.primary} among the "
                "candidates that pass every gate is promoted, the others stay registered.", note=True)


def metric_table(result: GateResult, cfg: GateConfig, facts: RunFacts) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the side-by-side table: one row per metric, one column per model."""
    cols = dict(result.metrics)
    cand_key = next((k for k in cols if k.startswith("candidate")), None)
    if facts.twin is not None:  # right after the candidate and champion, before the baselines
        keep = [k for k in cols if not k.startswith("baseline ")]
        twin = {f"no-PIA twin {facts.twin[0]}": facts.twin[1]}
        cols = {k: cols[k] for k in keep} | twin | {k: v for k, v in cols.items() if k.startswith("baseline ")}
    first = [*cfg.metrics, f"coverage@{cfg.top_n}"]
    rest = sorted({m for m in (cols.get(cand_key, {}) if cand_key else {}) if m not in first})
    rows = [[m, *(v.get(m) for v in cols.values())] for m in [*first, *rest]]
    return ["metric", *cols], [row for row in rows if any(x is not None for x in row[1:])]


def _side_by_side(r: HtmlReport, result: GateResult, cfg: GateConfig, facts: RunFacts) -> None:
    from pipeline.training import plots

    r.heading("Models side by side")
    header, rows = metric_table(result, cfg, facts)
    r.table(header, rows)
    notes = []
    if result.champion is None:
        notes.append("No champion at gate time: the champion gates were skipped.")
    if facts.twin is None:
        notes.append("No no-PIA twin on the training run (a model without PIA, or trained with compare_base: false).")
    else:
        notes.append(f"The twin ({facts.twin[0]}, same model without PIA) was measured by training on the same test "
                     "users; it is compared, not gated.")
    if not any(k.startswith("baseline ") for k in result.metrics):
        notes.append("No baselines recorded (trained with baselines: false).")
    for n in notes:
        r.paragraph(n, note=True)
    chart_cols = {h: {row[0]: row[i] for row in rows if row[i] is not None} for i, h in enumerate(header) if i}
    r.figure(plots.gate_chart_figure(chart_cols, [*cfg.metrics, f"coverage@{cfg.top_n}"]), alt="metrics by model")


def _curves(r: HtmlReport, facts: RunFacts) -> None:
    from pipeline.training import plots

    r.heading("Training curves")
    if not any(facts.histories.values()):
        r.paragraph(f"{NO_HISTORY}: {facts.history_note}.", note=True)
        return
    r.figure(plots.training_curves_figure(facts.histories, SELECT_METRIC), alt="loss, beta and validation metric per epoch")
    best = []
    for label, hist in facts.histories.items():
        vals = [(rec[SELECT_METRIC], int(rec["epoch"])) for rec in hist if SELECT_METRIC in rec]
        if vals:
            top = max(vals, key=lambda t: (t[0], -t[1]))  # the first epoch reaching the best value, as the trainer picks
            best.append([label, len(hist), top[1], top[0]])
    if best:
        r.table(["model", "epochs", "best epoch", f"best {SELECT_METRIC}"], best)


def _latent(r: HtmlReport, result: GateResult, facts: RunFacts) -> None:
    r.heading("Latent diagnostics")
    gates = [v for v in result.verdicts if v.gate.startswith("latent.")]
    if gates:
        r.table(["gate", "status", "detail"], [[v.gate, v.status, v.detail] for v in gates], marks=[_mark(v) for v in gates])
    else:
        r.paragraph("No latent gate (latent_floors is empty in the gate config).", note=True)
    if facts.diagnostics:
        labels = list(facts.diagnostics)
        names = list(dict.fromkeys(k for d in facts.diagnostics.values() for k in d))
        r.table(["diagnostic", *labels], [[k, *(_whole(facts.diagnostics[lab].get(k)) for lab in labels)] for k in names])
    else:
        r.paragraph("No latent diagnostics on the training run (trained with diagnose: false, or not an autoencoder).",
                    note=True)
    if facts.diag_status:
        r.paragraph(f"diag.status: {facts.diag_status}", note=True)


COLD_HEAD_FIELDS = ("status", "reason", "kind", "blocks", "delta", "neighbours", "tuned", "tune_reason",
                    "items_with_metadata")


def tune_grid(text: str) -> tuple[list[str], list[list[Any]]]:
    """The run's `cold_head.tune_grid` ("δ/k=ndcg;...") as a table: one row per δ, one column per neighbourhood."""
    cells: dict[str, dict[str, float]] = {}
    for part in filter(None, text.split(";")):
        m = re.fullmatch(r"([^/]+)/(\d+)=([-\d.eE+na]+)", part.strip())
        if m:
            cells.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    ks = sorted({k for row in cells.values() for k in row}, key=int)
    header = ["δ", *("dense" if k == "0" else f"k = {k}" for k in ks)]
    return header, [[d, *(row.get(k) for k in ks)] for d, row in cells.items()]


def _cold_head(r: HtmlReport, facts: RunFacts) -> None:
    r.heading("New titles (cold head)")
    head = facts.cold_head
    if not head:
        r.paragraph("The training run logged no cold head (trained before it existed, or not read).", note=True)
        return
    fields = [k for k in COLD_HEAD_FIELDS if k in head]
    r.table(["cold head", "value"], [[k, head[k]] for k in fields],
            marks=["warn" if (k == "status" and head[k] != "built") or k.endswith("reason") else None for k in fields])
    if "tune_grid" in head:
        header, rows = tune_grid(head["tune_grid"])
        chosen = (head.get("delta"), head.get("neighbours"))
        marks: list[bool | str | None] = [True if chosen[0] is not None and float(row[0]) == float(chosen[0]) else None
                                          for row in rows]
        r.table(header, rows, marks=marks)
        r.paragraph("NDCG@25 of titles held out of this week's clicks, ranked by the head fitted without them, for "
                    "each δ and neighbourhood; the ticked δ is the head's (its neighbourhood: "
                    f"{'dense' if chosen[1] in ('0', None) else chosen[1]}).", note=True)


def _warnings(r: HtmlReport, result: GateResult, facts: RunFacts) -> None:
    r.heading("Warnings")
    rows = [[w] for w in result.warnings] + [[f"report: {n}"] for n in facts.notes]
    if rows:
        r.table(["warning"], rows, marks=["warn"] * len(rows))
    else:
        r.paragraph("None.", note=True)


def _candidate_label(facts: RunFacts) -> str:
    return next((k for k in facts.diagnostics if k.endswith("(candidate)")), "")


def _whole(v: float | None) -> float | int | None:
    """Counts logged as MLflow floats (users, active_units) shown as integers."""
    return int(v) if v is not None and float(v).is_integer() else v


def _leading_number(text: str) -> int | None:
    m = re.match(r"\s*(\d+)\b", text)
    return int(m.group(1)) if m else None
