"""`recsys diagnose`: DiagnoseJob measures the latent geometry of a trained autoencoder (model.diagnostics: mask
drift, near vs far-but-related W2 distances, KL budget and active units) on a sample of a snapshot's validation
users, and logs it to the version's MLflow run: metrics `diag.*`, `diagnostics/summary.json` and plots under
`diagnostics/`. The training job runs the same step (`log_training_diagnostics`) for the candidate and its
no-PIA twin while both are in memory.

What a registered version holds, and so what can be diagnosed later:
- the model's weights (the bundle), not its PIA anchors (training-only, never saved): the anchor-centroid
  distance is measured where the anchors exist, i.e. by the training job (diag.anchor_distance on the run),
  never from a bundle;
- not the no-PIA twin's weights (training logs only its metrics): the twin's diagnostics are computed at
  training time and stored on the run (`diag.compare.<twin>.*`, `diagnostics/twin.json`); `recsys diagnose`
  reads that file back to draw the two side by side.

Bad input is one DataError line before anything is logged: a sample larger than the users with a history, fewer
than 2 views (pydantic, at construction), a snapshot whose items are not the model's. A model without a latent
posterior (popularity, EASE) is "not applicable" (the result says why, `diag.status` tag); a Multi-DAE (codes
without variances) gets the metrics that apply (distances between codes; no KL).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.job import Job, JobResult
from pipeline.training.evaluation import activity_groups

log = logging.getLogger(__name__)

PREFIX = "diag."
SUMMARY, TWIN = "summary.json", "twin.json"
ARTIFACT_DIR = "diagnostics"


class DiagnoseResult(JobResult):
    """The model diagnosed, where it was logged (run_id None: not logged), whether diagnostics apply, and the
    metrics (names without the `diag.` prefix; `compare.<twin>.*` when the twin's were stored at training)."""

    model: str
    version: str | None
    run_id: str | None
    applicable: bool
    reason: str
    metrics: dict[str, float]
    artifacts: list[str] = Field(default_factory=list)


class DiagnoseJob(Job):
    """Diagnose a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) or a bundle folder."""

    model: str
    snapshot: str | None = Field(None, description="default: the version's snapshot_uri tag (a bundle: its config's)")
    users: int = Field(1000, ge=3, description="validation users sampled")
    views: int = Field(8, ge=2, description="K masked views per user")
    neighbours: int = Field(10, ge=1, description="k nearest latent neighbours")
    seed: int = 0
    log_to_run: bool = Field(True, description="log to the version's MLflow run (registered models only)")
    out: Path | None = Field(None, description="also write the summary and plots to this folder")
    tracking_uri: str | None = None

    def run(self) -> DiagnoseResult:
        with registry.tracking_errors(self.tracking_uri):
            return self._run()

    def _run(self) -> DiagnoseResult:
        from pipeline.io.snapshot import load_snapshot

        bundle, version, tags = self._load()
        snapshot = self.snapshot or tags.get("snapshot_uri") or bundle.config.get("snapshot")
        if not snapshot:
            raise DataError(f"{self.model} names no snapshot", "pass --snapshot (the snapshot it was trained on)")
        snap = load_snapshot(str(snapshot))
        if len(bundle.item_ids) != len(snap.item_ids) or not np.array_equal(bundle.item_ids.astype(str),
                                                                            snap.item_ids.astype(str)):
            raise DataError(f"snapshot {snapshot} has other items than {self.model} ({len(snap.item_ids)} vs "
                            f"{len(bundle.item_ids)})", "diagnose a model on the snapshot it was trained on")
        run_id = tags.get("run_id") if self.log_to_run and version is not None else None
        module = getattr(bundle.recommender, "module", None)
        if module is None or not hasattr(module, "encode"):
            reason = f"not applicable: {bundle.name} has no latent posterior (not an autoencoder)"
            if run_id:
                registry.client(self.tracking_uri).set_tag(run_id, PREFIX + "status", reason)
            return DiagnoseResult(model=self.model, version=version, run_id=run_id, applicable=False, reason=reason,
                                  metrics={})
        summaries = {bundle.name: self._diagnose(module, snap)}
        twin = _stored_twin(tags["run_id"], self.tracking_uri) if tags.get("run_id") else None
        if twin is not None:
            summaries[twin["name"]] = twin["summary"]
        reason = _reason(summaries[bundle.name], anchors_saved=False)
        with tempfile.TemporaryDirectory(prefix="recsys-diag-") as tmp:
            files = write_outputs(summaries, bundle.name, Path(tmp))  # everything is computed before anything is logged
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                for f in files:
                    (self.out / f.name).write_bytes(f.read_bytes())
            if run_id:
                _log_to_run(run_id, summaries[bundle.name]["metrics"], files, reason, self.tracking_uri)
        metrics = dict(summaries[bundle.name]["metrics"])
        if twin is not None:
            metrics |= {f"compare.{twin['name']}.{k}": v for k, v in twin["summary"]["metrics"].items()}
        return DiagnoseResult(model=self.model, version=version, run_id=run_id, applicable=True, reason=reason,
                              metrics=metrics, artifacts=[f"{ARTIFACT_DIR}/{f.name}" for f in files])

    def _load(self) -> tuple[Any, str | None, dict[str, str]]:
        """(bundle, version or None for a folder, version tags)."""
        from pipeline.io.bundle import ModelBundle

        if self.model.startswith("models:/"):
            try:
                name, version = registry.resolve_version(self.model, self.tracking_uri)
            except ValueError as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(str(e), "pass --model models:/NAME/VERSION, models:/NAME@ALIAS or a bundle folder") from e
            registry.require_version(name, version, self.tracking_uri)
            tags = registry.version_tags(name, version, self.tracking_uri)
            bundle, _ = registry.load_bundle(f"models:/{name}/{version}", device="cpu", tracking=self.tracking_uri)
            return bundle, version, tags
        folder = Path(self.model)
        if not folder.is_dir():
            raise DataError(f"model {self.model!r} is neither a models:/ URI nor a bundle folder",
                            "pass --model models:/NAME/VERSION or the path of a saved bundle folder")
        return ModelBundle.load(folder, "cpu"), None, {}

    def _diagnose(self, module: Any, snap: Any) -> dict[str, Any]:
        history = validation_histories(snap)
        available = int((np.diff(history.indptr) > 0).sum())
        if self.users > available:
            raise DataError(f"a sample of {self.users} users was asked for but the snapshot has {available} validation "
                            "users with a history", f"pass --users {available} or fewer")
        if self.neighbours >= self.users:
            raise DataError(f"{self.neighbours} neighbours need a sample of more than {self.neighbours} users",
                            f"pass --neighbours below --users ({self.users})")
        return diagnose_module(module, history, self.users, self.views, self.neighbours, self.seed).to_summary()


def validation_histories(snap: Any) -> Any:
    """Each validation user's whole history (fold-in + held-out targets), over the snapshot's items."""
    return (snap.valid.fold_in + snap.valid.targets).tocsr()


def diagnose_module(module: Any, history: Any, users: int, views: int, neighbours: int, seed: int,
                    anchors: Any = None) -> Any:
    """model.diagnostics.diagnose at the module's training dropout, by activity group (ValueError → DataError)."""
    from model.diagnostics import DiagnosticsConfig, diagnose

    dropout = float(getattr(getattr(module, "config", None), "dropout", 0.5))
    cfg = DiagnosticsConfig(users=users, views=views, neighbours=neighbours, dropout=dropout, seed=seed)
    counts = np.diff(history.indptr)
    try:
        return diagnose(module, history, cfg, anchors=anchors, groups=activity_groups(counts))
    except ValueError as e:
        raise DataError(f"diagnostics cannot run: {e}", "pass a smaller --users/--neighbours sample") from e


def _reason(summary: dict[str, Any], anchors_saved: bool) -> str:
    na = summary.get("not_applicable", [])
    parts = []
    if "kl" in na:
        parts.append("no variance head: KL not applicable, distances are between codes")
    if "anchor_distance" in na:
        parts.append("anchor distance not measured (PIA anchors are training-only)" if not anchors_saved
                     else "anchor distance not applicable (no PIA)")
    return "; ".join(parts) or "all diagnostics applied"


def _stored_twin(run_id: str, tracking: str | None) -> dict[str, Any] | None:
    """The no-PIA twin's summary stored by the training job on the run (None when there is none)."""
    import mlflow.artifacts

    uri = registry.setup(tracking)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{TWIN}",
                                                       dst_path=tmp, tracking_uri=uri)
            data = json.loads(Path(path).read_text())
        except Exception:  # absent (trained without compare_base or before diagnostics), or unreadable: no twin
            return None
    ok = isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("summary"), dict)
    return data if ok else None


def _log_to_run(run_id: str, metrics: dict[str, float], files: list[Path], reason: str, tracking: str | None,
                prefix: str = PREFIX) -> None:
    from mlflow.entities import Metric, RunTag

    c = registry.client(tracking)
    stamp = registry_now_ms()
    c.log_batch(run_id, metrics=[Metric(prefix + k, v, stamp, 0) for k, v in metrics.items() if math.isfinite(v)],
                tags=[RunTag(PREFIX + "status", reason)])
    for f in files:
        c.log_artifact(run_id, str(f), ARTIFACT_DIR)


def registry_now_ms() -> int:
    import time

    return int(time.time() * 1000)


def run_metrics(run_id: str | None, tracking: str | None = None) -> dict[str, float]:
    """The `diag.*` metrics of a run (prefix removed, the twin's `compare.*` left out): what the latent gate reads."""
    if not run_id:
        return {}
    data = registry.client(tracking).get_run(run_id).data.metrics
    return {k.removeprefix(PREFIX): float(v) for k, v in data.items()
            if k.startswith(PREFIX) and not k.startswith(PREFIX + "compare.")}


# -- inside the training job ------------------------------------------------------------------------------------


def log_training_diagnostics(trained: dict[str, Any], main: str, snap: Any, seed: int, users: int = 1000,
                             views: int = 8, neighbours: int = 10) -> dict[str, float]:
    """The training job's step (inside its active MLflow run): diagnose the candidate `main` and its no-PIA twin
    (the other autoencoder in `trained`, if any) on the snapshot's validation users; log `diag.*` for the candidate,
    `diag.compare.<twin>.*` for the twin, `diagnostics/summary.json`, `diagnostics/twin.json` and the plots.
    The sample is capped at the validation users available. Returns the candidate's metrics with the prefix."""
    import mlflow

    history = validation_histories(snap)
    available = int((np.diff(history.indptr) > 0).sum())
    n = min(users, available)
    k = min(neighbours, n - 1)
    if n < 3:
        mlflow.set_tag(PREFIX + "status", f"not run: {available} validation users with a history (need 3)")
        return {}
    summaries: dict[str, dict[str, Any]] = {}
    for name, rec in trained.items():
        module = getattr(rec, "module", None)
        if module is not None and hasattr(module, "encode"):
            summaries[name] = diagnose_module(module, history, n, views, k, seed,
                                              anchors=getattr(rec, "anchors", None)).to_summary()
    if main not in summaries:
        mlflow.set_tag(PREFIX + "status", f"not applicable: {main} has no latent posterior")
        return {}
    out = {PREFIX + k_: v for k_, v in summaries[main]["metrics"].items()}
    twins = [t for t in summaries if t != main]
    for t in twins:
        out |= {f"{PREFIX}compare.{t}.{k_}": v for k_, v in summaries[t]["metrics"].items()}
    with tempfile.TemporaryDirectory(prefix="recsys-diag-") as tmp:
        d = Path(tmp)
        files = write_outputs(summaries, main, d)
        if twins:
            (d / TWIN).write_text(json.dumps({"name": twins[0], "summary": summaries[twins[0]]}))
            files.append(d / TWIN)
        mlflow.log_metrics({k_: v for k_, v in out.items() if math.isfinite(v)})
        mlflow.set_tag(PREFIX + "status", _reason(summaries[main], anchors_saved=getattr(trained[main], "anchors", None)
                                                  is not None))
        for f in files:
            mlflow.log_artifact(str(f), ARTIFACT_DIR)
    return out


# -- outputs ----------------------------------------------------------------------------------------------------


def write_outputs(summaries: dict[str, dict[str, Any]], main: str, d: Path) -> list[Path]:
    """summary.json (every model's summary, `main` first) and the three plots; returns the files."""
    (d / SUMMARY).write_text(json.dumps({"model": main, "models": summaries}, indent=1))
    return [d / SUMMARY, drift_plot(summaries, d / "drift_by_group.png"), w2_plot(summaries, d / "w2_near_far.png"),
            active_units_plot(summaries, d / "active_units.png")]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def drift_plot(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """Mask drift and k-NN stability by activity group, one bar per model."""
    plt = _plt()
    groups = list(dict.fromkeys(g for s in summaries.values() for g in s["groups"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(summaries))
    for ax, key, title in ((axes[0], "drift", "mask drift (view spread / median user distance)"),
                           (axes[1], "knn_jaccard", "k-NN stability across views (Jaccard)")):
        for i, (name, s) in enumerate(summaries.items()):
            vals = [s["groups"].get(g, {}).get(key) or 0.0 for g in groups] + [s["metrics"].get(key, 0.0)]
            ax.bar(np.arange(len(groups) + 1) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(groups) + 1) + width * (len(summaries) - 1) / 2, [*groups, "all"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("activity group (interactions)")
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def w2_plot(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """W2 of near pairs and of far-but-related pairs overlaid, one panel per model (side by side)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 3.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], summaries.items(), strict=True):
        near, far = np.asarray(s["near_w2"]), np.asarray(s["far_w2"])
        both = np.concatenate([near, far])
        bins = np.linspace(0, float(both.max()) if both.size and both.max() > 0 else 1.0, 40)
        ax.hist(near, bins=bins, alpha=0.55, density=True, label=f"near pairs ({near.size})")
        ax.hist(far, bins=bins, alpha=0.55, density=True, label=f"far-but-related ({far.size})")
        if near.size:
            ax.axvline(float(np.median(near)), color="k", ls="--", lw=1, label="median near")
        share = s["metrics"].get("far_within_near_median", float("nan"))
        ax.set_title(f"{name}: far within median near = {share:.1%}", fontsize=10)
        ax.set_xlabel("W2 between posteriors (clean input)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def active_units_plot(summaries: dict[str, dict[str, Any]], path: Path, threshold: float = 0.01) -> Path:
    """Variance across users of each latent unit's mean, sorted, one line per model; the active-unit threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, s in summaries.items():
        var = np.sort(np.asarray(s["unit_variance"]))[::-1]
        ax.plot(np.arange(1, var.size + 1), np.maximum(var, 1e-12), label=f"{name}: {int(s['metrics']['active_units'])} active")
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("latent unit (sorted)")
    ax.set_ylabel("Var over users of the posterior mean")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
