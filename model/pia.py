"""Personalized Item Alignment (PIA): learnable item anchors that pull a user's posterior to the
centroid of the anchors of the items the user consumed.

L_A(u) = mean_{i in I_u} E_q ||z - e_i||^2, with q the posterior of the *masked* input and I_u the full,
unmasked history. Closed form for q = N(mu, diag(sigma^2)), with c_u the centroid of u's anchors:
    L_A(u) = ||mu - c_u||^2 + tr(Sigma) + mean_i ||e_i - c_u||^2
Training only: the anchors live beside the model, never inside it, so the exported model and its
inference cost are exactly the base model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model.sparse import SparseBatch, row_mean_weights, sparse_matmul


class PIAConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = Field(0.0, ge=0.0, description="lambda_A; 0 turns PIA off")
    schedule: Literal["constant", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear: lambda_A ramps from 0 over this many updates")
    estimator: Literal["closed_form", "sampled"] = "closed_form"
    init: Literal["normal", "zeros", "encoder"] = "normal"
    init_std: float = Field(0.01, gt=0.0)

    @property
    def enabled(self) -> bool:
        return self.weight > 0.0


def pia_weight(config: PIAConfig, step: int) -> float:
    """lambda_A at a given update count."""
    if config.schedule == "linear" and config.warmup_steps > 0:
        return config.weight * min(1.0, step / config.warmup_steps)
    return config.weight


class ItemAnchors(nn.Module):
    """E in R^{I x d}, a table of its own (not the decoder weights)."""

    def __init__(self, n_items: int, latent_dim: int, config: PIAConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(n_items, latent_dim))  # [I, d]
        if config.init == "normal":
            nn.init.normal_(self.weight, 0.0, config.init_std)

    @torch.no_grad()
    def init_from_encoder(self, encode_mean: Callable[[SparseBatch], torch.Tensor], batch: int = 2048) -> None:
        """Anchor e_i := posterior mean of a user whose history is item i alone."""
        device = self.weight.device
        n_items = self.weight.shape[0]
        for start in range(0, n_items, batch):
            items = torch.arange(start, min(n_items, start + batch), device=device)
            n = int(items.numel())
            one_hot = SparseBatch(
                torch.arange(n, device=device), items, torch.ones(n, device=device),
                torch.arange(n, device=device), n, n_items,
            )
            self.weight[items] = encode_mean(one_hot).float()

    def loss(self, history: SparseBatch, mu: torch.Tensor, logvar: torch.Tensor | None,
             z: torch.Tensor | None = None) -> torch.Tensor:
        """L_A per user [B]. `history`: the unmasked positives; mu/logvar/z: posterior of the masked input."""
        e = self.weight
        ones = torch.ones_like(history.vals, dtype=e.dtype)
        w = row_mean_weights(history)
        centroid = sparse_matmul(history, e, w)  # [B, d]
        mean_sq = sparse_matmul(history, (e * e).sum(-1, keepdim=True), w)[:, 0]  # mean_i ||e_i||^2
        spread = (mean_sq - (centroid * centroid).sum(-1)).clamp_min(0.0)  # mean_i ||e_i - c||^2
        if self.config.estimator == "sampled" and z is not None:
            pull = (z.float() - centroid).pow(2).sum(-1)
        else:
            pull = (mu.float() - centroid).pow(2).sum(-1)
            if logvar is not None:
                pull = pull + logvar.float().exp().sum(-1)  # tr(Sigma)
        has_items = history.row_sum(ones) > 0  # users with no history have no anchors to align to
        return torch.where(has_items, pull + spread, torch.zeros_like(pull))
