"""`recsys experiment`: the strong-generalization evaluation of several models over several seeds.

Per seed: one user split (seed s), models trained on the training users, the epoch and every
hyperparameter chosen on validation users only, test users scored once. Hyperparameter grids (EASE's
l2, EDLAE's (l2, dropout) pairs, PIA's lambda_A) are searched on the validation users of the first seed's split;
the chosen values are then used for every seed (the first seed reuses the model trained during the search).

Autoencoder settings (`arch_grid`: width, latent size, dropout, KL weight, learning rate, ...) are searched the same
way, crossed with lambda_A for the PIA models. `tune_only` runs the searches and stops: no test user is scored, so
the values of one grid can be searched in parallel processes and the best (on validation) run over seeds afterwards.

Every finished fit is recorded in OUT/checkpoint.json, each grid value of a search too; `resume=True` (`--resume`)
reuses those fits and runs only the rest. An autoencoder fit also saves its trainer state after an epoch
(OUT/partial/, at most every `partial_every_s`, with the run's fingerprint; removed when the fit ends), and a resumed
run continues the fit it was in from its last saved epoch, with the draws an uninterrupted fit would make: a stop
loses at most that interval and an epoch, which matters where one fit outlasts a session (a wide RecVAE on gowalla:
about an hour on 2 CPU cores). (A search resumed after its best value's fit holds only that fit's validation row:
the value is fit once more, with the same seed, for the test scoring.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from model.base import Recommender
from model.ease import EASEConfig, EDLAEConfig
from model.evaluate import evaluate
from model.pia import PIAConfig
from model.popularity import item_popularity
from model.recommenders import ARCHS, CLOSED_FORM, MODEL_NAMES, epoch_budget, make_recommender
from model.split import Split, SplitError, strong_generalization_split
from model.train import TrainConfig, resolve_device
from pipeline.data.dataset import BinarizeRule, Interactions, prepare, read_interactions, resolve_dataset
from pipeline.data.synth import synth_interactions
from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.io.publish import write_single_object
from pipeline.job import Job, JobResult
from pipeline.research.report import hp_label, write_report
from pipeline.training.evaluation import ACTIVITY_GROUPS, METRICS, machine_name, summarize

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
CHECKPOINT = "checkpoint.json"
PARTIAL = "partial"  # OUT/partial/<fit>.pt: the trainer state of an autoencoder fit that has not ended
# options a resumed run may change: where it writes, bars, and how many seeds/models it runs (fits are keyed by both)
# (and tune_only: a run resumed without it scores the test users of the values its searches chose)
RESUMABLE = frozenset({"out", "progress", "resume", "seeds", "models", "tune_only", "keep_fits", "partial_every_s"})
# a searched value: a float (EASE's l2, PIA's lambda_A), EDLAE's (l2, dropout) pair (a list once read from JSON), or
# an autoencoder's settings (arch_grid: model-config fields and TRAIN_KEYS, plus lambda_a for a -pia model)
HP = float | tuple[float, ...] | list[float] | dict[str, Any]
LAMBDA_A = "lambda_a"  # the PIA weight inside an arch_grid value
# trainer settings an arch_grid value may set besides the model's
TRAIN_KEYS = ("lr", "batch_size", "weight_decay", "lr_decay", "lr_decay_patience", "ema_halflife")
# PIA's own settings an arch_grid value may set for a -pia model: pia_<PIAConfig field> (lambda_a is the weight)
PIA_KEYS = tuple(f"pia_{f}" for f in PIAConfig.model_fields if f != "weight")
# around ml-1m's validation optimum (l2 100, p 0.5; p 0.67-0.8 and 0.1-0.25 were worse), l2 widened as EASE's grid
DEFAULT_EDLAE_GRID = ((30.0, 0.5), (100.0, 0.25), (100.0, 0.5), (100.0, 0.67), (300.0, 0.5), (1000.0, 0.5))


class ExperimentResult(JobResult):
    """The results table (as written to results.json) and where it was written."""

    results: dict[str, Any]
    results_json: str
    results_md: str


class ExperimentJob(Job):
    """Several models over several seeds under the strong-generalization protocol (see the module doc)."""

    dataset: str
    data_dir: Path = Path("../shared/data")
    models: tuple[str, ...] = ("popularity", "ease", "multivae", "multivae-pia")
    seeds: int = Field(5, ge=1)
    first_seed: int = 0
    out: Path
    device: str = "auto"
    epochs: int = Field(200, ge=1, description="max epochs of the autoencoders (early stopping ends them)")
    recvae_epochs: int | None = Field(None, ge=1, description="max epochs of RecVAE; not given: `epochs` (a run "
                                                              "recorded with None before meant min(epochs, 50))")
    patience: int | None = Field(20, ge=1, description="early stop after this many epochs without a better val NDCG@100")
    bf16: bool = False
    cuda_graph: bool = False  # Multi-VAE/DAE only (model.graph_step); RecVAE trains eagerly
    min_rating: float | None = Field(None, description="binarize: rating >= this (default 4 when a rating column exists)")
    min_user_interactions: int = Field(5, ge=1)
    n_valid: float = Field(0.1, gt=0)
    n_test: float = Field(0.1, gt=0)
    pia_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    pia_estimator: str = "closed_form"
    ease_grid: tuple[float, ...] = (100.0, 250.0, 500.0, 1000.0)
    edlae_grid: tuple[tuple[float, float], ...] = Field(DEFAULT_EDLAE_GRID, description="EDLAE's (l2, dropout) pairs")
    max_ease_items: int = Field(50_000, ge=1, description="skip EASE/EDLAE (I x I dense) above this catalog size")
    arch_grid: tuple[dict[str, Any], ...] = Field((), description="autoencoder settings searched on validation users: "
                                                  "each a set of model-config fields (VAEConfig for Multi-VAE/DAE, "
                                                  "RecVAEConfig for RecVAE) and/or the trainer's TRAIN_KEYS; crossed "
                                                  "with pia_grid for -pia")
    tune_only: bool = Field(False, description="run the searches on the first seed's validation users and stop: "
                                               "no test user is scored, models without a grid are not fit")
    keep_fits: bool = Field(False, description="pickle each search's winner to OUT/fits/ (autoencoders only): the "
                                               "resumed run that scores it loads it instead of fitting it again")
    partial_every_s: float = Field(300.0, ge=0.0, description="save an autoencoder fit's trainer state to "
                                   "OUT/partial/ after an epoch when this many seconds passed since the last save "
                                   "(0: every epoch); a state is GBs for a wide model on a large catalogue")
    synthetic_users: int = 3000
    synthetic_items: int = 1000
    progress: bool = True
    resume: bool = False  # reuse the fits recorded in out/checkpoint.json (same options, else a clear error)

    @field_validator("models")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in MODEL_NAMES]
        if bad or not v:
            raise ValueError(f"unknown model(s) {bad}: choose from {', '.join(MODEL_NAMES)}")
        return tuple(dict.fromkeys(v))

    @field_validator("pia_grid")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("pia_grid needs at least one lambda_A > 0")
        return v

    @field_validator("edlae_grid")
    @classmethod
    def _edlae_pairs(cls, v: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if not v or any(not (l2 > 0 and 0 <= p < 1) for l2, p in v):
            raise ValueError("edlae_grid needs at least one (l2, dropout) pair with l2 > 0 and 0 <= dropout < 1")
        return v

    @model_validator(mode="before")
    @classmethod
    def _recvae_gets_the_same_budget(cls, data: Any) -> Any:
        """RecVAE's cap defaults to `epochs`, recorded as a number. Its paper's 50 epochs were sized for ML-20M
        (~270 batches an epoch); on ml-1m and anime the best epochs reached 44-50 of 50, and ml-1m's validation
        NDCG@100 went 0.4211 -> 0.4282 with 150 (docs/results.md)."""
        if isinstance(data, dict) and data.get("recvae_epochs") is None:
            return {**data, "recvae_epochs": data.get("epochs", cls.model_fields["epochs"].default)}
        return data

    @model_validator(mode="after")
    def _arch_grid_fits_the_models(self) -> ExperimentJob:
        """Every key of every arch_grid set is a setting of every autoencoder in `models`, with a value it accepts."""
        autoencoders = [m for m in self.models if m.removesuffix("-pia") in ARCHS]
        if self.arch_grid and not autoencoders:
            raise ValueError("arch_grid applies to the autoencoders (multivae, multidae, recvae and their -pia); "
                             "none is in models")
        for i, overrides in enumerate(self.arch_grid):
            if not overrides:
                raise ValueError(f"arch_grid set {i} is empty: give at least one setting (e.g. dropout=0.3)")
            for name in autoencoders:
                arch_settings(name, overrides)  # a ValueError names the key or value and the choices
        if self.tune_only and not any(Experiment.grid_of(self, m) for m in self.models):
            raise ValueError("tune_only: no model in models has values to search (ease, edlae, a -pia model, or an "
                             "autoencoder with arch_grid)")
        return self

    def run(self) -> ExperimentResult:
        """Every model and seed; results.json/results.md are rewritten after each seed."""
        results = Experiment(self).run()
        return ExperimentResult(results=json.loads(json.dumps(results, default=_json_default)),
                                results_json=str(self.out / "results.json"), results_md=str(self.out / "results.md"))


def load_experiment_data(cfg: ExperimentJob) -> Interactions:
    """The data set named by the job (or the synthetic one), binarized and filtered."""
    if cfg.dataset == SYNTHETIC:
        df = synth_interactions(cfg.synthetic_users, cfg.synthetic_items, seed=12345)
        return prepare(df, BinarizeRule(), cfg.min_user_interactions)
    path = resolve_dataset(cfg.dataset, cfg.data_dir)
    df = read_interactions(path)  # read once: the rule depends on whether a rating column exists
    default = 4.0 if "rating" in df.columns else None
    rule = BinarizeRule(min_rating=cfg.min_rating if cfg.min_rating is not None else default)
    data = prepare(df, rule, cfg.min_user_interactions)
    data.stats["path"] = str(path)
    return data


def arch_settings(name: str, overrides: dict[str, Any]) -> tuple[BaseModel, dict[str, Any]]:
    """An autoencoder's model config with `overrides` applied, and the trainer settings they set (their TRAIN_KEYS;
    empty: the defaults). ValueError naming the key and the fields of the model's config when a key is unknown or
    a value refused."""
    arch = name.removesuffix("-pia")
    base = ARCHS[arch][1]()
    fields = sorted(type(base).model_fields)
    train = {k: v for k, v in overrides.items() if k in TRAIN_KEYS}
    for key, value in train.items():
        try:
            TrainConfig.model_validate({key: value})
        except ValidationError as e:
            raise ValueError(f"arch_grid: {key}={value!r} for {name}: {e.errors()[0]['msg']}") from None
    pia_settings(name, overrides)  # a ValueError names a refused pia_* key or value
    unknown = [k for k in overrides if k not in fields and k not in TRAIN_KEYS and k not in PIA_KEYS]
    if unknown:
        raise ValueError(f"arch_grid: {', '.join(map(repr, unknown))} is not a setting of {name} "
                         f"({type(base).__name__}); choose from {', '.join(TRAIN_KEYS)}, {', '.join(fields)}"
                         f"{', ' + ', '.join(PIA_KEYS) if name.endswith('-pia') else ''} (or run {name} in its own "
                         "experiment)")
    try:
        config = type(base).model_validate(base.model_dump() | {k: v for k, v in overrides.items()
                                                                 if k not in train and k not in PIA_KEYS})
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"arch_grid: {'.'.join(map(str, first['loc']))}={first.get('input')!r} for {name}: "
                         f"{first['msg']}") from None
    return config, train


def pia_settings(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The PIAConfig fields an arch_grid value sets (its pia_* keys, prefix dropped). ValueError when one is given
    for a model without PIA or its value is refused."""
    given = {k: v for k, v in overrides.items() if k in PIA_KEYS}
    if given and not name.endswith("-pia"):
        raise ValueError(f"arch_grid: {', '.join(given)} set PIA's anchors, which {name} does not train (run {name} "
                         "in its own experiment, or give the pia_* keys only with -pia models)")
    fields = {k.removeprefix("pia_"): v for k, v in given.items()}
    try:
        PIAConfig.model_validate({"weight": 1.0} | fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"arch_grid: pia_{'.'.join(map(str, first['loc']))}={first.get('input')!r} for {name}: "
                         f"{first['msg']}") from None
    return fields


class Experiment:
    """The harness behind ExperimentJob.run: splits, searches on validation users, fits, scores test users once."""
    def __init__(self, cfg: ExperimentJob):
        self.cfg = cfg
        self.device = str(resolve_device(cfg.device))
        self._fingerprint: dict[str, Any] = {}  # run() sets it

    def train_config(self, name: str, seed: int) -> TrainConfig:
        """The trainer settings of one model and seed."""
        epochs = epoch_budget(name, self.cfg.epochs, self.cfg.recvae_epochs) or self.cfg.epochs
        return TrainConfig(epochs=epochs, lr=5e-4 if name.startswith("recvae") else 1e-3, seed=seed, device=self.device,
                           bf16=self.cfg.bf16, cuda_graph=self.cfg.cuda_graph and name.startswith("multi"),
                           patience=self.cfg.patience, progress=self.cfg.progress)

    def build(self, name: str, seed: int, hp: HP | None) -> Recommender:
        """A fresh model; `hp` is the searched value (EASE l2, EDLAE (l2, dropout), PIA lambda_A or arch_grid's)."""
        if isinstance(hp, dict):
            model_config, trainer = arch_settings(name, {k: v for k, v in hp.items() if k != LAMBDA_A})
            train = self.train_config(name, seed).model_copy(update=trainer)
            weight = hp.get(LAMBDA_A)
            pia = PIAConfig.model_validate({"weight": weight, "estimator": self.cfg.pia_estimator}
                                           | pia_settings(name, hp)) if weight else None
            return make_recommender(name, train=train, pia=pia, model_config=model_config)
        ease: EASEConfig | None = None
        if name == "edlae" and isinstance(hp, tuple | list):
            ease = EDLAEConfig(l2=hp[0], dropout=hp[1])
        elif name == "ease" and isinstance(hp, float | int) and hp:
            ease = EASEConfig(l2=hp)
        pia = PIAConfig(weight=hp, estimator=self.cfg.pia_estimator) if name.endswith("-pia") and \
            isinstance(hp, float | int) and hp else None
        return make_recommender(name, train=self.train_config(name, seed), pia=pia, ease=ease)

    def grid(self, name: str) -> tuple[HP, ...]:
        """The values searched for a model on validation users (empty: nothing to search)."""
        return self.grid_of(self.cfg, name)

    @staticmethod
    def grid_of(cfg: ExperimentJob, name: str) -> tuple[HP, ...]:
        if name == "ease":
            return cfg.ease_grid
        if name == "edlae":
            return cfg.edlae_grid
        if cfg.arch_grid and name.removesuffix("-pia") in ARCHS:
            if name.endswith("-pia"):
                return tuple(dict(a) | {LAMBDA_A: w} for a in cfg.arch_grid for w in cfg.pia_grid)
            return tuple(dict(a) for a in cfg.arch_grid)
        if name.endswith("-pia"):
            return cfg.pia_grid
        return ()

    def run(self) -> dict[str, Any]:
        """The whole experiment; returns the results dict also written to results.json."""
        cfg = self.cfg
        t_start = time.perf_counter()
        data = load_experiment_data(cfg)
        models = [m for m in cfg.models if not (m in ("ease", "edlae") and data.n_items > cfg.max_ease_items)]
        skipped = [m for m in cfg.models if m not in models]
        counts = np.diff(data.matrix.indptr)
        seeds = list(range(cfg.first_seed, cfg.first_seed + (1 if cfg.tune_only else cfg.seeds)))
        fingerprint = self.fingerprint(data)
        self._fingerprint = fingerprint  # a partial fit continues only under the run options it was written with
        ckpt = read_checkpoint(cfg.out, fingerprint) if cfg.resume else None
        if ckpt is None and (cfg.out / CHECKPOINT).exists():
            log.warning("%s holds the fits of an earlier run: starting over (--resume continues it)", cfg.out / CHECKPOINT)
        earlier = ckpt or {"per_seed": {}, "tuning": {}, "chosen": {}, "wall_seconds": 0.0}
        searching: dict[str, list[dict[str, Any]]] = dict(earlier.get("searching", {}))  # unfinished searches
        restored = {(m, r["seed"]): r for m, rows in earlier["per_seed"].items() for r in rows}
        earlier_wall = earlier["wall_seconds"]
        per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
        tuning: dict[str, list[dict[str, Any]]] = {}
        chosen: dict[str, HP | None] = {}
        resumed: list[str] = []

        def save_checkpoint() -> None:
            """Every fit so far, also of unfinished seeds and of the earlier run's other models and seeds."""
            fits = restored | {(m, r["seed"]): r for m, rows in per_seed.items() for r in rows}
            grouped: dict[str, list[dict[str, Any]]] = {}
            for (m, _), r in sorted(fits.items()):
                grouped.setdefault(m, []).append(r)
            state = {"version": 1, "fingerprint": fingerprint, "per_seed": grouped,
                     "tuning": earlier["tuning"] | tuning, "chosen": earlier["chosen"] | chosen,
                     "searching": {m: rows for m, rows in searching.items() if m not in tuning},
                     "wall_seconds": earlier_wall + time.perf_counter() - t_start}
            _write(cfg.out / CHECKPOINT, json.dumps(state, indent=1, default=_json_default))

        def write(done: list[int]) -> dict[str, Any]:
            """results.json/md for the seeds finished so far (rewritten after each seed: a stopped run keeps them)."""
            results = {
                "dataset": cfg.dataset,
                "data": {k: v for k, v in data.stats.items() if k != "path"} | {"users": data.n_users,
                                                                                  "items": data.n_items,
                                                                                  "nnz": int(data.matrix.nnz)},
                "config": json.loads(cfg.model_dump_json(exclude={"resume"})),
                "seeds": done,
                "seeds_planned": len(seeds),
                "tune_only": cfg.tune_only,
                "device": self.device,
                "machine": machine_name(self.device),
                "models": {m: aggregate(per_seed[m]) for m in models if per_seed[m]},
                "per_seed": per_seed,
                "tuning": tuning,
                "chosen": chosen,
                "skipped": {m: f"catalog of {data.n_items} items > max_ease_items={cfg.max_ease_items}" for m in skipped},
                "pia_uplift": pia_uplift(per_seed),
                "resumed": resumed,
                "wall_seconds": earlier_wall + time.perf_counter() - t_start,
            }
            _write(cfg.out / "results.json", json.dumps(results, indent=2, default=_json_default))
            write_report(results, cfg.out / "results.md")
            return results

        results: dict[str, Any] = {}
        for si, seed in enumerate(seeds):
            split: Split | None = None
            for name in models:
                if cfg.tune_only and not (si == 0 and self.grid(name)):
                    continue  # nothing to search: not fit (its test users are scored by the run that follows)
                if (name, seed) in restored:
                    per_seed[name].append(restored[(name, seed)])
                    if si == 0 and self.grid(name):  # the search was done on this split by the earlier run
                        chosen[name], tuning[name] = earlier["chosen"][name], earlier["tuning"][name]
                    resumed.append(f"{name} seed {seed}")
                    print(f"[{cfg.dataset}] {name:<13} seed {seed}: restored from {cfg.out / CHECKPOINT}", flush=True)
                    continue
                if split is None:
                    split = self.split(data, seed)
                    pop = item_popularity(split.train)
                if si == 0 and self.grid(name):
                    def searched(rows: list[dict[str, Any]], name: str = name) -> None:
                        searching[name] = rows
                        save_checkpoint()

                    # a finished search (a tune_only run's) is restored whole: only its winner is fit again
                    prior = searching.get(name) or earlier["tuning"].get(name, [])
                    resumed.extend(f"{name} value {hp_label(r['value'])} (search, seed {seed})" for r in prior)
                    if cfg.tune_only and name in earlier["tuning"]:
                        chosen[name], tuning[name] = earlier["chosen"][name], earlier["tuning"][name]
                        continue
                    rec, chosen[name], tuning[name] = self.tune(name, seed, split, prior, searched,
                                                                refit=not cfg.tune_only)
                    if cfg.tune_only:
                        save_checkpoint()
                        print(f"[{cfg.dataset}] {name:<13} chosen on validation: {hp_label(chosen[name])} "
                              "(tune only: no test user scored)", flush=True)
                        continue
                else:
                    rec = self.build(name, seed, chosen.get(name))
                    self.fit(rec, name, seed, chosen.get(name), split)
                assert rec is not None  # tune refits a restored winner unless tune_only
                res = evaluate(rec.score, split.test.fold_in, split.test.targets, device=rec.device, item_popularity=pop)
                row = summarize(name, seed, rec, res, counts[split.test.users])
                per_seed[name].append(row)
                save_checkpoint()
                log.info("%s seed %d: %s", name, seed, {k: round(row[k], 4) for k in METRICS})
                # one summary line per fit, also without progress bars
                print(f"[{cfg.dataset}] {name:<13} seed {seed}: " +
                      " ".join(f"{k}={row[k]:.4f}" for k in METRICS) + f" fit {row['fit_seconds']:.1f}s", flush=True)
            results = write(seeds[: si + 1])
        return results

    def fingerprint(self, data: Interactions) -> dict[str, Any]:
        """What a checkpoint's fits depend on: every option but RESUMABLE, the device, and the data's shape.
        (edlae_grid only when not the default: checkpoints written before it existed still resume.)"""
        exclude = set(RESUMABLE) | ({"edlae_grid"} if self.cfg.edlae_grid == DEFAULT_EDLAE_GRID else set()) | \
            ({"arch_grid"} if not self.cfg.arch_grid else set())
        return {"config": json.loads(self.cfg.model_dump_json(exclude=exclude)), "device": self.device,
                "data": {"users": data.n_users, "items": data.n_items, "nnz": int(data.matrix.nnz)}}

    def split(self, data: Interactions, seed: int) -> Split:
        """The strong-generalization user split of one seed."""
        try:
            return strong_generalization_split(data.matrix, seed=seed, n_valid=_count(self.cfg.n_valid),
                                               n_test=_count(self.cfg.n_test))
        except SplitError as e:
            raise DataError(f"the data set is too small for the held-out split: {e}",
                            "use a larger data set, or smaller --n-valid/--n-test") from e

    def tune(self, name: str, seed: int, split: Split, done: list[dict[str, Any]] | None = None,
             on_value: Callable[[list[dict[str, Any]]], None] | None = None, refit: bool = True,
             ) -> tuple[Recommender | None, HP, list[dict[str, Any]]]:
        """Grid search on validation users; returns the best model (fit), its value, the table. `done`: rows of
        values an earlier, stopped run finished (not fit again); `on_value(table)` after each new value; `refit`:
        fit a restored winner again (else its model is None)."""
        restored = {_hp_key(r["value"]): r for r in done or []}
        best: tuple[float, Recommender | None, HP] | None = None
        table: list[dict[str, Any]] = []
        for hp in self.grid(name):
            rec: Recommender | None = None
            if _hp_key(hp) in restored:
                row = restored[_hp_key(hp)] | {"value": hp}  # the grid's spelling (a pair is a list in JSON)
                print(f"[{self.cfg.dataset}] tune {name} {hp_label(hp)}: val ndcg@100={row['val_ndcg@100']:.4f} "
                      "(restored)", flush=True)
            else:
                rec = self.build(name, seed, hp)
                self.fit(rec, name, seed, hp, split)
                val = evaluate(rec.score, split.valid.fold_in, split.valid.targets, device=rec.device).mean()
                row = {"value": hp, "val_ndcg@100": val["ndcg@100"], "val_recall@20": val["recall@20"],
                       "best_epoch": float(getattr(rec, "best_epoch", 0))}
                print(f"[{self.cfg.dataset}] tune {name} {hp_label(hp)}: val ndcg@100={row['val_ndcg@100']:.4f}",
                      flush=True)
            table.append(row)
            if rec is not None and on_value is not None:
                on_value(list(table))
            if best is None or row["val_ndcg@100"] > best[0]:
                best = (row["val_ndcg@100"], rec, hp)
        assert best is not None
        _, rec, hp = best
        if rec is None and refit and (kept := self.kept_fit(name, seed, hp)) is not None:
            print(f"[{self.cfg.dataset}] tune {name}: the chosen {hp_label(hp)} loaded from {kept[1]} (kept by the "
                  "run that searched it)", flush=True)
            rec = kept[0]
        elif rec is None and refit:  # the winner was fit by the stopped run: fit it again, same seed, for the test scoring
            print(f"[{self.cfg.dataset}] tune {name}: refitting the chosen {hp_label(hp)} (its fit was in the stopped "
                  "run)", flush=True)
            rec = self.build(name, seed, hp)
            self.fit(rec, name, seed, hp, split)
        elif rec is not None and self.cfg.keep_fits and name not in CLOSED_FORM:
            self.keep_fit(name, seed, hp, rec)
        return rec, hp, table

    def fit(self, rec: Recommender, name: str, seed: int, hp: HP | None, split: Split) -> None:
        """Fit one model. An autoencoder saves its trainer state to OUT/partial/ after an epoch (at most every
        `partial_every_s`); with `resume` a state left there by a stopped run of the same fit is continued from its
        epoch."""
        if name in CLOSED_FORM:
            rec.fit(split.train, split.valid)
            return
        path = self.cfg.out / PARTIAL / f"{self._fit_path(name, seed, hp).stem}.pt"
        state = self._partial_state(path, rec) if self.cfg.resume and path.exists() else None
        if state is not None:
            what = name if hp is None else f"{name} {hp_label(hp)}"
            print(f"[{self.cfg.dataset}] {what} seed {seed}: continuing the stopped fit after epoch {state['epoch']} "
                  f"({path})", flush=True)

        last_save = time.monotonic()

        def save(st: dict[str, Any]) -> None:  # whole or not at all: a stop while writing keeps the last saved file
            nonlocal last_save
            if time.monotonic() - last_save < self.cfg.partial_every_s:
                return
            resolve(path).write_with(lambda f: torch.save({"fingerprint": self._fingerprint, "trainer": st}, f))
            last_save = time.monotonic()

        rec.fit(split.train, split.valid, checkpoint=save, resume=state)
        path.unlink(missing_ok=True)

    def _partial_state(self, path: Path, rec: Recommender) -> dict[str, Any] | None:
        """The stopped fit's trainer state, or None (with a warning: the fit starts over) when it is unreadable or
        was written with other trainer settings."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)  # written by this run's own --out
        except Exception as e:  # a torn or foreign file: refit rather than fail the run
            log.warning("%s cannot be read (%s): fitting from the start", path, e)
            return None
        state = saved.get("trainer") if isinstance(saved, dict) else None
        want = getattr(rec, "train_config", None)
        if not isinstance(state, dict) or want is None or state.get("config") != want.model_dump() or \
                saved.get("fingerprint") != self._fingerprint:
            log.warning("%s was written with other trainer settings or run options: fitting from the start", path)
            return None
        return state

    def _fit_path(self, name: str, seed: int, hp: HP | None) -> Path:
        key = hashlib.sha256(json.dumps([name, seed, _hp_key(hp)]).encode()).hexdigest()[:16]
        return self.cfg.out / "fits" / f"{name}-seed{seed}-{key}.pkl"

    def keep_fit(self, name: str, seed: int, hp: HP, rec: Recommender) -> None:
        """The search's winner pickled (weights on the CPU) for the run that scores its test users."""
        write_single_object(resolve(self._fit_path(name, seed, hp)), pickle.dumps(rec, pickle.HIGHEST_PROTOCOL))

    def kept_fit(self, name: str, seed: int, hp: HP) -> tuple[Recommender, Path] | None:
        """The fit keep_fit pickled for this model, seed and value (this run's own --out only), else None."""
        path = self._fit_path(name, seed, hp)
        if not path.exists():
            return None
        with path.open("rb") as f:
            rec = pickle.load(f)  # written by keep_fit into this run's own --out
        return rec.to(self.device), path


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds; std is None with a single seed (no spread to report)."""
    out: dict[str, Any] = {}
    for m in (*METRICS, "coverage@20", "mean_popularity@20", "fit_seconds"):
        vals = np.array([r[m] for r in rows], dtype=float)
        out[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
    groups: dict[str, Any] = {}
    for g, _, _ in ACTIVITY_GROUPS:
        groups[g] = {"users": float(np.mean([r["groups"][g]["users"] for r in rows]))}
        for m in METRICS:
            vals = np.array([r["groups"][g][m] for r in rows], dtype=float)
            groups[g][m] = {"mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
                            "std": float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else None}
    out["groups"] = groups
    return out


def pia_uplift(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-seed differences (PIA - base) on the same split, for every base model trained with and without PIA."""
    out: dict[str, Any] = {}
    for name, rows in per_seed.items():
        base = name.removesuffix("-pia")
        by_seed = {r["seed"]: r for r in per_seed.get(base, [])}
        if not name.endswith("-pia") or not any(r["seed"] in by_seed for r in rows):
            continue
        diffs = {m: [r[m] - by_seed[r["seed"]][m] for r in rows if r["seed"] in by_seed] for m in METRICS}
        rel = [(r["ndcg@100"] / by_seed[r["seed"]]["ndcg@100"] - 1) * 100 for r in rows if r["seed"] in by_seed]
        out[name] = {"base": base, "diffs": diffs, "ndcg@100_rel_pct": rel,
                     "mean": {m: float(np.mean(v)) for m, v in diffs.items()},
                     "std": {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in diffs.items()},
                     "seeds_improved": int(sum(d > 0 for d in diffs["ndcg@100"]))}
    return out


def read_checkpoint(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier run's state in out/checkpoint.json, or None when there is none; refuses one made otherwise."""
    path = out / CHECKPOINT
    if not path.exists():
        log.info("--resume: no %s yet, so every fit runs", path)
        return None
    start_over = f"delete {path} (or give a new --out) to start over"
    try:
        ckpt = json.loads(path.read_text())
        if not isinstance(ckpt, dict) or ckpt.get("version") != 1 or not all(
                isinstance(ckpt.get(k), dict) for k in ("per_seed", "tuning", "chosen")):
            raise ValueError("not a checkpoint written by this version of `recsys experiment`")
        if not isinstance(ckpt.setdefault("searching", {}), dict) or not all(
                isinstance(r, dict) and "value" in r and "val_ndcg@100" in r
                for rows in ckpt["searching"].values() for r in rows):
            raise ValueError("its unfinished searches are unreadable")
        if set(ckpt["tuning"]) != set(ckpt["chosen"]) or not all(
                isinstance(r, dict) and "seed" in r for rows in ckpt["per_seed"].values() for r in rows):
            raise ValueError("its fits or searches are incomplete")
        ckpt["wall_seconds"] = float(ckpt["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--resume: cannot use {path}: {e}", start_over) from e
    changed = _differences(ckpt.get("fingerprint", {}), fingerprint)
    if changed:
        raise DataError(f"--resume: {path} was written by a run with other options or data ({'; '.join(changed)})",
                        f"resume with the same options, or {start_over}")
    return ckpt


def _differences(then: Any, now: Any, key: str = "") -> list[str]:
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted(then.keys() | now.keys(), key=str)
                for d in _differences(then.get(k), now.get(k), f"{key}.{k}" if key else str(k))]
    return [] if then == now else [f"{key.removeprefix('config.')}: {then!r} then, {now!r} now"]


def _write(path: Path, text: str) -> None:
    """Readers (and a resumed run) see the old file or the new one, never a torn one."""
    write_single_object(resolve(path), text.encode())


def _hp_key(v: HP | None) -> float | tuple[float, ...] | str | None:
    """A searched value as a dict key (JSON gives a pair back as a list, and hidden_dims too)."""
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return tuple(v) if isinstance(v, tuple | list) else v


def _count(v: float) -> int | float:
    """A fraction stays a fraction; 1 or more is a user count."""
    return int(v) if v >= 1 else v


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
