"""Multi-VAE and Multi-DAE (Liang et al., 2018, "Variational Autoencoders for Collaborative Filtering").

Multi-VAE: x -> L2 normalize -> dropout(0.5) -> I -> 600 (tanh) -> 2 x 200 (mu, logvar)
           z ~ N(mu, sigma^2) in training, z = mu at inference -> 200 -> 600 (tanh) -> I logits
           loss = multinomial NLL + beta * KL, beta annealed linearly to beta_max over anneal_steps updates.
Multi-DAE: same without the variance head: I -> 200 -> I by default, loss = multinomial NLL (+ L2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model.layers import ItemInput, gaussian_kl, item_output, linear, multinomial_nll
from model.sparse import SparseBatch, as_batch

if TYPE_CHECKING:
    from model.recvae import RecVAE


class VAEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_dims: tuple[int, ...] = (600,)
    latent_dim: int = Field(200, gt=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    variational: bool = True
    beta_max: float = Field(0.2, ge=0.0)
    anneal_steps: int = Field(200_000, ge=0)


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

    def beta(self, step: int) -> float:
        if not self.config.variational:
            return 0.0
        if self.config.anneal_steps == 0:
            return self.config.beta_max
        # Liang et al.'s code: beta = step / total_anneal_steps, capped (0.2 is reached at 40k of the 200k updates)
        return min(self.config.beta_max, step / self.config.anneal_steps)

    def loss(self, x: SparseBatch, *, step: int, phase: Phase) -> LossOut:
        mu, logvar = self.encode(x, phase.dropout)
        if logvar is None:
            nll = multinomial_nll(self.decode(mu), x).mean()
            return LossOut(nll, {"nll": nll.detach()}, mu=mu)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = multinomial_nll(self.decode(z), x).mean()
        kl = gaussian_kl(mu, logvar).mean()
        beta = self.beta(step)
        return LossOut(nll + beta * kl, {"nll": nll.detach(), "kl": kl.detach(), "beta": beta}, mu, logvar, z)
