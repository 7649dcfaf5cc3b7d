"""Markdown rendering of experiment results (results.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from model.recommenders import CLOSED_FORM, epoch_budget

METRICS = ("recall@20", "recall@50", "ndcg@100")


def _ms(d: dict[str, float | None], digits: int = 4) -> str:
    m, s = d["mean"], d["std"]
    if m is None or math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _budget(cfg: dict[str, Any]) -> str:
    """The epoch budget, named only for the models that train by epochs (EASE and popularity are closed form)."""
    trained = [m for m in cfg["models"] if m not in CLOSED_FORM]
    if not trained:
        return "closed-form models only (no epochs)"
    recvae = [m for m in trained if m.startswith("recvae")]
    extra = f" (RecVAE {epoch_budget(recvae[0], cfg['epochs'], cfg['recvae_epochs'])})" if recvae else ""
    return f"max epochs {cfg['epochs']}{extra}, early-stop patience {cfg['patience']}"


def render(results: dict[str, Any]) -> str:
    """The results as a markdown table (mean ± std over seeds, PIA uplift, activity groups)."""
    data, cfg = results["data"], results["config"]
    lines = [
        f"### {results['dataset']}",
        "",
        f"{data['users']:,} users × {data['items']:,} items, {data['nnz']:,} positives after binarize "
        f"(rule {data.get('rule')}) and the >= {cfg['min_user_interactions']} filter. Seeds {results['seeds']}; "
        f"device: {results['machine']}; {_budget(cfg)}; wall {results['wall_seconds'] / 60:.1f} min.",
        *(["", f"**Partial run:** {len(results['seeds'])} of {results['seeds_planned']} planned seeds finished "
           "before the run was stopped; the figures below are over those seeds only."]
          if len(results["seeds"]) < results.get("seeds_planned", len(results["seeds"])) else []),
        *(["", f"**Resumed:** {len(results['resumed'])} fit(s) restored from the checkpoint of an earlier "
           f"run ({', '.join(results['resumed'])}); the wall time counts both runs."] if results.get("resumed") else []),
        "",
        "| model | Recall@20 | Recall@50 | NDCG@100 | coverage@20 | fit time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, agg in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(_ms(agg[m]) for m in METRICS) +
                     f" | {_ms(agg['coverage@20'], 3)} | {agg['fit_seconds']['mean']:.1f} |")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    if results.get("tune_only"):
        lines += ["", "**Tune only:** the searches ran on the first seed's validation users and stopped; no test user "
                  "was scored (run again without --tune-only, with --resume, to score the chosen values)."]
    if results["models"]:
        groups = results["models"][next(iter(results["models"]))]["groups"]
        lines += ["", "NDCG@100 by user activity (interactions per user; test users, mean ± std over seeds):", "",
                  "| model | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name, agg in results["models"].items():
        cells = [f"{_ms(g['ndcg@100'])} (n≈{g['users']:.0f})" for g in agg["groups"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("pia_uplift"):
        lines += ["", "PIA uplift (PIA − base on the same split, per seed):", "",
                  "| model | λ_A chosen | ΔNDCG@100 per seed | mean ΔNDCG@100 | relative | ΔRecall@20 mean | seeds improved |",
                  "|---|---|---|---|---|---|---|"]
        for name, u in results["pia_uplift"].items():
            per = ", ".join(f"{d:+.4f}" for d in u["diffs"]["ndcg@100"])
            rel = sum(u["ndcg@100_rel_pct"]) / max(1, len(u["ndcg@100_rel_pct"]))
            lines.append(f"| {name} vs {u['base']} | {_chosen(results['chosen'].get(name))} | {per} | "
                         f"{u['mean']['ndcg@100']:+.4f}" + (f" ± {sd:.4f}" if (sd := u['std']['ndcg@100']) is not None else "") +
                         f" | {rel:+.1f}% | "
                         f"{u['mean']['recall@20']:+.4f} | {u['seeds_improved']}/{len(u['diffs']['ndcg@100'])} |")
    if results.get("tuning"):
        lines += ["", "Hyperparameters searched on validation users (first seed's split):", "",
                  "| model | value | val NDCG@100 | val Recall@20 | best epoch |", "|---|---|---|---|---|"]
        for name, rows in results["tuning"].items():
            for r in rows:
                mark = " **(chosen)**" if r["value"] == results["chosen"].get(name) else ""
                lines.append(f"| {name} | {hp_label(r['value'])}{mark} | {r['val_ndcg@100']:.4f} | "
                             f"{r['val_recall@20']:.4f} | {int(r['best_epoch'])} |")
    return "\n".join(lines) + "\n"


def hp_label(value: Any) -> str:
    """A searched value as text: a number (l2, lambda_A), EDLAE's (l2, dropout) pair, or autoencoder settings."""
    if isinstance(value, dict):
        return ", ".join(f"{'λ_A' if k == 'lambda_a' else k}={_setting(v)}" for k, v in value.items())
    if isinstance(value, tuple | list):
        return f"l2={value[0]:g}, p={value[1]:g}"
    return f"{value:g}"


def _chosen(v: Any) -> str:
    return "–" if v is None else hp_label(v)


def _setting(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_setting(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def write_report(results: dict[str, Any], path: Path) -> None:
    """render() written to `path`."""
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(results))
    tmp.replace(path)
