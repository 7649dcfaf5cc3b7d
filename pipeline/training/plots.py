"""PNG figures logged to MLflow: training curves, the latent space of test users, the gate's comparison.

matplotlib with the Agg backend (no display on training machines); every function writes one file, except the
`*_figure` ones, which return the figure (the HTML gate report inlines them: pipeline.training.gate_html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(histories: dict[str, list[dict[str, Any]]], path: Path, select_metric: str = "val_ndcg@100") -> Path:
    """Loss, beta and the validation metric per epoch, one line per model (e.g. with and without PIA)."""
    return _save(training_curves_figure(histories, select_metric), path)


def training_curves_figure(histories: dict[str, list[dict[str, Any]]], select_metric: str = "val_ndcg@100") -> Any:
    """The figure of `training_curves` (records: `epoch` and any of loss / beta / the metric); the caller closes it."""
    plt = _plt()
    keys = [("loss", "training loss"), ("beta", "β (KL weight)"), (select_metric, select_metric.replace("val_", "validation "))]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for name, hist in histories.items():
            pts = [(r["epoch"], r[key]) for r in hist if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend()
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection on the first two principal components (SVD of the centred matrix)."""
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T if vt.shape[0] >= 2 else np.pad(xc @ vt.T, ((0, 0), (0, 2 - vt.shape[0])))


def latent_space(panels: dict[str, np.ndarray], groups: np.ndarray, path: Path) -> Path:
    """Side-by-side 2-D PCA of posterior means (one panel per model), points coloured by activity group."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    labels = list(dict.fromkeys(groups.tolist()))
    for ax, (name, mu) in zip(axes[0], panels.items(), strict=True):
        xy = pca_2d(mu)
        for g in labels:
            m = groups == g
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, label=f"{g} ({int(m.sum())})")
        ax.set_title(f"{name}: test users' posterior means (PCA)")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0][-1].legend(title="interactions", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_chart(rows: dict[str, dict[str, float]], metrics: list[str], path: Path) -> Path:
    """Grouped bars: candidate, champion, baselines over the gate's metrics."""
    return _save(gate_chart_figure(rows, metrics), path)


def gate_chart_figure(rows: dict[str, dict[str, float]], metrics: list[str]) -> Any:
    """The figure of `gate_chart` (a column without a metric gets no bar); the caller closes it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(metrics) * max(1, len(rows)) / 2), 4))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(metrics))
    for i, (name, vals) in enumerate(rows.items()):
        ys = [vals.get(m, np.nan) for m in metrics]
        ax.bar(x + i * width - 0.4 + width / 2, ys, width, label=name)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("test users (candidate's snapshot)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
