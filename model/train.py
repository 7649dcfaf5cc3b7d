"""Mini-batch training for the autoencoders (Multi-VAE/DAE, RecVAE), with optional PIA.

Batches are gathered from a CSR matrix that stays on the training device (no per-batch scipy slice or
dense CPU copy). The epoch is chosen by validation NDCG@100; the trainer's whole state (weights,
anchors, optimizers, RNG, history, best weights) is a dict that a checkpoint callback can persist and
`load_state_dict` can resume from, reproducing an uninterrupted run.

Data-parallel: when torch.distributed is initialised with more than one rank, the same code trains each rank on
its shard of every global batch and all-reduces the gradients so that each step is the single-process step of
the global batch (model.distributed has the arithmetic and why it is not DDP). Every rank keeps identical
weights, optimizer state and history; rank 0 alone validates (the metrics are broadcast, so all ranks stop at the
same epoch), prints and checkpoints; `on_epoch` runs on every rank with the same record. A checkpoint is resumed
by loading it on every rank. Each rank's dropout/sampling noise is reseeded per epoch from (seed, rank, epoch):
the noise cannot equal one process's draws for the whole batch, and this way a resumed run draws the same noise.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from model.distributed import DataParallel
from model.evaluate import evaluate
from model.graph_step import GraphStep, dense_matrix
from model.pia import ItemAnchors, PIAConfig, pia_weight
from model.sparse import DeviceCSR, SparseBatch, canonical_csr
from model.split import HeldOut
from model.vae import LossOut, MultiVAE, Phase

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="multiply the learning rate by this after every "
                                                             "lr_decay_patience evaluations without a better one "
                                                             "(1: never; needs validation users)")
    lr_decay_patience: int = Field(3, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    ema_halflife: float | None = Field(None, gt=0.0, description="validate, keep and export an exponential moving "
                                       "average of the weights whose half-life is this many epochs (any data "
                                       "size: the per-update decay follows the updates per epoch); None: the "
                                       "weights as trained")
    seed: int = 0
    device: str = "auto"
    bf16: bool = Field(False, description="bf16 autocast of the training step (CUDA; on a CPU too, where it pays only "
                                          "with native bf16 instructions: docs/benchmarks.md)")
    cuda_graph: bool = Field(False, description="Multi-VAE/DAE on CUDA: replay each step as one CUDA graph "
                                                "(dense uint8 copy of the binary matrix on the device; model.graph_step)")
    eval_every: int = Field(1, ge=1)
    eval_batch_size: int = Field(2000, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without a better one")
    select_metric: str = "ndcg@100"
    progress: bool = True


class Autoencoder(Protocol):
    latent_dim: int

    def phases(self) -> list[Phase]: ...
    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...
    def loss(self, x: SparseBatch, *, step: int, phase: Phase) -> LossOut: ...
    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def score(self, x: SparseBatch | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible: use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


class Trainer:
    def __init__(self, model: nn.Module, train: sp.csr_matrix, config: TrainConfig,
                 pia: PIAConfig | None = None, valid: HeldOut | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.ae: Autoencoder = model  # type: ignore[assignment]
        train = canonical_csr(train)  # duplicate (user, item) entries summed: host row lengths match the device copy
        self.train_x = DeviceCSR.from_scipy(train, self.device)
        self.valid = valid
        self.on_epoch = on_epoch
        self.dp = DataParallel.current()
        if self.dp.active and config.cuda_graph:
            raise ValueError(f"cuda_graph=True cannot be used in data-parallel training ({self.dp.world_size} ranks): "
                             "train with cuda_graph=False")
        torch.manual_seed(config.seed)  # weights were made by the caller; dropout and sampling draw from here
        # batch order is drawn on the CPU, so each batch's nnz is known there: no host sync per batch
        self.perm_gen = torch.Generator().manual_seed(config.seed)
        self.row_nnz = torch.as_tensor(np.diff(train.indptr).astype(np.int64))
        self.pia = pia if pia is not None and pia.enabled else None
        self.anchors: ItemAnchors | None = None
        if self.pia is not None:
            self.anchors = ItemAnchors(train.shape[1], self.ae.latent_dim, self.pia).to(self.device)
            if self.pia.init == "encoder":
                self.anchors.init_from_encoder(lambda b: self.ae.encode(b)[0])
        self.dp.broadcast_params([self.model] + ([self.anchors] if self.anchors is not None else []))
        self._graph: GraphStep | None = None
        self._graph_matrix: torch.Tensor | None = None
        if config.cuda_graph:
            self._graph_matrix = self._check_graph_ok(train)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for group, params in self.ae.param_groups().items():
            if self.anchors is not None and group in ("all", "encoder"):
                params = [*params, *self.anchors.parameters()]
            # fused: one kernel for the whole update (Adam over 2 x I x 600 weights is memory-bound)
            self.optimizers[group] = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                                      fused=True, capturable=config.cuda_graph)
        self.epoch = 0  # epochs completed
        self.step = 0  # updates of the main (or encoder) group: drives beta and lambda_A schedules
        # the run's planned updates (of the same groups as `step`; global batches, so equal on every rank): the
        # "progress" beta schedule anneals over a share of them; a resumed run keeps its checkpoint's plan
        self.planned_updates = config.epochs * self._updates_per_epoch()
        self._set_plan(self.planned_updates)
        self.history: list[dict[str, Any]] = []
        # wall seconds earlier processes spent in fit() (a resumed fit), and when this process's fit() began:
        # a checkpoint carries their sum, so a fit finished over several runs reports its whole cost
        self.earlier_seconds = 0.0
        self._fit_t0: float | None = None
        self.best_value = -float("inf")
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evals_since_best = 0
        # the weights' moving average (parameters only: the models keep no running buffers), updated after every step
        self._params = list(self.model.parameters())
        self.ema: list[torch.Tensor] | None = None
        self.ema_updates = 0
        if config.ema_halflife is not None:
            self.ema = [p.detach().clone() for p in self._params]
            self.ema_decay = 0.5 ** (1.0 / (config.ema_halflife * self._steps_per_epoch()))

    def _steps_per_epoch(self) -> int:
        """Optimizer steps an epoch takes, over every phase (RecVAE's decoder passes too)."""
        return -(-self.train_x.n_rows // self.config.batch_size) * sum(p.passes for p in self.ae.phases())

    def _updates_per_epoch(self) -> int:
        n_batches = -(-self.train_x.n_rows // self.config.batch_size)
        return n_batches * sum(p.passes for p in self.ae.phases() if p.group in ("all", "encoder"))

    def _set_plan(self, planned: int) -> None:
        self.planned_updates = planned
        if hasattr(self.model, "planned_updates"):  # a Multi-VAE/DAE (its beta schedule reads it)
            setattr(self.model, "planned_updates", planned)  # noqa: B010  (nn.Module's typed __setattr__)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "anchors": None if self.anchors is None else self.anchors.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "epoch": self.epoch, "step": self.step, "planned_updates": self.planned_updates,
            "history": copy.deepcopy(self.history), "seconds": self.seconds(),
            "best_value": self.best_value, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "evals_since_best": self.evals_since_best,
            "ema": self.ema, "ema_updates": self.ema_updates,
            "rng": torch.get_rng_state(), "perm_rng": self.perm_gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": self.config.model_dump(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.ema is None) != (state.get("ema") is None):  # checked first: nothing is loaded from a mismatch
            raise ValueError(f"this checkpoint was written {'with' if self.ema is None else 'without'} ema_halflife: "
                             "resume it with the setting it was trained with")
        self._graph = None  # the optimizer's state tensors are replaced below: capture again at next use
        self.model.load_state_dict(state["model"])
        if self.anchors is not None and state["anchors"] is not None:
            self.anchors.load_state_dict(state["anchors"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.epoch, self.step = state["epoch"], state["step"]
        self._set_plan(int(state.get("planned_updates") or self.planned_updates))  # older checkpoints: this run's plan
        self.history = copy.deepcopy(state["history"])
        self.earlier_seconds = float(state.get("seconds", 0.0))  # older checkpoints: unknown, counted as 0
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_state = state["best_state"]
        self.evals_since_best = state["evals_since_best"]
        if self.ema is not None:
            torch._foreach_copy_(self.ema, [t.to(self.device) for t in state["ema"]])
            self.ema_updates = int(state["ema_updates"])
        torch.set_rng_state(state["rng"])
        self.perm_gen.set_state(state["perm_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        self.ema_updates += 1
        # early on the average would be mostly the initial weights: TF's warm-up caps the decay at (1 + t) / (10 + t)
        decay = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        torch._foreach_lerp_(self.ema, [p.detach() for p in self._params], 1.0 - decay)

    @torch.no_grad()
    def _load_weights(self, values: list[torch.Tensor]) -> None:
        torch._foreach_copy_([p.data for p in self._params], values)

    @contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """Inside the block the model holds the moving average (validation, the best snapshot); after it, its own."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self._params]
        self._load_weights(self.ema)
        try:
            yield
        finally:
            self._load_weights(live)

    @property
    def lr(self) -> float:
        """The learning rate now (of the first optimizer; a decay scales them all alike)."""
        return float(next(iter(self.optimizers.values())).param_groups[0]["lr"])

    def _decay_lr(self, factor: float) -> None:
        """Scale every optimizer's learning rate (kept in their state, so a resumed run continues from it)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["lr"] * factor
        self._graph = None  # a captured CUDA-graph step holds the old rate: capture again at next use
        log.info("learning rate decayed to %.3g at epoch %d (%d evaluations without a better one)", self.lr,
                 self.epoch, self.evals_since_best)

    def _check_graph_ok(self, train: sp.csr_matrix) -> torch.Tensor:
        """The dense device matrix for the CUDA-graph step, or a clear error saying why it cannot be used."""
        why = None
        if self.device.type != "cuda":
            why = f"it needs a CUDA device (training runs on {self.device})"
        elif not isinstance(self.model, MultiVAE) or [p.group for p in self.ae.phases()] != ["all"]:
            why = f"it supports Multi-VAE/Multi-DAE only, not {type(self.model).__name__}"
        elif train.nnz and not np.all(sp.csr_matrix(train).data == 1):
            why = "it needs binary (0/1) training values"
        elif train.shape[0] * train.shape[1] > 32 * 2**30:
            why = f"its dense uint8 copy of a {train.shape[0]:,} x {train.shape[1]:,} matrix would exceed 32 GiB"
        if why is not None:
            raise ValueError(f"cuda_graph=True cannot be used: {why}; train with cuda_graph=False")
        x = self.train_x
        return dense_matrix(x.indptr, x.indices, (x.n_rows, x.n_cols))

    def _run_graph_phase(self, phase: Phase, bar: tqdm) -> dict[str, float]:
        assert self._graph_matrix is not None and isinstance(self.model, MultiVAE)
        if self._graph is None:  # captured at first use, after any resume has loaded weights and state
            self._graph = GraphStep(self.model, self.anchors if phase.pia else None, self.optimizers[phase.group],
                                    self._graph_matrix, self.config.batch_size, phase.dropout, self.config.bf16)
        n, bs = self.train_x.n_rows, self.config.batch_size
        for _ in range(phase.passes):
            perm = torch.randperm(n, generator=self.perm_gen).to(self.device)
            for start in range(0, n, bs):
                lam = pia_weight(self.pia, self.step) if self.pia is not None else 0.0
                self._graph.run(perm[start : start + bs], self.model.beta(self.step), lam)
                self._update_ema()
                self.step += 1
                bar.update(1)
        means = self._graph.take_means()
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in ("loss", "anchor")})
        return means

    def _autocast(self):
        if self.config.bf16 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _run_phase(self, phase: Phase, bar: tqdm) -> dict[str, float]:
        if self._graph_matrix is not None:
            return self._run_graph_phase(phase, bar)
        opt = self.optimizers[phase.group]
        n, bs = self.train_x.n_rows, self.config.batch_size
        dp = self.dp
        params = [p for g in opt.param_groups for p in g["params"]]
        sums: dict[str, torch.Tensor | float] = {}
        count = 0
        for _ in range(phase.passes):
            perm_cpu = torch.randperm(n, generator=self.perm_gen)  # the global order: the same on every rank
            if dp.active:  # this rank's shard of each global batch, and its share n_r / N of the batch's users
                shards = [dp.shard(perm_cpu[start : start + bs]) for start in range(0, n, bs)]
                shares = [len(sh) / min(bs, n - start) for sh, start in zip(shards, range(0, n, bs), strict=True)]
                totals = [int(self.row_nnz[sh].sum()) for sh in shards]
                perm_shards = [sh.to(self.device) for sh in shards]
            else:
                totals = np.add.reduceat(self.row_nnz[perm_cpu].numpy(), np.arange(0, n, bs)).tolist()
                perm = perm_cpu.to(self.device)
                perm_shards = [perm[start : start + bs] for start in range(0, n, bs)]
                shares = [1.0] * len(perm_shards)
            for rows, total, share in zip(perm_shards, totals, shares, strict=True):
                self.model.zero_grad(set_to_none=True)
                if self.anchors is not None:
                    self.anchors.zero_grad(set_to_none=True)
                if rows.numel() == 0:  # a global batch smaller than the world: this rank adds no gradient
                    dp.reduce_grads(params, share)
                    opt.step()
                    self._update_ema()
                    if phase.group in ("all", "encoder"):
                        self.step += 1
                    count += 1
                    bar.update(1)
                    continue
                batch = self.train_x.batch(rows, total=total)
                with self._autocast():
                    out = self.ae.loss(batch, step=self.step, phase=phase)
                    loss = out.loss
                    terms = dict(out.terms)
                    if self.anchors is not None and self.pia is not None and phase.pia and out.mu is not None:
                        lam = pia_weight(self.pia, self.step)
                        la = self.anchors.loss(batch.binary(), out.mu, out.logvar, out.z).mean()
                        loss = loss + lam * la
                        terms["anchor"], terms["lambda_a"] = la.detach(), lam
                loss.backward()
                dp.reduce_grads(params, share)  # data-parallel: the global batch's gradient on every rank
                opt.step()
                self._update_ema()
                if phase.group in ("all", "encoder"):
                    self.step += 1
                terms["loss"] = loss.detach()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + (v * share if dp.active else v)
                count += 1
                bar.update(1)
        means = {k: float(v) / max(count, 1) for k, v in sums.items()}  # one host sync per phase
        means = dp.sum_floats(means)  # data-parallel: each global batch's mean over all its users
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in ("loss", "anchor")})
        return means

    def validate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        res = evaluate(self.ae.score, self.valid.fold_in, self.valid.targets, device=self.device,
                       batch_size=self.config.eval_batch_size)
        self.model.train(was_training)
        return {f"val_{k}": v for k, v in res.mean().items()}

    def seconds(self) -> float:
        """Wall seconds this fit has run so far, in this process and in the stopped ones it resumed."""
        return self.earlier_seconds + (0.0 if self._fit_t0 is None else time.perf_counter() - self._fit_t0)

    def fit(self, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        cfg = self.config
        self._fit_t0 = time.perf_counter()
        per_epoch = self._steps_per_epoch()
        main = self.dp.is_main  # rank 0 (or the only process) prints and checkpoints
        self.model.train()
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            if self.dp.active:
                torch.manual_seed(self.dp.rank_seed(cfg.seed, self.epoch))
            with tqdm(total=per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main),
                      leave=False, unit="batch") as bar:
                record: dict[str, Any] = {"epoch": self.epoch + 1}
                for phase in self.ae.phases():
                    means = self._run_phase(phase, bar)
                    record.update(means if phase.group in ("all", "encoder") else
                                  {f"{phase.group}_{k}": v for k, v in means.items()})
                    end_phase = getattr(self.model, "end_phase", None)
                    if end_phase is not None:
                        end_phase(phase)
                record["train_seconds"] = time.perf_counter() - t0
                self.epoch += 1
                if self.valid is not None and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                    # rank 0 validates; every rank takes its metrics, so all make the same choice and stop together
                    with self._averaged_weights():
                        record.update(self.dp.broadcast(self.validate() if main else None))
                        value = record[f"val_{cfg.select_metric}"]
                        if value > self.best_value:
                            self.best_value, self.best_epoch = value, self.epoch
                            self.best_state = {k: v.detach().cpu().clone()
                                               for k, v in self.model.state_dict().items()}
                            self.evals_since_best = 0
                        else:
                            self.evals_since_best += 1
                            if cfg.lr_decay < 1.0 and self.evals_since_best % cfg.lr_decay_patience == 0:
                                self._decay_lr(cfg.lr_decay)
                    record["lr"] = self.lr
                    bar.set_postfix(loss=f"{record['loss']:.3g}", val=f"{value:.4f}", best=f"{self.best_value:.4f}")
            record["step"] = self.step
            self.history.append(record)
            shown = {k: v for k, v in record.items() if k in ("loss", "anchor", f"val_{cfg.select_metric}")}
            line = (f"epoch {self.epoch}/{cfg.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()) +
                    f" ({record['train_seconds']:.1f}s)")
            if cfg.progress and main:
                tqdm.write(line)
            elif main:  # logs and CI: no bars, but `-v` still shows one line per epoch
                log.info("%s", line)
            if self.on_epoch is not None:
                self.on_epoch(record)
            if checkpoint is not None and main:
                checkpoint(self.state_dict())
            if cfg.patience is not None and self.evals_since_best >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", self.epoch, self.best_epoch)
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        else:
            self.best_epoch = self.epoch
            if self.ema is not None:  # no validation: the last average is the model
                self._load_weights(self.ema)
        self.model.eval()
        return self.history
