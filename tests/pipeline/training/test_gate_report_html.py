"""The gate's HTML report (pipeline.training.gate_html): rendered from GateResults built here (pass and fail), and
read back from a gated version's run (the gate tests' trained store: its candidate was trained with its no-PIA twin)."""

from __future__ import annotations

import re
from dataclasses import replace
from html import unescape
from pathlib import Path

import pytest

from pipeline.io import registry
from pipeline.training.gate_html import NO_HISTORY, RunFacts, report_html
from pipeline.training.gate_report import run_facts
from pipeline.training.gates import GateConfig, GateResult, check, passed

from .conftest import NAME, gate

CFG = GateConfig(floors={"ndcg@100": 0.05}, latent_floors={"active_units": 4})
CAND = {"recall@20": 0.30, "recall@50": 0.42, "ndcg@100": 0.35, "coverage@20": 0.50, "mean_popularity@20": 0.01}
CHAMP = {"recall@20": 0.29, "recall@50": 0.41, "ndcg@100": 0.34, "coverage@20": 0.45, "mean_popularity@20": 0.02}
BASE = {"popularity": {"recall@20": 0.10, "recall@50": 0.20, "ndcg@100": 0.15, "coverage@20": 0.05},
        "ease": {"recall@20": 0.31, "recall@50": 0.43, "ndcg@100": 0.36, "coverage@20": 0.30}}
TWIN = ("multivae", {"recall@20": 0.27, "recall@50": 0.40, "ndcg@100": 0.3125, "coverage@20": 0.40})
FACTS = RunFacts(histories={"multivae-pia (candidate)": [{"epoch": 1.0, "loss": 9.0, "beta": 0.1, "val_ndcg@100": 0.2},
                                                        {"epoch": 2.0, "loss": 8.0, "beta": 0.2, "val_ndcg@100": 0.3}],
                            "multivae (no PIA)": [{"epoch": 1.0, "loss": 9.5, "val_ndcg@100": 0.1}]},
                 twin=TWIN, diagnostics={"multivae-pia (candidate)": {"active_units": 6.0, "kl_mean": 2.5},
                                         "multivae (no PIA)": {"active_units": 2.0, "kl_mean": 0.5}},
                 diag_status="ok")


def result(candidate: dict[str, float], promoted: bool = True, warnings: tuple[str, ...] = ()) -> GateResult:
    """A GateResult as GateJob builds it: the real checks, the columns of its metric table."""
    verdicts = check(CFG, candidate, CHAMP, BASE, 0, 0, diagnostics={"active_units": 6.0})
    ok = passed(verdicts)
    table = {"candidate v3": candidate, "champion v2": CHAMP} | {f"baseline {k}": v for k, v in BASE.items()}
    return GateResult(model_name=NAME, version="3", passed=ok, promoted=ok and promoted, champion="2", verdicts=verdicts,
                      metrics=table, warnings=list(warnings))


def rows(doc: str) -> dict[str, tuple[str, list[str]]]:
    """Every table row by its first cell: (its class: pass / fail / warn / '', its cells unescaped)."""
    out = {}
    for cls, body in re.findall(r'<tr(?: class="(\w+)")?>(.*?)</tr>', doc):
        cells = [unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", body)]
        out.setdefault(cells[0], (cls, cells))
    return out


def banner(doc: str) -> tuple[str, str]:
    m = re.search(r'<div class="verdict (ok|bad)">(.*?)</div>', doc)
    assert m is not None
    return m.group(1), unescape(m.group(2))


def section(doc: str, title: str) -> str:
    """The HTML between heading `title` and the next heading."""
    return doc.split(f"<h2>{title}</h2>", 1)[1].split("<h2>", 1)[0]


def test_a_promotion_leads_with_a_green_banner_and_every_gate_row_passes() -> None:
    o = result(CAND)
    doc = report_html(o, CFG, "enabled", FACTS)
    assert o.passed and banner(doc) == ("ok", f"PROMOTED: {NAME} version 3 is now champion (all 10 applicable gates passed)")
    assert doc.index('class="verdict') < doc.index("<h2>Gates</h2>")  # the decision first
    r = rows(section(doc, "Gates"))
    assert [g for g in r if g != "gate"] == [v.gate for v in o.verdicts]
    assert all(r[v.gate][0] == "pass" and r[v.gate][1][5] == "pass" for v in o.verdicts)
    # gate, candidate, threshold, compared with, its value, status, detail
    assert r["floor.ndcg@100"][1][:4] == ["floor.ndcg@100", "0.3500", "0.0500", "absolute floor"]
    assert r["champion.ndcg@100"][1][1:5] == ["0.3500", f"{0.34 * 0.98:.4f}", "champion v2 (tolerance 0.02)", "0.3400"]
    assert r["baseline.popularity"][1][1:5] == ["0.3500", f"{0.15 * 1.05:.4f}", "popularity ndcg@100 (margin +0.05)",
                                                "0.1500"]
    assert r["baseline.ease"][1][2:5] == [f"{0.36 * 0.85:.4f}", "EASE ndcg@100 (margin -0.15)", "0.3600"]
    assert r["coverage"][1][1:3] == ["0.5000", "0.0500"] and r["sanity.nan"][1][1:3] == ["0", "0"]
    assert r["latent.active_units"][1][1:3] == ["6.0000", "4.0000"]


def test_models_side_by_side_have_the_champion_twin_and_baseline_columns() -> None:
    doc = report_html(result(CAND), CFG, "enabled", FACTS)
    r = rows(section(doc, "Models side by side"))
    assert r["metric"][1] == ["metric", "candidate v3", "champion v2", "no-PIA twin multivae", "baseline popularity",
                              "baseline ease"]
    assert r["ndcg@100"][1][1:] == ["0.3500", "0.3400", "0.3125", "0.1500", "0.3600"]
    assert r["mean_popularity@20"][1][1:] == ["0.0100", "0.0200", "—", "—", "—"]  # only where measured
    assert "data:image/png;base64," in section(doc, "Models side by side")  # the comparison chart


def test_training_curves_and_latent_diagnostics_with_and_without_pia() -> None:
    doc = report_html(result(CAND), CFG, "enabled", FACTS)
    curves = section(doc, "Training curves")
    assert "data:image/png;base64," in curves and NO_HISTORY not in doc
    assert rows(curves)["multivae-pia (candidate)"][1] == ["multivae-pia (candidate)", "2", "2", "0.3000"]
    latent = rows(section(doc, "Latent diagnostics"))
    assert latent["latent.active_units"][0] == "pass"
    assert latent["diagnostic"][1] == ["diagnostic", "multivae-pia (candidate)", "multivae (no PIA)"]
    assert latent["kl_mean"][1][1:] == ["2.5000", "0.5000"]


def test_a_rejection_is_a_red_banner_naming_the_failed_gates_with_their_rows_marked() -> None:
    worse = CAND | {"ndcg@100": 0.20}  # below the champion's 0.34 * 0.98 and EASE's 0.36 * 0.85, above popularity's
    o = result(worse, warnings=("snapshot digest missing: cannot verify <the build>",))
    doc = report_html(o, CFG, "enabled", RunFacts())
    assert not o.passed
    assert banner(doc) == ("bad", f"REJECTED: {NAME} version 3 stays challenger (failed: champion.ndcg@100, baseline.ease)")
    r = rows(section(doc, "Gates"))
    assert r["champion.ndcg@100"][0] == "fail" and r["baseline.ease"][0] == "fail" and r["floor.ndcg@100"][0] == "pass"
    assert r["champion.ndcg@100"][1][5] == "fail"
    # the missing history is a note, not an error; no twin, no diagnostics: said so
    assert f"{NO_HISTORY}: the run has no per-epoch metrics." in section(doc, "Training curves")
    assert "No no-PIA twin on the training run" in doc and "No latent diagnostics on the training run" in doc
    assert rows(section(doc, "Models side by side"))["metric"][1][1:3] == ["candidate v3", "champion v2"]
    warn = rows(section(doc, "Warnings"))
    assert warn["snapshot digest missing: cannot verify <the build>"][0] == "warn"  # escaped in, unescaped back
    assert "&lt;the build&gt;" in doc and "<the build>" not in doc


def test_dry_run_and_a_first_model_and_no_run_at_all() -> None:
    verdicts = check(CFG, CAND, None, {}, 0, 0, diagnostics={"active_units": 6.0})
    o = GateResult(model_name=NAME, version="1", passed=passed(verdicts), promoted=False, champion=None,
                   verdicts=verdicts, metrics={"candidate v1": CAND})
    doc = report_html(o, CFG, "dry-run", None)
    assert banner(doc) == ("bad", f"FAILED (dry-run): {NAME} version 1 would be rejected; nothing was moved "
                                  "(failed: baseline.popularity, baseline.ease)")  # no baselines: fail closed
    r = rows(section(doc, "Gates"))
    assert r["champion.ndcg@100"][0] == "" and r["champion.ndcg@100"][1][5] == "skipped"  # no mark for skipped
    assert f"{NO_HISTORY}: the version names no training run (no run_id tag)." in doc
    assert "No champion at gate time" in doc and "No baselines recorded" in doc


def test_an_unreadable_run_is_a_note_not_an_error(home: Path) -> None:
    facts = run_facts("0" * 32)  # the home store has no such run
    assert facts.histories == {} and "could not be read" in facts.history_note and facts.notes
    doc = report_html(result(CAND), CFG, "enabled", facts)
    assert NO_HISTORY in section(doc, "Training curves") and "could not be read" in section(doc, "Warnings")


def test_the_html_report_is_an_artifact_of_the_gated_run_with_its_curves_and_twin(trained: dict[str, str],
                                                                                   easy_gates: GateConfig) -> None:
    o = gate(trained["good"], gates=easy_gates)
    assert o.promoted and o.html_report is not None and o.html_report.endswith("gate/enabled/gate_report.html")
    c = registry.client()
    run = trained["good_run"]
    assert "gate/enabled/gate_report.html" in {a.path for a in c.list_artifacts(run, "gate/enabled")}
    doc = Path(c.download_artifacts(run, "gate/enabled/gate_report.html", str(Path(trained["home"])))).read_text()
    assert banner(doc)[0] == "ok" and NO_HISTORY not in doc  # the histories came from the run's metric history
    curves = rows(section(doc, "Training curves"))
    assert curves["multivae-pia (candidate)"][1][1] == "5" and curves["multivae (no PIA)"][1][1] == "5"  # 5 epochs each
    header = rows(section(doc, "Models side by side"))["metric"][1]
    assert header[1] == f"candidate v{trained['good']}" and "no-PIA twin multivae" in header
    assert "baseline popularity" in header
    head = rows(section(doc, "New titles (cold head)"))  # the run's cold_head.* tags
    assert head["status"][1][1] == c.get_run(run).data.tags["cold_head.status"]


def test_a_failed_html_upload_is_a_warning_and_no_uri(trained: dict[str, str], easy_gates: GateConfig,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.training import gate_report

    def boom(*a, **kw):
        raise OSError("no space left")

    monkeypatch.setattr(gate_report, "report_html", boom)
    o = gate(trained["good"], gates=easy_gates)
    assert o.passed and o.promoted and o.html_report is None
    assert any("HTML report on run" in w and "OSError: no space left" in w for w in o.warnings)


def test_report_shows_the_ablation_and_every_candidate_side_by_side() -> None:
    from pipeline.training.gate_report import report_markdown
    from pipeline.training.gates import Ablation, CandidateRow

    ab = Ablation(model="multivae-pia", twin="multivae", twin_metrics={"ndcg@100": 0.40}, users=60)
    verdicts = check(CFG, CAND, CHAMP, BASE, 0, 0, diagnostics={"active_units": 6.0}, ablation=ab)
    assert passed(verdicts)  # the ablation warns by default
    rows_in = [CandidateRow(version="3", model="multivae-pia", primary=0.35, verdicts={v.gate: v.status for v in verdicts},
                            passed=True, promoted=False, note="candidate v4 (recvae-pia) passed with a better ndcg@100"),
               CandidateRow(version="4", model="recvae-pia", primary=0.37, verdicts={"floor.ndcg@100": "pass"},
                            passed=True, promoted=True),
               CandidateRow(version="5", model="ease", primary=0.41, verdicts={"floor.ndcg@100": "pass",
                                                                               "latent.active_units": "fail"},
                            passed=False, promoted=False, note="failed latent.active_units")]
    table = {"candidate v3": CAND, "champion v2": CHAMP, "no-PIA twin multivae": {"ndcg@100": 0.40}}
    res = GateResult(model_name=NAME, version="3", passed=True, promoted=False, champion="2", verdicts=verdicts,
                     metrics=table, candidates=rows_in, held="candidate v4 (recvae-pia) passed with a better ndcg@100")
    doc = report_html(res, CFG, "enabled", FACTS)
    abl = section(doc, "Ablation: PIA against its no-PIA twin")
    assert "PIA hurt this week" in unescape(abl) and "0.3500" in unescape(abl) and "0.4000" in unescape(abl)
    got = rows(section(doc, "Candidates"))
    assert got["candidate"][1][:3] == ["candidate", "family", "ndcg@100"] and got["candidate"][1][-2:] == ["passed", "promoted"]
    assert got["v4"][0] == "pass" and got["v4"][1][1] == "recvae-pia" and got["v4"][1][-1] == "yes"
    assert got["v3 (this report)"][1][-1].startswith("no: candidate v4") and "warn" in got["v3 (this report)"][1]
    ease_row = got["v5"][1]
    assert ease_row[1] == "ease" and ease_row[-2] == "no" and "fail" in ease_row
    gates_table = rows(section(doc, "Gates"))
    assert gates_table["ablation.pia"][0] == "warn" and gates_table["ablation.pia"][1][4] == "0.4000"  # its value: the twin's
    assert banner(doc)[1].startswith("PASSED but not promoted") and "candidate v4" in banner(doc)[1]
    md = report_markdown(res, CFG, "enabled")
    assert "## Candidates" in md and "| v5 | ease | 0.4100 |" in md and "| ablation.pia | warn | PIA hurt" in md


def test_the_cold_head_section_shows_the_tuning_grid_and_the_choice() -> None:
    head = {"status": "built", "kind": "eq5", "blocks": "tags,year", "delta": "10.0", "neighbours": "20",
            "tuned": "delta=10 neighbours=20 ndcg=0.2432 (114 titles held out, 759 users)",
            "tune_grid": "1/0=0.1796;1/20=0.2378;10/0=0.1731;10/20=0.2432", "mu": "0.3"}
    doc = section(report_html(result(CAND), CFG, "enabled", replace(FACTS, cold_head=head)), "New titles (cold head)")
    table = rows(doc)
    assert table["neighbours"][1] == ["neighbours", "20"] and table["tuned"][1][1].startswith("delta=10 neighbours=20")
    assert "mu" not in table  # what an operator reads, not every tag
    assert table["δ"][1] == ["δ", "dense", "k = 20"]
    assert table["10"] == ("pass", ["10", "0.1731", "0.2432"]) and table["1"][0] == ""  # the chosen δ ticked
    assert "its neighbourhood: 20" in doc


def test_a_skipped_or_missing_cold_head_says_so() -> None:
    skipped = {"status": "skipped", "reason": "snapshot built without items"}
    doc = section(report_html(result(CAND), CFG, "enabled", replace(FACTS, cold_head=skipped)), "New titles (cold head)")
    assert rows(doc)["status"][0] == "warn" and rows(doc)["reason"][1][1] == "snapshot built without items"
    assert "logged no cold head" in section(report_html(result(CAND), CFG, "enabled", FACTS), "New titles (cold head)")
