"""`recsys train`: TrainJob fits Multi-VAE + PIA on a matrix snapshot, logs everything to MLflow and registers
a `challenger` version (TrainResult).

Protocol (strong generalization, ../shared/ARCHITECTURE.md): train on the snapshot's training users, pick
the epoch on its validation users (the trainer keeps the best validation NDCG@100 weights), score its test
users once. The same job trains the gate's baselines (popularity, and EASE when the catalog is small
enough) on the same split and stores their test metrics as version tags, so the gate compares like with
like without retraining them. With `search` set (pipeline/training/search.py), a hyperparameter search on the
validation users picks the model's and its twin's settings first (each trial a nested MLflow run), and the winners
are refit through the same steps.

Order of effects: everything is logged to one MLflow run first; the registered-model version (alias
`challenger`) is created at the very end, so a failed or killed run registers nothing and never touches
`champion` (only the gate moves that). The steps of `train()`: set up (device, snapshot, experiment), log the
run's inputs (tags, params, dataset), fit the candidate and its no-PIA twin, fit the baselines, log the figures,
log the model, then (after the run is closed) register.

Data-parallel (`distributed`, pipeline/training/distributed.py): the same steps run under pyspark's
TorchDistributor, one process per rank; every rank fits the same models in the same order (the trainer reduces
their gradients), rank 0 alone does everything else (MLflow, baselines, figures, registration) and also logs
`world_size` and `ddp_backend`, and its TrainResult comes back to the caller.
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
from pydantic import Field, field_validator, model_validator

from model.cold_head import ColdHeadConfig
from model.ease import EASEConfig
from model.pia import PIAConfig
from model.recvae import RecVAEConfig
from model.vae import VAEConfig, dae_config
from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.io.hardware import default_dense_bytes
from pipeline.io.redact import redact_values
from pipeline.job import Job, JobResult
from pipeline.training import DEFAULT_REGISTERED_NAME
from pipeline.training.distributed import DistributedConfig, check, launch, world_params
from pipeline.training.evaluation import activity_groups, machine_name, metric_key, summarize, summary_metrics
from pipeline.training.search import SearchConfig, check_search, search_models, tuned_setup

log = logging.getLogger(__name__)

AUTOENCODERS = ("multivae", "multivae-pia", "multidae", "recvae", "recvae-pia")
# Closed-form families the job can train as its main model (one solve, l2 chosen on validation users, no twin):
# EASE, and EDLAE once model.recommenders knows it.
CLOSED_FORM_MAIN = ("ease", "edlae")


def trainable() -> tuple[str, ...]:
    """The names TrainJob trains: the autoencoders, and the closed-form families model.recommenders registers."""
    from model.recommenders import MODEL_NAMES

    return AUTOENCODERS + tuple(n for n in CLOSED_FORM_MAIN if n in MODEL_NAMES)


def dense_bytes(n_items: int, dtype: str = "float32", device: str = "cpu") -> int:
    """Peak dense memory of a closed-form solve over `n_items` (model.ease: one I x I buffer in place on the CPU,
    two on a GPU)."""
    return n_items * n_items * (8 if dtype == "float64" else 4) * (2 if device.startswith("cuda") else 1)


class TrainResult(JobResult):
    """The registered version (alias `challenger`), its MLflow run, and the candidate's and baselines' metrics
    as logged (`test.*`, `best_epoch`, `baseline.<name>.*`, `train_seconds_total`)."""

    model_name: str
    version: str
    run_id: str
    metrics: dict[str, float]


class TrainJob(Job):
    """Everything the job needs; logged whole as run params (credentials stripped from URIs). YAML files give
    the same keys (nested for vae/pia/ease): see `load_config`."""

    snapshot: str = Field(description="snapshot URI (local path or s3://)")
    model: str = Field("multivae-pia", description="an autoencoder (AUTOENCODERS) or a closed-form family "
                                                    "(ease; edlae when model.recommenders has it)")
    epochs: int = Field(50, ge=1)
    patience: int | None = Field(10, ge=1, description="early stop after this many epochs without a better val NDCG@100")
    batch_size: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="multiply the learning rate by this after every "
                                                             "lr_decay_patience epochs without a better val NDCG@100 "
                                                             "(1: constant rate)")
    lr_decay_patience: int = Field(3, ge=1)
    ema_halflife: float | None = Field(None, gt=0.0, description="keep and register a moving average of the weights "
                                       "with this half-life in epochs (model.train.TrainConfig); None: off")
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = Field(None, description=(
        "bf16 autocast of the training step. None (auto): on a CPU with native bf16 (flags and a calibration "
        "product, pipeline.io.hardware), fp32 elsewhere: on such a CPU it trained 1.4x faster with the same "
        "validation NDCG@100 (docs/benchmarks.md); true: also on CUDA (and warned on a CPU without native bf16, "
        "where torch emulates it slowly); false: fp32"))
    cuda_graph: bool = Field(False, description="Multi-VAE/DAE on CUDA: each step replayed as one CUDA graph")
    vae: VAEConfig = VAEConfig()  # Multi-VAE/DAE architecture (ignored by RecVAE)
    recvae: RecVAEConfig = RecVAEConfig()  # RecVAE's architecture, dropout and γ (ignored by Multi-VAE/DAE)
    pia: PIAConfig = PIAConfig(weight=1.0)  # lambda_A 1 was chosen on validation for ml-latest-small and ml-1m
    compare_base: bool = Field(True, description="also train the model without PIA (latent plot, logged metrics)")
    diagnose: bool = Field(True, description="latent diagnostics of the model and its twin on validation users "
                                             "(pipeline.training.diagnose: diag.* metrics, diagnostics/ artifacts)")
    baselines: bool = Field(True, description="train popularity and EASE on the same split for the gate")
    ease: EASEConfig = EASEConfig()
    max_ease_items: int = Field(20_000, ge=1, description="skip the EASE baseline (I x I dense) above this catalog")
    l2_grid: tuple[float, ...] = Field((100.0, 250.0, 500.0, 1000.0), min_length=1,
                                       description="closed-form main model: the l2 values tried, the best on "
                                                   "validation users NDCG@100 kept (as the experiment harness)")
    max_dense_bytes: int = Field(default_factory=default_dense_bytes, ge=1,
                                 description="closed-form main model: refuse (DataError, before any training) a "
                                             "catalog whose dense I x I solve exceeds this many bytes; default a "
                                             "quarter of this machine's memory, at most 32 GiB")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the run and the registered "
                                                                   "version (e.g. candidates.group)")
    top_n: int = Field(20, ge=1, description="top-N for catalog coverage and popularity bias")
    registered_name: str = DEFAULT_REGISTERED_NAME
    experiment: str = registry.DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    progress: bool = False
    distributed: DistributedConfig | None = Field(None, description="data-parallel training with TorchDistributor "
                                                                    "(None: in this process)")
    cold_head: ColdHeadConfig | None = Field(ColdHeadConfig(), description=(
        "the bundle's cold head, fitted from the snapshot's item metadata (pipeline.training.cold_head_fit), so the "
        "daily job scores titles that appear after training; None: none. Its δ and neighbourhood size are chosen "
        "on titles held out of this week's clicks (cold_head.tune; null: as configured). Skipped (a warning, the "
        "reason on the run) when the snapshot has no item_metadata or no usable column"))
    search: SearchConfig | None = Field(None, description="hyperparameter search of the model (and its twin) on "
                                                          "validation users before training (pipeline.training.search)")
    marec_align: float = Field(0.0, ge=0.0, description=(
        "αβ of MARec's alignment target (issue 29, model.marec.AlignmentTarget) for a Multi-VAE/DAE model and its "
        "twin: the snapshot's cold items with a model column learn their scores from their metadata, with the cold "
        "head's features and block weights (cold_head's settings). 0: off. Skipped (the reason on the run) when the "
        "snapshot has no item metadata or no such item"))

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in trainable():
            raise ValueError(f"unknown model {v!r}: train one of {', '.join(trainable())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _a_dae_by_default(cls, data: Any) -> Any:
        """multidae without a `vae` section trains the DAE reference architecture (dae_config), not the VAE default."""
        if isinstance(data, dict) and data.get("model") == "multidae" and "vae" not in data:
            return {**data, "vae": dae_config()}
        return data

    @model_validator(mode="after")
    def _dae_is_not_variational(self) -> TrainJob:
        if self.model == "multidae" and self.vae.variational:
            raise ValueError("model multidae with vae.variational: true would train a Multi-VAE: set "
                             "vae.variational: false (or leave vae out for the DAE reference), or train multivae")
        return self

    @model_validator(mode="after")
    def _alignment_needs_a_multivae(self) -> TrainJob:
        if self.marec_align > 0 and not self.model.startswith("multi"):
            raise ValueError(f"marec_align applies to Multi-VAE/DAE models (multivae, multivae-pia, multidae), not "
                             f"{self.model}: set marec_align: 0, or train a Multi-VAE")
        return self

    @field_validator("l2_grid")
    @classmethod
    def _positive_l2(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not x > 0 for x in v):
            raise ValueError(f"l2_grid values must be > 0, got {v}")
        return tuple(dict.fromkeys(v))  # a value tried once

    @property
    def closed_form(self) -> bool:
        """The main model is solved in closed form (no epochs, no twin, l2 tuned on validation users)."""
        return self.model in CLOSED_FORM_MAIN

    @property
    def base_model(self) -> str | None:
        """The model without PIA (the comparison twin), or None when the model has no PIA."""
        return self.model.removesuffix("-pia") if self.model.endswith("-pia") else None

    def run(self) -> TrainResult:
        """Train, log and register (see module doc)."""
        return train(self) if self.distributed is None else train_distributed(self)

    def check_budget(self, n_items: int, device: str = "cpu") -> None:
        """A closed-form main model over `n_items` must fit max_dense_bytes: a DataError before anything trains."""
        if not self.closed_form:
            return
        need = dense_bytes(n_items, self.ease.dtype, device)
        if need > self.max_dense_bytes:
            raise DataError(f"{self.model} over {n_items} items needs {need / 2**30:.2f} GiB of dense I x I memory "
                            f"({self.ease.dtype}{', two buffers on the GPU' if device.startswith('cuda') else ''}), "
                            f"over max_dense_bytes={self.max_dense_bytes} ({self.max_dense_bytes / 2**30:.2f} GiB); "
                            "nothing was trained or registered",
                            "raise max_dense_bytes if the training and serving machines have the memory, or train "
                            "an autoencoder (e.g. model: multivae-pia) for this catalog")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainJob:
    """A TrainJob from a YAML file (optional; read with safe_load) with `overrides` (CLI flags, the scheduler's
    settings) merged over it; None overrides mean 'not given'."""
    from pipeline.training.gates import read_yaml_mapping

    data: dict[str, Any] = {}
    if path is not None:
        data.update(read_yaml_mapping(Path(path), "config file", "TrainJob"))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainJob(**data)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → one level with dotted keys ({'vae': {'latent_dim': 8}} → {'vae.latent_dim': 8})."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def snapshot_counts(snap: Any) -> np.ndarray:
    """Interactions per test user (fold-in + targets): the activity group of ARCHITECTURE.md."""
    return np.diff(snap.test.fold_in.indptr) + np.diff(snap.test.targets.indptr)


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

    from pipeline.io.pyfunc import BundleModel

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




# -- the job, step by step -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What every step shares: the job, the resolved device, the snapshot and the run's context."""

    job: TrainJob
    device: str
    snap: Any
    experiment_id: str
    commit: str
    digest: str  # the snapshot manifest's digest: the version tag the gate checks its reload against
    popularity: Any  # torch tensor of item popularity (for the popularity-bias metric)
    counts: np.ndarray  # interactions per test user (activity groups)
    train_cfg: Any  # model.train.TrainConfig
    alignment: Any = None  # model.marec.AlignmentTarget for the Multi-VAE/DAE fits (TrainJob.marec_align), or None
    alignment_info: dict[str, Any] = field(default_factory=dict)  # marec_align.* tags for the run
    alignment_head: Any = None  # the eq5 ColdHead the alignment was computed from: the bundle's head when it fits

    def build(self, name: str, overrides: dict[str, Any] | None = None) -> Any:
        """An unfitted recommender `name` with the job's settings (PIA only for *-pia models); `overrides` (dotted
        TrainJob keys: a search's winner or trial) replace some of them."""
        from model.recommenders import Autoencoder, make_recommender

        if overrides:
            return tuned_setup(self, overrides).build(name)
        job, multi = self.job, name.startswith("multi")
        aligned = multi and self.alignment is not None  # the alignment loss is not in the CUDA-graph step
        rec = make_recommender(name, train=self.train_cfg.model_copy(
                                   update={"cuda_graph": job.cuda_graph and multi and not aligned}),
                               pia=job.pia if name.endswith("-pia") else None, ease=job.ease,
                               model_config=job.vae if multi else job.recvae if name.startswith("recvae") else None)
        if aligned and isinstance(rec, Autoencoder):
            rec.alignment = self.alignment  # used by fit, then dropped (training only)
        return rec

    def test_eval(self, rec: Any) -> Any:
        """A fitted recommender's EvalResult on the snapshot's test users."""
        from model.evaluate import evaluate

        return evaluate(rec.score, self.snap.test.fold_in, self.snap.test.targets, device=rec.device,
                        coverage_k=self.job.top_n, item_popularity=self.popularity)


def train(job: TrainJob, on_epoch: EpochHook | None = None) -> TrainResult:
    """The whole job (TrainJob.run). `on_epoch` is an extra per-epoch hook of the candidate's fit, not a job
    setting (tests use it to interrupt a run). MLflow errors are one redacted DataError (registry.tracking_errors)."""
    with registry.tracking_errors(job.tracking_uri):
        check_search(job)  # a bad search is refused before the snapshot is read or anything trains
        return _train(job, on_epoch)


def train_distributed(job: TrainJob, on_epoch: EpochHook | None = None) -> TrainResult:
    """The job on `job.distributed.num_processes` ranks (TorchDistributor); `on_epoch` (tests) runs on every rank,
    so it must pickle. The job travels as its JSON; rank 0's TrainResult comes back."""
    cfg = job.distributed
    if cfg is None:
        raise ValueError("train_distributed needs a job with `distributed` set")
    check(cfg)
    check_search(job)  # refuses any search: it runs in one process
    if job.closed_form:
        raise DataError(f"{job.model} is solved in closed form: there is nothing to train data-parallel",
                        "unset distributed for this model")
    if job.cuda_graph:
        raise DataError("cuda_graph cannot be used in data-parallel training", "set cuda_graph: false")
    if cfg.use_gpu and job.device == "cpu":
        raise DataError("device is cpu but distributed.use_gpu is true", "set device: auto (or cuda), or use_gpu: false")
    if not cfg.use_gpu and job.device.startswith("cuda"):
        raise DataError(f"device is {job.device} but distributed.use_gpu is false",
                        "set distributed.use_gpu: true for GPU ranks, or device: auto / cpu")
    out = launch(cfg, _train_on_rank, job.model_dump_json(), on_epoch)
    return TrainResult.model_validate_json(out)


def _train_on_rank(job_json: str, on_epoch: EpochHook | None) -> str | None:
    """One rank: rank 0 runs the whole job (the trainer inside sees the process group); the others fit the same
    models in the same order and log nothing. Returns rank 0's TrainResult as JSON (None on the other ranks)."""
    import torch.distributed as dist

    job = TrainJob.model_validate_json(job_json)
    assert job.distributed is not None
    job = job.model_copy(update={"device": "cuda" if job.distributed.use_gpu else "cpu"})  # cuda: this rank's GPU
    if dist.get_rank() == 0:
        return train(job, on_epoch).model_dump_json()
    s = _set_up(job, tracking=False)
    for name in _fit_order(job):
        s.build(name).fit(s.snap.train, s.snap.valid, on_epoch=on_epoch if name == job.model else None)
    return None


def _fit_order(job: TrainJob) -> list[str]:
    """The models the job fits, in order (every rank of a data-parallel run fits exactly these)."""
    return [job.model] + ([job.base_model] if job.compare_base and job.base_model else [])


def _train(job: TrainJob, on_epoch: EpochHook | None) -> TrainResult:
    import mlflow

    t_start = time.perf_counter()
    s = _set_up(job)
    with mlflow.start_run(experiment_id=s.experiment_id, run_name=f"{job.model}-{s.snap.snapshot_id}") as active:
        run_id = active.info.run_id
        public_cfg = _log_inputs(s)
        mlflow.set_tag("train.precision", "bf16 autocast" if s.train_cfg.bf16 else "fp32")
        trained, metrics = _fit_closed_form(s) if job.closed_form else _fit_candidate(s, on_epoch)
        if job.baselines:
            metrics |= _fit_baselines(s, trained)
        with tempfile.TemporaryDirectory() as tmp:
            if not job.closed_form:
                _log_figures(s, trained, Path(tmp))
            model_uri = _log_model(s, trained[job.model], public_cfg, Path(tmp))
        if job.diagnose and not job.closed_form:  # latent geometry of the candidate and its twin (pipeline.training.diagnose)
            from pipeline.training.diagnose import log_training_diagnostics

            log_training_diagnostics(trained, job.model, s.snap, job.seed)
        elapsed = time.perf_counter() - t_start
        mlflow.log_metrics({"train_seconds_total": elapsed})
        metrics["train_seconds_total"] = elapsed

    # Registered last: a run that dies above leaves no version (and never touches `champion`).
    version = _register(s, run_id, model_uri, metrics)
    return TrainResult(model_name=job.registered_name, version=version, run_id=run_id, metrics=metrics)


def training_bf16(requested: bool | None, device: str) -> tuple[bool, str]:
    """Whether the training step autocasts to bf16, and why (TrainJob.bf16; issue 30's rule: bf16 by default only
    where it was measured faster with unchanged validation NDCG@100, i.e. a CPU with native bf16)."""
    from pipeline.io.hardware import detect

    if requested is False:
        return False, "bf16: false"
    if not device.startswith("cpu"):
        return bool(requested), "bf16: true" if requested else "auto: fp32 on CUDA (bf16: true to autocast)"
    cap = detect()
    if requested:
        if not cap.native:
            log.warning("bf16 training on a CPU without native bf16 is emulated by torch and slow (%s)", cap.reason)
        return True, f"bf16: true ({cap.reason})"
    return cap.native, f"auto: {cap.reason}"


def _set_up(job: TrainJob, tracking: bool = True) -> _Setup:
    """Resolve the device (fails fast when cuda is asked for and absent), load the snapshot, point MLflow (unless
    not `tracking`: the ranks > 0 of a data-parallel run, which log nothing)."""
    import torch

    from model.train import TrainConfig, resolve_device
    from pipeline.io.snapshot import load_snapshot, manifest_digest
    from pipeline.training.cold_head_fit import fit_alignment

    device = str(resolve_device(job.device))
    snap = load_snapshot(job.snapshot)
    if snap.test.n_users == 0 or snap.valid.n_users == 0:
        raise DataError(f"snapshot {job.snapshot} has no validation or test users", "rebuild it with held-out users")
    job.check_budget(snap.n_items, device)  # before any run is opened: over budget, nothing is logged or registered
    bf16, why = training_bf16(job.bf16, device)
    log.info("training precision: %s (%s)", "bf16 autocast" if bf16 else "fp32", why)
    train_cfg = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, lr_decay=job.lr_decay,
                            lr_decay_patience=job.lr_decay_patience, ema_halflife=job.ema_halflife,
                            seed=job.seed, device=device,
                            bf16=bf16, patience=job.patience, progress=job.progress)
    # every rank of a data-parallel run builds the same target (deterministic), so their losses agree
    alignment, alignment_info, head = fit_alignment(snap, job.cold_head, job.marec_align, job.max_dense_bytes)
    head = head if job.cold_head is not None else None  # built with ColdHeadConfig()'s defaults: not the bundle's
    if not tracking:
        return _Setup(job, device, snap, "", "", "", None, np.zeros(0), train_cfg, alignment, alignment_info, head)
    registry.setup(job.tracking_uri)
    experiment_id = registry.ensure_experiment(job.experiment, job.tracking_uri)
    return _Setup(job, device, snap, experiment_id, registry.git_commit(), manifest_digest(snap.manifest),
                  torch.as_tensor(snap.item_popularity()), snapshot_counts(snap), train_cfg, alignment, alignment_info,
                  head)


def _log_inputs(s: _Setup) -> dict[str, Any]:
    """Run tags, the job as params (credentials redacted), the snapshot as the run's dataset input; returns
    the redacted job (it also goes into the bundle's config)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    job, snap = s.job, s.snap
    mlflow.set_tags({"snapshot_id": snap.snapshot_id, "snapshot_uri": job.snapshot, "git_commit": s.commit,
                     "model": job.model, "device": s.device, "machine": machine_name(s.device)})
    mlflow.set_tags({k: v for k, v in job.tags.items() if k not in ("model", "snapshot_id", "snapshot_uri")})
    public_cfg: dict[str, Any] = redact_values(job.model_dump(mode="json"))  # tracking_uri may carry user:password
    mlflow.log_params(flatten(public_cfg))
    mlflow.log_params(world_params())  # world_size and ddp_backend, in a data-parallel run only
    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all are fine
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(job.snapshot)
    dataset = MetaDataset(source, name=f"snapshot-{snap.snapshot_id}", digest=s.digest)  # type: ignore[abstract]
    mlflow.log_input(dataset, context="training", tags={"counts": json.dumps(snap.manifest.get("counts", {}))})
    return public_cfg


def _fit_candidate(s: _Setup, on_epoch: EpochHook | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit the candidate (and, to compare, the same model without PIA, metrics under `compare.<name>.`); returns
    the fitted models by name and the candidate's metrics (`test.*`, `best_epoch`)."""
    import mlflow

    job = s.job
    names = _fit_order(job)
    if s.alignment_info:
        mlflow.set_tags(s.alignment_info)
    # the search (validation users only, nested runs) picks each model's overrides; the winner is refit below
    winners = search_models(s, names) if job.search is not None else {}
    trained: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for name in names:
        prefix = "" if name == job.model else f"compare.{name}."
        rec = s.build(name, winners.get(name))
        rec.fit(s.snap.train, s.snap.valid, on_epoch=_epoch_logger(prefix, job.vae, on_epoch if not prefix else None))
        trained[name] = rec
        summary = summary_metrics(summarize(name, job.seed, rec, s.test_eval(rec), s.counts), job.top_n)
        mlflow.log_metrics({f"{prefix}test.{k}": v for k, v in summary.items() if np.isfinite(v)})
        mlflow.log_metrics({f"{prefix}best_epoch": float(rec.best_epoch), f"{prefix}fit_seconds": rec.fit_seconds})
        if not prefix:
            metrics.update({f"test.{k}": v for k, v in summary.items()})
            metrics["best_epoch"] = float(rec.best_epoch)
        else:  # the twin's test metrics also become version tags: the gate's ablation check reads them
            metrics.update({f"{prefix}test.{k}": v for k, v in summary.items() if not k.startswith("group.")})
    return trained, metrics


def _fit_closed_form(s: _Setup) -> tuple[dict[str, Any], dict[str, float]]:
    """A closed-form main model (EASE, EDLAE): one solve per l2 of `l2_grid` on the training users, the best
    validation NDCG@100 kept (validation users only, as pipeline.research.experiment's search), its test users
    scored once. Logs `tune.val_ndcg_at_100` per value (step = its index), param `chosen.l2`; no twin, no epochs."""
    import mlflow

    from model.evaluate import evaluate
    from model.recommenders import make_recommender

    job, snap = s.job, s.snap
    best: tuple[float, Any, float] | None = None
    for i, l2 in enumerate(job.l2_grid):
        rec = make_recommender(job.model, train=s.train_cfg, ease=job.ease.model_copy(update={"l2": l2}))
        rec.fit(snap.train, snap.valid)
        val = evaluate(rec.score, snap.valid.fold_in, snap.valid.targets, device=rec.device).mean()
        mlflow.log_metrics({"tune.l2": l2, "tune.val_ndcg_at_100": val["ndcg@100"],
                            "tune.val_recall_at_20": val["recall@20"]}, step=i)
        print(f"{job.model} l2={l2:g}: val ndcg@100={val['ndcg@100']:.4f}", flush=True)
        if best is None or val["ndcg@100"] > best[0]:
            best = (val["ndcg@100"], rec, l2)
        del rec  # one dense I x I at a time (the best is kept in `best`)
    assert best is not None
    val_best, rec, l2 = best
    mlflow.log_params({"chosen.l2": l2})
    summary = summary_metrics(summarize(job.model, job.seed, rec, s.test_eval(rec), s.counts), job.top_n)
    mlflow.log_metrics({f"test.{k}": v for k, v in summary.items() if np.isfinite(v)})
    mlflow.log_metrics({"best_epoch": 0.0, "fit_seconds": rec.fit_seconds, "val_ndcg_at_100": val_best})
    metrics = {f"test.{k}": v for k, v in summary.items()} | {"best_epoch": 0.0, "chosen.l2": float(l2)}
    return {job.model: rec}, metrics


def _fit_baselines(s: _Setup, trained: dict[str, Any] | None = None) -> dict[str, float]:
    """The gate's baselines on the same split: popularity, and EASE unless the catalog exceeds max_ease_items
    (then tagged `baseline.ease: skipped ...`); returns their `baseline.<name>.*` test metrics. A main model that
    is EASE itself (in `trained`) is its own EASE baseline (not solved twice)."""
    import mlflow

    job, snap = s.job, s.snap
    metrics: dict[str, float] = {}
    for name in ("popularity", "ease"):
        if name == "ease" and snap.n_items > job.max_ease_items:
            mlflow.set_tag("baseline.ease", f"skipped: {snap.n_items} items > max_ease_items={job.max_ease_items}")
            continue
        rec = (trained or {}).get(name) or s.build(name).fit(snap.train, snap.valid)
        summary = summary_metrics(summarize(name, job.seed, rec, s.test_eval(rec), s.counts), job.top_n)
        base = {f"baseline.{name}.{k}": v for k, v in summary.items() if not k.startswith("group.")}
        mlflow.log_metrics({k: v for k, v in base.items() if np.isfinite(v)})
        metrics.update(base)
        print(f"baseline {name}: ndcg@100={summary['ndcg_at_100']:.4f}", flush=True)
    return metrics


def _log_figures(s: _Setup, trained: dict[str, Any], d: Path) -> None:
    """plots/training_curves.png and plots/latent_space.png (test users' latents, colored by activity group)."""
    import mlflow

    from pipeline.training import plots

    group_of = np.full(len(s.counts), "", dtype=object)
    for g, mask in activity_groups(s.counts).items():
        group_of[mask] = g
    plots.training_curves({n: r.history for n, r in trained.items()}, d / "training_curves.png")
    latents = {n: _latent_means(r, s.snap.test.fold_in, str(r.device)) for n, r in trained.items()}
    plots.latent_space(latents, group_of.astype(str), d / "latent_space.png")
    mlflow.log_artifact(str(d / "training_curves.png"), "plots")
    mlflow.log_artifact(str(d / "latent_space.png"), "plots")


def _log_model(s: _Setup, main: Any, public_cfg: dict[str, Any], d: Path) -> str:
    """The model: one pyfunc with the bundle (weights on CPU, item ids, popularity, config) as its artifact;
    returns its model URI."""
    import mlflow

    from pipeline.io.bundle import ModelBundle
    from pipeline.io.pyfunc import BundleModel
    from pipeline.training.cold_head_fit import fit_cold_head

    job, snap = s.job, s.snap
    main.to("cpu")
    head, head_info = fit_cold_head(main, snap, job.cold_head, job.max_dense_bytes, prebuilt=s.alignment_head)
    mlflow.set_tags(head_info)
    bundle = ModelBundle(main, snap.item_ids, snap.item_popularity(), job.model,
                         public_cfg | {"best_epoch": getattr(main, "best_epoch", 0)} |
                         ({"l2": getattr(getattr(main, "config", None), "l2", None)} if job.closed_form else {}),
                         snap.snapshot_id, cold_head=head)
    bundle_dir = bundle.save(d / "bundle")
    signature, example = _signature(bundle_dir, bundle, snap)
    info = mlflow.pyfunc.log_model(name="model", python_model=BundleModel(), artifacts={"bundle": str(bundle_dir)},
                                   signature=signature, input_example=example, pip_requirements=_pip_requirements())
    return str(info.model_uri)


def _register(s: _Setup, run_id: str, model_uri: str, metrics: dict[str, float]) -> str:
    """Register the logged model as a new version of `registered_name` (alias `challenger`), tagged with its
    lineage, `gate.verdict: pending` and its test/baseline metrics; returns the version."""
    job, snap = s.job, s.snap
    tags = {"snapshot_id": snap.snapshot_id, "snapshot_uri": job.snapshot, "git_commit": s.commit, "run_id": run_id,
            "model": job.model, "device": s.device, "gate.verdict": "pending",
            "snapshot_digest": s.digest}  # the gate checks the snapshot it reloads against this
    tags = job.tags | tags  # the lineage tags win over extra ones
    tags.update({k: f"{v:.6g}" for k, v in metrics.items()
                 if k.startswith(("test.", "baseline.", "compare.", "chosen.")) and "group." not in k})
    return registry.register(model_uri, job.registered_name, tags, job.tracking_uri)
