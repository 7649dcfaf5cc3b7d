"""Multi-VAE and Multi-DAE (Liang et al., 2018, "Variational Autoencoders for Collaborative Filtering").

Multi-VAE: x -> L2 normalize -> dropout(0.5) -> I -> 600 (tanh) -> 2 x 200 (mu, logvar)
           z ~ N(mu, sigma^2) in training, z = mu at inference -> 200 -> 600 (tanh) -> I logits
           loss = multinomial NLL + beta * KL, beta by the config's schedule (`beta_at`), each user's KL
           weighted alike or by history size (`kl_user_weight`).
Multi-DAE: same without the variance head: I -> 200 -> I by default, loss = multinomial NLL (+ L2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from model.layers import ItemInput, gaussian_kl, item_output, linear, multinomial_nll
from model.sparse import SparseBatch, as_batch

if TYPE_CHECKING:
    from model.marec import AlignmentTarget
    from model.recvae import RecVAE


class VAEConfig(BaseModel):
    """The architecture and the KL weight's schedule.

    Default schedule: "progress", beta_max 0.2 reached at 20% of the planned updates. On ml-1m-implicit-ge4 (seed 0,
    validation NDCG@100, 200 epochs, patience 20) Liang's schedule, sized for ML-20M, ends near beta 0.003 (0.3895);
    progress at 0.2 or 0.5 and constant beta 0.2 all reach 0.398-0.399 (issue 28). 0.2 rather than 0.5: a short
    warm-up, then most of the run, and so the early-stopped epoch, at beta_max, the value a search tunes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_dims: tuple[int, ...] = (600,)
    latent_dim: int = Field(200, gt=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    variational: bool = True
    beta_max: float = Field(0.2, ge=0.0)
    beta_schedule: Literal["progress", "constant", "liang"] = Field(
        "progress", description="progress: beta_max reached at anneal_fraction of the planned updates (any data size); "
                                "constant: beta_max from step 0; liang: step / anneal_steps, capped (sized for ML-20M)")
    anneal_fraction: float = Field(0.2, gt=0.0, le=1.0, description="progress: the share of the planned updates "
                                                                     "over which beta rises linearly to beta_max")
    anneal_steps: int = Field(200_000, ge=0, description="liang: beta = step / anneal_steps (0: beta_max at once)")
    kl_weight: Literal["uniform", "count"] = Field(
        "uniform", description="uniform: every user's KL weighs beta; count: beta x |x_u| / the batch's mean |x_u| "
                               "(RecVAE's rescaling: the NLL grows with a user's history, so a uniform beta "
                               "regularizes light users relatively more)")

    @model_validator(mode="before")
    @classmethod
    def _liang_when_only_anneal_steps(cls, data: Any) -> Any:
        """A config that names anneal_steps but no schedule (all configs written before beta_schedule existed, e.g.
        an older bundle's) keeps the meaning it had then: Liang et al.'s step / anneal_steps."""
        if isinstance(data, dict) and "anneal_steps" in data and "beta_schedule" not in data:
            return {**data, "beta_schedule": "liang"}
        return data


def beta_at(config: VAEConfig, step: int, planned_updates: int | None = None) -> float:
    """The KL weight at update `step` (0-based) of a run of `planned_updates` updates.

    "progress" rises linearly from 0 to beta_max at anneal_fraction x planned_updates and stays there, so it
    anneals the same share of any run (Liang et al.'s 200k-update ramp never ends on ml-1m's ~10 updates/epoch).
    Without a plan (a model not trained by model.train.Trainer) "progress" cannot place the step: beta_max."""
    if not config.variational:
        return 0.0
    if config.beta_schedule == "constant":
        return config.beta_max
    if config.beta_schedule == "liang":
        if config.anneal_steps == 0:
            return config.beta_max
        # Liang et al.'s code: beta = step / total_anneal_steps, capped (0.2 is reached at 40k of the 200k updates)
        return min(config.beta_max, step / config.anneal_steps)
    if planned_updates is None:
        return config.beta_max
    ramp = config.anneal_fraction * planned_updates
    return config.beta_max if ramp <= 0 or step >= ramp else config.beta_max * step / ramp


def kl_user_weight(config: VAEConfig, counts: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each user's share of the KL term [B] from the history sizes `counts` [B]: 1 for "uniform"; for "count",
    |x_u| over the mean |x_u| of the batch's real rows (row_weight 1; pads 0), so the mean weight stays 1 and beta_max
    keeps its scale."""
    if config.kl_weight == "uniform":
        return torch.ones_like(counts)
    w = torch.ones_like(counts) if row_weight is None else row_weight
    mean = (counts * w).sum() / w.sum().clamp_min(1.0)
    return counts / mean.clamp_min(1e-12)


def dae_config(**overrides: object) -> VAEConfig:
    """Multi-DAE reference architecture: [I -> 200 -> I]."""
    return VAEConfig(**{"hidden_dims": (), "variational": False, **overrides})


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar to minimize
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)  # detached: no host sync
    mu: torch.Tensor | None = None  # [B, d] posterior of the masked input
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None


@dataclass(frozen=True)
class Phase:
    """One step of an epoch: which parameter group trains, how many passes, with what input dropout."""

    group: str  # "all" | "encoder" | "decoder"
    passes: int
    dropout: float
    pia: bool  # whether the anchor loss is added in this phase


@torch.no_grad()
def score_at_posterior_mean(model: MultiVAE | RecVAE, x: SparseBatch | torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Inference for a Gaussian-posterior model: decode the posterior mean (no sampling, no dropout), in eval
    mode whatever mode the model was in."""
    was = model.training
    model.eval()
    mu, _ = model.encode(as_batch(x))
    logits = model.decode(mu, out)
    model.train(was)
    return logits


class MultiVAE(nn.Module):
    def __init__(self, n_items: int, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.n_items = n_items
        self.latent_dim = config.latent_dim
        # updates the whole run plans (epochs x updates per epoch): set by model.train.Trainer, drives "progress"
        self.planned_updates: int | None = None
        # MARec's alignment target (model.marec; training only, never saved): adds -sum_j log p_uj b_uj to the loss
        self.alignment: AlignmentTarget | None = None
        dims = [*config.hidden_dims, config.latent_dim]
        self.item_in = ItemInput(n_items, dims[0] * (2 if len(dims) == 1 and config.variational else 1))
        enc: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(dims)):
            last = i == len(dims) - 2
            enc.append(linear(a, b * 2 if (last and config.variational) else b))
        self.encoder = nn.ModuleList(enc)
        dec_dims = [config.latent_dim, *reversed(config.hidden_dims), n_items]
        self.decoder = nn.ModuleList(linear(a, b) for a, b in pairwise(dec_dims))

    # -- the inference path -------------------------------------------------------------------
    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.l2_normalized()
        if self.training and dropout > 0:
            x = x.dropped_out(dropout)
        h = self.item_in(x)
        for layer in self.encoder:
            h = layer(torch.tanh(h))
        if not self.config.variational:
            return torch.tanh(h), None  # the DAE's code is tanh-activated (Liang et al.)
        mu, logvar = h.chunk(2, dim=-1)  # [B, d] each
        return mu, logvar

    def decode(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, I]; `out` (optional, [B, I]) is a buffer they may be written into (scoring)."""
        h = z
        for layer in self.decoder[:-1]:
            h = torch.tanh(layer(h))
        return item_output(cast(nn.Linear, self.decoder[-1]), h, out)  # [B, I] logits

    def score(self, x: SparseBatch | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return score_at_posterior_mean(self, x, out)

    # -- training -----------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase("all", 1, self.config.dropout, pia=True)]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": list(self.parameters())}

    def beta(self, step: int, planned_updates: int | None = None) -> float:
        """beta_at for this model's config; the plan is `planned_updates` if given, else the one the trainer set.
        (Also called unbound on any object with a `config`, e.g. SimpleNamespace(config=vae).)"""
        plan = planned_updates if planned_updates is not None else getattr(self, "planned_updates", None)
        return beta_at(self.config, step, plan)

    def _nll(self, logits: torch.Tensor, x: SparseBatch, terms: dict[str, torch.Tensor | float]) -> torch.Tensor:
        nll = multinomial_nll(logits, x).mean()
        terms["nll"] = nll.detach()
        if self.alignment is None:
            return nll
        align = self.alignment.nll(logits, x).mean()
        terms["align"] = align.detach()
        return nll + align

    def loss(self, x: SparseBatch, *, step: int, phase: Phase) -> LossOut:
        mu, logvar = self.encode(x, phase.dropout)
        terms: dict[str, torch.Tensor | float] = {}
        if logvar is None:
            return LossOut(self._nll(self.decode(mu), x, terms), terms, mu=mu)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = self._nll(self.decode(z), x, terms)
        kl_u = gaussian_kl(mu, logvar)  # [B]
        if self.config.kl_weight != "uniform":  # the default pays nothing for the option
            kl_u = kl_u * kl_user_weight(self.config, x.row_sum(torch.ones_like(x.vals)))
        kl = kl_u.mean()
        beta = self.beta(step)
        terms |= {"kl": kl.detach(), "beta": beta}
        return LossOut(nll + beta * kl, terms, mu, logvar, z)
