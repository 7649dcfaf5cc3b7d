"""RecVAE (Shenbin et al., 2020, "RecVAE: a New Variational Autoencoder for Top-N Recommendations
with Implicit Feedback"), after the authors' reference code.

Encoder: 5 densely connected 600-wide layers, swish + LayerNorm; linear decoder 200 -> I.
Prior: 0.15 N(0, I) + 0.75 q_old(z | x) (the encoder of the previous epoch) + 0.1 N(0, e^10 I).
KL weight gamma * |x_u|. Each epoch: 3 encoder passes (dropout 0.5), refresh the prior, 1 decoder pass.
"""

from __future__ import annotations

import copy
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from model.layers import ItemInput, item_output, log_normal_pdf, multinomial_nll
from model.sparse import SparseBatch
from model.vae import LossOut, Phase, score_at_posterior_mean


class RecVAEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_dim: int = Field(600, gt=0)
    latent_dim: int = Field(200, gt=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    gamma: float = Field(0.005, ge=0.0)
    encoder_passes: int = Field(3, ge=1)
    decoder_passes: int = Field(1, ge=1)
    mixture_weights: tuple[float, float, float] = (0.15, 0.75, 0.1)
    uniform_logvar: float = 10.0
    layernorm_eps: float = 0.1


class RecVAEEncoder(nn.Module):
    def __init__(self, n_items: int, hidden: int, latent: int, eps: float):
        super().__init__()
        self.fc1 = ItemInput(n_items, hidden)
        self.fcs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(4))
        self.lns = nn.ModuleList(nn.LayerNorm(hidden, eps=eps) for _ in range(5))
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)

    def forward(self, x: SparseBatch, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.l2_normalized()
        if self.training and dropout > 0:
            x = x.dropped_out(dropout)
        h = self.lns[0](F.silu(self.fc1(x)))
        acc = h  # running sum of earlier layers' outputs: the dense connections
        for fc, ln in zip(self.fcs, self.lns[1:], strict=True):
            h = ln(F.silu(fc(h) + acc))
            acc = acc + h
        return self.fc_mu(h), self.fc_logvar(h)


class RecVAE(nn.Module):
    def __init__(self, n_items: int, config: RecVAEConfig | None = None):
        super().__init__()
        self.config = config = config or RecVAEConfig()
        self.n_items = n_items
        self.latent_dim = config.latent_dim
        self.encoder = RecVAEEncoder(n_items, config.hidden_dim, config.latent_dim, config.layernorm_eps)
        self.decoder = nn.Linear(config.latent_dim, n_items)
        # Training-only state: the previous epoch's encoder, used by the composite prior.
        self.encoder_old = copy.deepcopy(self.encoder).requires_grad_(False)

    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, dropout)

    def decode(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, I]; `out` (optional, [B, I]) is a buffer they may be written into (scoring)."""
        return item_output(self.decoder, z, out)  # [B, I] logits

    def score(self, x: SparseBatch | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return score_at_posterior_mean(self, x, out)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights the inference path needs (the old encoder is training-only)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder_old.")}

    # -- training -----------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("encoder", c.encoder_passes, c.dropout, pia=True), Phase("decoder", c.decoder_passes, 0.0, pia=False)]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters())}

    def end_phase(self, phase: Phase) -> None:
        if phase.group == "encoder":
            self.encoder_old.load_state_dict(self.encoder.state_dict())

    def log_prior(self, x: SparseBatch, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.encoder_old.eval()
            old_mu, old_logvar = self.encoder_old(x, 0.0)
        zeros = torch.zeros_like(z)
        w = self.config.mixture_weights
        parts = [
            log_normal_pdf(z, zeros, zeros) + math.log(w[0]),
            log_normal_pdf(z, old_mu, old_logvar) + math.log(w[1]),
            log_normal_pdf(z, zeros, zeros + self.config.uniform_logvar) + math.log(w[2]),
        ]
        return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)  # [B, d]

    def loss(self, x: SparseBatch, *, step: int, phase: Phase) -> LossOut:
        mu, logvar = self.encode(x, phase.dropout)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = multinomial_nll(self.decode(z), x)  # [B]
        kl_weight = self.config.gamma * x.row_sum()  # gamma * |x_u|
        kl = (log_normal_pdf(z, mu, logvar) - self.log_prior(x, z)).sum(-1)  # single-sample estimate [B]
        loss = (nll + kl_weight * kl).mean()
        return LossOut(loss, {"nll": nll.mean().detach(), "kl": kl.mean().detach()}, mu, logvar, z)
