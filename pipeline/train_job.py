"""`recsys train`: fit Multi-VAE + PIA on a matrix snapshot, log everything to MLflow, register a challenger.

Protocol (strong generalization, ../shared/ARCHITECTURE.md): train on the snapshot's training users, pick
the epoch on its validation users (the trainer keeps the best validation NDCG@100 weights), score its test
users once. The same job trains the gate's baselines (popularity, and EASE when the catalog is small
enough) on the same split and stores their test metrics as version tags, so the gate compares like with
like without retraining them.

Order of effects: everything is logged to one MLflow run first; the registered-model version (alias
`challenger`) is created at the very end, so a failed or killed run registers nothing and never touches
`champion` (only the gate moves that).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.ease import EASEConfig
from model.pia import PIAConfig
from model.vae import VAEConfig
from pipeline import registry
from pipeline.errors import DataError
from pipeline.redact import redact_values

log = logging.getLogger(__name__)

AUTOENCODERS = ("multivae", "multivae-pia", "multidae", "recvae", "recvae-pia")
DEFAULT_REGISTERED_NAME = "recsys-multivae-pia"


class TrainJobConfig(BaseModel):
    """Everything the job needs; logged whole as run params (credentials stripped from URIs). YAML files give
    the same keys (nested for vae/pia/ease)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot: str = Field(description="snapshot URI (local path or s3://)")
    model: str = "multivae-pia"
    epochs: int = Field(50, ge=1)
    patience: int | None = Field(10, ge=1, description="early stop after this many epochs without a better val NDCG@100")
    batch_size: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    device: str = "auto"
    bf16: bool = Field(False, description="bf16 autocast on CUDA")
    cuda_graph: bool = Field(False, description="Multi-VAE/DAE on CUDA: each step replayed as one CUDA graph")
    vae: VAEConfig = VAEConfig()  # Multi-VAE/DAE architecture (ignored by RecVAE)
    pia: PIAConfig = PIAConfig(weight=1.0)  # lambda_A 1 was chosen on validation for ml-latest-small and ml-1m
    compare_base: bool = Field(True, description="also train the model without PIA (latent plot, logged metrics)")
    baselines: bool = Field(True, description="train popularity and EASE on the same split for the gate")
    ease: EASEConfig = EASEConfig()
    max_ease_items: int = Field(20_000, ge=1, description="skip the EASE baseline (I x I dense) above this catalog")
    top_n: int = Field(20, ge=1, description="top-N for catalog coverage and popularity bias")
    registered_name: str = DEFAULT_REGISTERED_NAME
    experiment: str = registry.DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    progress: bool = False

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in AUTOENCODERS:
            raise ValueError(f"unknown model {v!r}: train one of {', '.join(AUTOENCODERS)}")
        return v

    @property
    def base_model(self) -> str | None:
        return self.model.removesuffix("-pia") if self.model.endswith("-pia") else None


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainJobConfig:
    """YAML file (optional) with CLI values merged over it; None overrides mean 'not given'."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"config file {p} not found", "pass an existing YAML file to --config")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DataError(f"config file {p} is not a mapping", "write `key: value` lines (see TrainJobConfig)")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainJobConfig(**data)


def metric_key(name: str) -> str:
    """MLflow-safe metric/tag key: 'ndcg@100' → 'ndcg_at_100', '[100+]' → '100plus'."""
    return name.replace("@", "_at_").replace("[", "").replace("]", "").replace("+", "plus")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_metrics(row: dict[str, Any], top_n: int) -> dict[str, float]:
    """Experiment.summarize's row → flat metric keys: overall, coverage, popularity bias, per activity group."""
    from pipeline.experiment import METRICS

    out = {metric_key(m): float(row[m]) for m in METRICS}
    out[metric_key(f"coverage@{top_n}")] = float(row[f"coverage@{top_n}"])
    out[metric_key(f"mean_popularity@{top_n}")] = float(row["mean_popularity@20"])  # summarize's fixed key name
    for g, vals in row["groups"].items():
        out[f"group.{metric_key(g)}.users"] = float(vals["users"])
        for m in METRICS:
            out[f"group.{metric_key(g)}.{metric_key(m)}"] = float(vals[m])
    return out


def snapshot_counts(snap: Any) -> np.ndarray:
    """Interactions per test user (fold-in + targets): the activity group of ARCHITECTURE.md."""
    return np.diff(snap.test.fold_in.indptr) + np.diff(snap.test.targets.indptr)


@dataclass
class TrainResult:
    name: str
    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)


EpochHook = Callable[[dict[str, Any]], None]


def _epoch_logger(prefix: str, vae: VAEConfig, extra: EpochHook | None) -> EpochHook:
    import mlflow

    from model.vae import MultiVAE

    def on_epoch(record: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k not in ("epoch",)}
        if "beta" not in values and "step" in values and vae.variational:
            values["beta"] = MultiVAE.beta(SimpleNamespace(config=vae), int(values["step"]))  # type: ignore[arg-type]
        mlflow.log_metrics({prefix + metric_key(k): v for k, v in values.items() if np.isfinite(v)},
                           step=int(record["epoch"]))
        shown = " ".join(f"{k}={values[k]:.4f}" for k in ("loss", "beta", "val_ndcg@100") if k in values)
        print(f"{prefix or 'model.'}epoch {record['epoch']} {shown}", flush=True)  # one line per epoch (operators, tests)
        if extra is not None:
            extra(record)

    return on_epoch


def _latent_means(rec: Any, fold_in: Any, device: str, batch_size: int = 2000) -> np.ndarray:
    """Posterior means (z at inference) of the rows of `fold_in`."""
    import torch

    from model.sparse import DeviceCSR

    x = DeviceCSR.from_scipy(fold_in, device)
    module = rec.module
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, x.n_rows, batch_size):
            rows = torch.arange(start, min(x.n_rows, start + batch_size), device=x.device)
            out.append(module.encode(x.batch(rows))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def _signature(bundle_dir: Path, bundle: Any, snap: Any) -> Any:
    """Input: a list column of external item ids; output as BundleModel.predict returns it; param k."""
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.pyfunc import BundleModel

    rows = snap.test.fold_in[: min(3, snap.test.fold_in.shape[0])]
    example = [bundle.item_ids[rows[i].indices].tolist() for i in range(rows.shape[0])]
    inp = pd.DataFrame({"item_ids": example})
    m = BundleModel()
    m.load_context(SimpleNamespace(artifacts={"bundle": str(bundle_dir)}))
    return infer_signature(inp, m.predict(None, inp, {"k": 10}), params={"k": 100}), inp


def _pip_requirements() -> list[str]:
    """Pinned from the running environment (skips MLflow's slow import-capturing inference)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "numpy", "scipy", "pandas", "pyarrow", "pydantic", "tqdm"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


def run(cfg: TrainJobConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """The whole job. `on_epoch` is an extra per-epoch hook (tests use it to interrupt a run)."""
    import mlflow
    import torch
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from model.evaluate import evaluate
    from model.recommenders import make_recommender
    from model.train import TrainConfig, resolve_device
    from pipeline import plots
    from pipeline.bundle import ModelBundle
    from pipeline.experiment import Experiment, activity_groups, machine_name
    from pipeline.pyfunc import BundleModel
    from pipeline.snapshot import load_snapshot

    t_start = time.perf_counter()
    device = str(resolve_device(cfg.device))  # fails fast when cuda is asked for and absent
    snap = load_snapshot(cfg.snapshot)
    if snap.test.n_users == 0 or snap.valid.n_users == 0:
        raise DataError(f"snapshot {cfg.snapshot} has no validation or test users", "rebuild it with held-out users")
    registry.setup(cfg.tracking_uri)
    exp_id = registry.ensure_experiment(cfg.experiment, cfg.tracking_uri)
    commit = registry.git_commit()
    pop = torch.as_tensor(snap.item_popularity())
    counts = snapshot_counts(snap)
    group_of = np.full(len(counts), "", dtype=object)
    for g, mask in activity_groups(counts).items():
        group_of[mask] = g
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=device,
                            bf16=cfg.bf16, patience=cfg.patience, progress=cfg.progress)

    def build(name: str) -> Any:
        multi = name.startswith("multi")
        return make_recommender(name, train=train_cfg.model_copy(update={"cuda_graph": cfg.cuda_graph and multi}),
                                pia=cfg.pia if name.endswith("-pia") else None, ease=cfg.ease,
                                model_config=cfg.vae if multi else None)

    def test_eval(rec: Any) -> Any:
        return evaluate(rec.score, snap.test.fold_in, snap.test.targets, device=rec.device,
                        coverage_k=cfg.top_n, item_popularity=pop)

    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.model}-{snap.snapshot_id}") as active:
        run_id = active.info.run_id
        mlflow.set_tags({"snapshot_id": snap.snapshot_id, "snapshot_uri": cfg.snapshot, "git_commit": commit,
                         "model": cfg.model, "device": device, "machine": machine_name(device)})
        public_cfg = redact_values(cfg.model_dump(mode="json"))  # tracking_uri may carry user:password
        mlflow.log_params(flatten(public_cfg))
        digest = registry_digest(snap.manifest)
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all are fine
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(cfg.snapshot)
        dataset = MetaDataset(source, name=f"snapshot-{snap.snapshot_id}", digest=digest)  # type: ignore[abstract]
        mlflow.log_input(dataset, context="training", tags={"counts": json.dumps(snap.manifest.get("counts", {}))})

        # -- the candidate (and, to compare, the same model without PIA) -----------------------------
        names = [cfg.model] + ([cfg.base_model] if cfg.compare_base and cfg.base_model else [])
        trained: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        for name in names:
            prefix = "" if name == cfg.model else f"compare.{name}."
            rec = build(name)
            rec.fit(snap.train, snap.valid, on_epoch=_epoch_logger(prefix, cfg.vae, on_epoch if not prefix else None))
            trained[name] = rec
            row = Experiment.summarize(name, cfg.seed, rec, test_eval(rec), counts)
            summary = summary_metrics(row, cfg.top_n)
            mlflow.log_metrics({f"{prefix}test.{k}": v for k, v in summary.items() if np.isfinite(v)})
            mlflow.log_metrics({f"{prefix}best_epoch": float(rec.best_epoch), f"{prefix}fit_seconds": rec.fit_seconds})
            if not prefix:
                metrics.update({f"test.{k}": v for k, v in summary.items()})
                metrics["best_epoch"] = float(rec.best_epoch)
        main = trained[cfg.model]

        # -- gate baselines on the same split --------------------------------------------------------------
        if cfg.baselines:
            for name in ("popularity", "ease"):
                if name == "ease" and snap.n_items > cfg.max_ease_items:
                    mlflow.set_tag("baseline.ease", f"skipped: {snap.n_items} items > max_ease_items={cfg.max_ease_items}")
                    continue
                rec = build(name).fit(snap.train, snap.valid)
                summary = summary_metrics(Experiment.summarize(name, cfg.seed, rec, test_eval(rec), counts), cfg.top_n)
                base = {f"baseline.{name}.{k}": v for k, v in summary.items() if not k.startswith("group.")}
                mlflow.log_metrics({k: v for k, v in base.items() if np.isfinite(v)})
                metrics.update(base)
                print(f"baseline {name}: ndcg@100={summary['ndcg_at_100']:.4f}", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            # -- figures -------------------------------------------------------------------------------
            plots.training_curves({n: r.history for n, r in trained.items()}, d / "training_curves.png")
            latents = {n: _latent_means(r, snap.test.fold_in, str(r.device)) for n, r in trained.items()}
            plots.latent_space(latents, group_of.astype(str), d / "latent_space.png")
            mlflow.log_artifact(str(d / "training_curves.png"), "plots")
            mlflow.log_artifact(str(d / "latent_space.png"), "plots")

            # -- the model: one pyfunc with the bundle as its artifact ---------------------------------
            main.to("cpu")
            bundle = ModelBundle(main, snap.item_ids, snap.item_popularity(), cfg.model,
                                 public_cfg | {"best_epoch": main.best_epoch}, snap.snapshot_id)
            bundle_dir = bundle.save(d / "bundle")
            signature, example = _signature(bundle_dir, bundle, snap)
            info = mlflow.pyfunc.log_model(name="model", python_model=BundleModel(), artifacts={"bundle": str(bundle_dir)},
                                           signature=signature, input_example=example,
                                           pip_requirements=_pip_requirements())
        elapsed = time.perf_counter() - t_start
        mlflow.log_metrics({"train_seconds_total": elapsed})
        metrics["train_seconds_total"] = elapsed

    # Registered last: a run that dies above leaves no version (and never touches `champion`).
    tags = {"snapshot_id": snap.snapshot_id, "snapshot_uri": cfg.snapshot, "git_commit": commit, "run_id": run_id,
            "model": cfg.model, "device": device, "gate.verdict": "pending",
            "snapshot_digest": digest}  # the gate checks the snapshot it reloads against this
    tags.update({k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(("test.", "baseline.")) and "group." not in k})
    version = registry.register(info.model_uri, cfg.registered_name, tags, cfg.tracking_uri)
    return TrainResult(cfg.registered_name, version, run_id, metrics)


def registry_digest(manifest: dict[str, Any]) -> str:
    """A short content digest of a snapshot: its manifest (which holds every file's sha256)."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
