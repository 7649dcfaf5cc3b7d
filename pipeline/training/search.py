"""Hyperparameter search of the weekly training job (TrainJob.search): Optuna's TPE sampler, seeded, with a median
pruner fed the validation NDCG@100 of every epoch, within a time budget, on the snapshot's validation users only.

What is searched: `space` maps dotted TrainJob keys (TOP_LEVEL's trainer settings, `vae.<field>`, `recvae.<field>`,
`pia.<field>`) to a typed
range (float or int, low/high, optionally log) or a list of choices. The epoch is not a search dimension: each
trial stops early on validation NDCG@100 (the job's `epochs` and `patience`) and records its best epoch.

The winner is refit, not kept: `_Setup.build(name, overrides)` trains the winner's configuration again through the
job's ordinary path (per-epoch logging, test scoring, bundle). The refit uses the trial's own epoch plan (the job's
`epochs` and `patience`) rather than `epochs = best epoch`: a β or λ_A schedule measured in training progress
depends on the planned number of updates, so capping the epochs would train a different model. With the same seed
the refit is the winning trial's run again; on CPU it reproduces its best epoch and validation NDCG@100 exactly
(tests/pipeline/training/test_search.py checks it); the refit's cost (one more fit of the winner) is outside the
search budget.

The model and its no-PIA twin (`compare_base`) are searched alike, the twin over the same space minus `pia.*`, each
with an equal share of `budget_seconds` and up to `trials` trials, so the logged ablation compares tuned against
tuned. Trial 0 is the job's own configuration (`start_from_job`, for the keys whose value lies in the space), so the
winner is never worse on validation than the untuned job. A trial still running when its share of the budget is
spent stops after its current epoch and counts with its best epoch so far (tag `search.stopped: budget`).

MLflow: each trial is a nested run under the training run (params: the trial's values; metrics: per-epoch
`val_ndcg_at_100` and `loss`, `best_val_ndcg_at_100`, `best_epoch`; tag `search.state`: complete, pruned or failed).
The training run gets `search.best.<key>` params and `search.n_trials`, `search.n_complete`, `search.n_pruned`,
`search.best_val_ndcg_at_100`, `search.best_epoch`, `search.seconds` metrics (the twin's under `compare.<name>.`).
Test users are never scored here.

Bad input, all refused by `check_search` before the snapshot is read or anything trains (DataError): a budget whose
share per searched model is under `min_trial_seconds` (the operator's estimate of the shortest useful trial on this
data: about (warm-up epochs + patience) epochs of last week's run; a number, because a budget check that trained
first would spend the budget it checks), a key that is not a TrainJob key, one that is not a hyperparameter, one
that does not apply to the model, an empty or invalid range, a range whose ends or choices the job would refuse,
a search with data-parallel training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import DataError

SELECT = "val_ndcg@100"  # the trainer's record key of the selection metric (TrainConfig.select_metric)
# searchable keys outside vae.* / recvae.* / pia.*
TOP_LEVEL = ("lr", "batch_size", "lr_decay", "lr_decay_patience", "ema_halflife")
KL_KEYS = ("vae.beta", "vae.anneal", "vae.kl")  # the KL term's settings: they apply to a variational VAE only


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FloatRange(_Frozen):
    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="sample uniformly in log space (low must be > 0)")


class IntRange(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False


class Choices(_Frozen):
    type: Literal["categorical"]
    choices: list[Any] = Field(description="values of the key (lists allowed, e.g. vae.hidden_dims: [[600], [300]])")


Range = Annotated[FloatRange | IntRange | Choices, Field(discriminator="type")]


class PrunerConfig(_Frozen):
    median: bool = Field(True, description="stop a trial whose best val NDCG@100 so far is under the median of the "
                                           "completed trials at the same epoch")
    warmup_epochs: int = Field(5, ge=0, description="never prune before this epoch")
    startup_trials: int = Field(3, ge=0, description="no pruning until this many trials have completed")


class SearchConfig(_Frozen):
    """The search of one training job (see the module doc); YAML: `recsys train --search FILE` or TrainJob's
    `search:` key."""

    trials: int = Field(20, ge=1, description="most trials per searched model")
    budget_seconds: float = Field(3600.0, gt=0.0, description="the whole search (model and twin share it equally)")
    min_trial_seconds: float = Field(60.0, gt=0.0, description="shortest useful trial on this data: a budget share "
                                                                "under it is refused")
    seed: int = Field(0, description="TPE sampler seed: the same seed draws the same trial parameters")
    random_trials: int = Field(10, ge=1, description="trials drawn at random before TPE models the results")
    start_from_job: bool = Field(True, description="trial 0 is the job's own configuration (keys within the space)")
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, Range] = Field(default_factory=dict, description="dotted TrainJob key -> range or choices")


def load_search_config(path: str | Path) -> SearchConfig:
    """A SearchConfig from a YAML file (safe_load); a bad file is one DataError."""
    from pipeline.training.gates import read_yaml_mapping

    data = read_yaml_mapping(Path(path), "search config", "SearchConfig")
    try:
        return SearchConfig(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"search config {path}: {where}: {first['msg']} ({e.error_count()} problem(s))",
                        "see pipeline/training/search.py (SearchConfig) and configs/search.yaml") from e


# -- keys and ranges --------------------------------------------------------------------------------------------


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def applies(key: str, model: str, job: Any) -> bool:
    """Whether `key` changes how `model` trains: pia.* only with PIA, vae.* only for Multi-VAE/DAE, recvae.* only for
    RecVAE; the KL term's keys (KL_KEYS) only for a variational VAE."""
    if key.startswith("pia."):
        return model.endswith("-pia")
    if key.startswith("recvae."):
        return model.startswith("recvae")
    if key.startswith("vae."):
        if not model.startswith("multi"):
            return False
        return job.vae.variational or not key.startswith(KL_KEYS)
    return True


def searched_names(job: Any) -> list[str]:
    """The models searched: the job's model, and its twin when compare_base (the twin only if a key applies)."""
    names = [job.model]
    if job.compare_base and job.base_model:
        names.append(job.base_model)
    return [n for n in names if n == job.model or any(applies(k, n, job) for k in job.search.space)]


def with_job_overrides(job: Any, overrides: dict[str, Any]) -> Any:
    """A validated copy of the TrainJob `job` with dotted `overrides` set (pydantic's ValidationError if refused)."""
    data = job.model_dump()
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        target = data
        for part in path:
            target = target[part]
        target[leaf] = value
    return type(job).model_validate(data)


def with_overrides(job: Any, train_cfg: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """`job` and `train_cfg` (model.train.TrainConfig) with `overrides` applied, as keyword arguments for
    dataclasses.replace of TrainJob's _Setup."""
    new = with_job_overrides(job, overrides)
    return {"job": new, "train_cfg": train_cfg.model_copy(update={k: getattr(new, k) for k in TOP_LEVEL})}


def _ends(r: FloatRange | IntRange | Choices) -> list[Any]:
    return list(r.choices) if isinstance(r, Choices) else [r.low, r.high]


def _range_problem(key: str, r: FloatRange | IntRange | Choices, current: Any) -> str | None:
    if isinstance(r, Choices):
        if not r.choices:
            return f"search.space.{key} has no choices"
        labels = [json.dumps(c, sort_keys=True) for c in r.choices]
        if len(set(labels)) < len(labels):
            return f"search.space.{key} repeats a choice"
        return None
    if not (math.isfinite(r.low) and math.isfinite(r.high)):
        return f"search.space.{key} has a non-finite end ({r.low}, {r.high})"
    if r.low >= r.high:
        return f"search.space.{key} is empty: low {r.low} >= high {r.high}"
    if r.log and r.low <= 0:
        return f"search.space.{key} is a log range with low {r.low} <= 0"
    if isinstance(r, FloatRange) and isinstance(current, int) and not isinstance(current, bool):
        return f"search.space.{key} is a float range but {key} is an integer"
    if isinstance(current, bool | str | tuple | list) or current is None:
        return f"search.space.{key} is a numeric range but {key} is {type(current).__name__}: use type: categorical"
    return None


def check_search(job: Any) -> None:
    """Refuse a bad `job.search` (see the module doc) before anything is read or trained."""
    cfg: SearchConfig | None = job.search
    if cfg is None:
        return
    if job.distributed is not None:
        raise DataError("a hyperparameter search cannot run with data-parallel training (distributed)",
                        "drop search, or distributed, from the training config")
    if getattr(job, "closed_form", False):
        raise DataError(f"{job.model} is solved in closed form: the search tunes the autoencoders' training",
                        "drop search for this model (its l2 is chosen on validation users from l2_grid)")
    if not cfg.space:
        raise DataError("search.space is empty", "give at least one key, e.g. vae.dropout: {type: float, low: 0.2, "
                        "high: 0.7} (see configs/search.yaml)")
    keys = _flat(job.model_dump())
    searchable = [k for k in keys if k in TOP_LEVEL or k.startswith(("vae.", "recvae.", "pia."))]
    for key, r in cfg.space.items():
        if key not in keys:
            raise DataError(f"search.space has an unknown hyperparameter {key!r} (not a TrainJob key)",
                            f"use one of {', '.join(searchable)}")
        if key not in searchable:
            raise DataError(f"search.space key {key!r} is not a hyperparameter the search tunes "
                            "(the epoch is chosen by early stopping inside each trial)",
                            f"use one of {', '.join(searchable)}")
        if not applies(key, job.model, job):
            raise DataError(f"search.space key {key!r} does not apply to model {job.model}",
                            f"drop it from the space, or train a model it applies to (pia.*: a -pia model; vae.*: "
                            f"multivae/multidae{', variational' if key.startswith(KL_KEYS) else ''}; "
                            "recvae.*: recvae/recvae-pia)")
        problem = _range_problem(key, r, keys[key])
        if problem is not None:
            raise DataError(problem, "give low < high (low > 0 for log), or a non-empty list of distinct choices")
        if key == "pia.weight" and min(_ends(r)) <= 0:
            raise DataError(f"search.space.pia.weight reaches {min(_ends(r))}: lambda_A 0 turns PIA off (the -pia model "
                            "would silently train with lambda_A 1)", "give pia.weight values > 0")
        for value in _ends(r):
            try:
                with_job_overrides(job, {key: value})
            except ValidationError as e:
                raise DataError(f"search.space.{key}: the job refuses {key}={value!r} "
                                f"({e.errors()[0]['msg']})", f"keep {key}'s range within what TrainJob accepts") from e
    names = searched_names(job)
    share = cfg.budget_seconds / len(names)
    if share < cfg.min_trial_seconds:
        raise DataError(f"search budget {cfg.budget_seconds:g} s leaves {share:g} s per searched model "
                        f"({' and '.join(names)}), under min_trial_seconds={cfg.min_trial_seconds:g}: not one trial fits",
                        f"raise search.budget_seconds to at least {cfg.min_trial_seconds * len(names):g}, or lower "
                        "search.min_trial_seconds if one trial really takes less on this data")


# -- the search -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str  # complete | pruned | failed
    value: float  # best val NDCG@100 over its epochs (NaN when none)
    best_epoch: int
    epochs: int  # epochs run
    run_id: str


@dataclass(frozen=True)
class Outcome:
    """One model's search: the winner's overrides ({} when no trial completed) and every trial."""

    name: str
    overrides: dict[str, Any]
    best_value: float
    best_epoch: int
    trials: list[TrialRecord] = field(default_factory=list)
    seconds: float = 0.0


class _OutOfBudget(Exception):
    """Raised from the epoch hook when the model's share of the budget is spent (the trial keeps its best epoch)."""


def _suggest(trial: Any, key: str, r: FloatRange | IntRange | Choices) -> Any:
    if isinstance(r, FloatRange):
        return trial.suggest_float(key, r.low, r.high, log=r.log)
    if isinstance(r, IntRange):
        return trial.suggest_int(key, r.low, r.high, log=r.log)
    # Optuna's choices must be scalars: a list choice (vae.hidden_dims) goes in as its JSON text
    labels = [c if c is None or isinstance(c, bool | int | float | str) else json.dumps(c) for c in r.choices]
    return r.choices[labels.index(trial.suggest_categorical(key, labels))]


def _in_space(value: Any, r: FloatRange | IntRange | Choices) -> bool:
    if isinstance(r, Choices):
        norm = json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True)
        return any(json.dumps(c, sort_keys=True) == norm for c in r.choices)
    return isinstance(value, int | float) and not isinstance(value, bool) and r.low <= value <= r.high


def _start_params(job: Any, space: dict[str, Any]) -> dict[str, Any]:
    """The job's own values of the space's keys, where they lie in it, in Optuna's representation."""
    current = _flat(job.model_dump())
    out = {}
    for key, r in space.items():
        v = current[key]
        if _in_space(v, r):
            if isinstance(r, Choices):
                i = [json.dumps(c, sort_keys=True) for c in r.choices].index(
                    json.dumps(list(v) if isinstance(v, tuple) else v, sort_keys=True))
                c = r.choices[i]
                v = c if c is None or isinstance(c, bool | int | float | str) else json.dumps(c)
            out[key] = v
    return out


def search_models(s: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """Search every model of `names` that the space applies to (TrainJob's _Setup `s`, inside the training run);
    returns the winners' overrides by name, for `s.build(name, overrides)`."""
    return {o.name: o.overrides for o in run_searches(s, names)}


def run_searches(s: Any, names: list[str]) -> list[Outcome]:
    """The searches of `names` (the job's model first, then its twin), each with its share of the budget."""
    job = s.job
    cfg: SearchConfig = job.search
    searched = [n for n in names if n in searched_names(job)]
    share = cfg.budget_seconds / max(1, len(searched))
    return [search_one(s, name, {k: r for k, r in cfg.space.items() if applies(k, name, job)}, share,
                       "" if name == job.model else f"compare.{name}.")
            for name in searched]


def search_one(s: Any, name: str, space: dict[str, Any], budget: float, prefix: str = "") -> Outcome:
    """One model's study: up to `trials` trials within `budget` seconds, each a nested MLflow run under the active
    run; the winner is logged to the active run under `prefix`."""
    import mlflow
    import optuna

    cfg: SearchConfig = s.job.search
    t0 = time.perf_counter()
    deadline = t0 + budget
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.startup_trials, n_warmup_steps=cfg.pruner.warmup_epochs)
        if cfg.pruner.median else optuna.pruners.NopPruner())
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.random_trials)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed below instead
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name=prefix + name)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if cfg.start_from_job:
        start = _start_params(s.job, space)
        if start:
            study.enqueue_trial(start)
    records: list[TrialRecord] = []

    def objective(trial: optuna.Trial) -> float:
        params = {key: _suggest(trial, key, r) for key, r in space.items()}
        values: list[float] = []
        state, stopped = "complete", ""

        def on_epoch(record: dict[str, Any]) -> None:
            epoch, v = int(record["epoch"]), float(record.get(SELECT, float("nan")))
            logged = {"val_ndcg_at_100": v, "loss": float(record.get("loss", float("nan")))}
            mlflow.log_metrics({k: x for k, x in logged.items() if math.isfinite(x)}, step=epoch)
            values.append(v)
            if math.isfinite(v):
                trial.report(v, epoch)
            if time.perf_counter() > deadline:
                raise _OutOfBudget
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val ndcg@100 {v:.4f} under the median")

        with mlflow.start_run(experiment_id=s.experiment_id or None, run_name=f"search-{prefix}{name}-{trial.number}",
                              nested=True) as run:
            mlflow.set_tags({"search.model": name, "search.trial": str(trial.number), "search.study": prefix + name})
            mlflow.log_params({"model": name, **params})
            try:  # the trainer raises out of fit() after an epoch's record: nothing half-done is kept
                s.build(name, params).fit(s.snap.train, s.snap.valid, on_epoch=on_epoch)
            except optuna.TrialPruned:
                state = "pruned"
            except _OutOfBudget:
                stopped = "budget"
            finite = [v for v in values if math.isfinite(v)]
            best = max(finite) if finite else float("nan")
            best_epoch = values.index(best) + 1 if finite else 0  # the first best, as the trainer keeps it
            if state == "complete" and not finite:
                state = "failed"  # no finite validation value: not a candidate
            mlflow.set_tags({"search.state": state} | ({"search.stopped": stopped} if stopped else {}))
            mlflow.log_metrics({"best_epoch": float(best_epoch), "epochs_run": float(len(values))}
                               | ({"best_val_ndcg_at_100": best} if finite else {}))
            run_id = run.info.run_id
        trial.set_user_attr("best_epoch", best_epoch)
        records.append(TrialRecord(trial.number, params, state, best, best_epoch, len(values), run_id))
        print(f"search {prefix}{name} trial {trial.number}: {state}{' (budget spent)' if stopped else ''} "
              f"val ndcg@100={best:.4f} best epoch {best_epoch} {params}", flush=True)
        if state == "pruned":
            raise optuna.TrialPruned()
        return best  # NaN: Optuna marks the trial failed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(objective, n_trials=cfg.trials, timeout=budget, gc_after_trial=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - t0
    done = [r for r in records if r.state == "complete"]
    winner = max(done, key=lambda r: r.value) if done else None  # max keeps the earliest of equal values
    counts = {"n_trials": len(records), "n_complete": len(done), "n_pruned": sum(r.state == "pruned" for r in records),
              "seconds": seconds}
    mlflow.log_metrics({f"{prefix}search.{k}": float(v) for k, v in counts.items()})
    if winner is None:
        mlflow.set_tag(f"{prefix}search.result", "no trial completed: the job's own configuration is trained")
        return Outcome(name, {}, float("nan"), 0, records, seconds)
    mlflow.log_params({f"{prefix}search.best.{k}": v for k, v in winner.params.items()})
    mlflow.log_metrics({f"{prefix}search.best_val_ndcg_at_100": winner.value,
                        f"{prefix}search.best_epoch": float(winner.best_epoch)})
    mlflow.set_tag(f"{prefix}search.best_run_id", winner.run_id)
    return Outcome(name, dict(winner.params), winner.value, winner.best_epoch, records, seconds)


def tuned_setup(s: Any, overrides: dict[str, Any]) -> Any:
    """TrainJob's _Setup `s` with `overrides` applied (a frozen dataclass: a new one)."""
    return replace(s, **with_overrides(s.job, s.train_cfg, overrides))
