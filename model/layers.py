"""Layers shared by the autoencoders."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.sparse import SparseBatch, as_batch, sparse_matmul


class ItemInput(nn.Module):
    """The first encoder layer, x @ W + b, fed sparse rows.

    Same function as nn.Linear(n_items, out) on the dense row, but it costs O(nnz · out) instead of
    O(n_items · out): it sums the weight rows of the items a user has.
    """

    def __init__(self, n_items: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_items, out_features))  # [I, H]: row i = item i's column of W
        self.bias = nn.Parameter(torch.empty(out_features))
        # Liang et al. init: Xavier normal on weights, N(0, 0.001) on biases
        std = math.sqrt(2.0 / (n_items + out_features))
        nn.init.normal_(self.weight, 0.0, std)
        nn.init.normal_(self.bias, 0.0, 0.001)

    def forward(self, x: SparseBatch | torch.Tensor) -> torch.Tensor:
        return sparse_matmul(as_batch(x), self.weight) + self.bias  # [B, H]


def buffer_fits(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `out` can receive a result of this shape, dtype and device (a contiguous match)."""
    return (out is not None and tuple(out.shape) == shape and out.dtype == dtype and out.device == device
            and out.is_contiguous())


def item_output(layer: nn.Linear, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """layer(h) for the wide [B, I] item-output layer, written into `out` when one fits.

    Scoring reuses one output buffer across batches: on the CPU a fresh [3217, 20108] float32 result costs
    about 120 ms of page faults per batch (freshly mapped memory), against about 800 ms for the product.
    Under autograd or autocast, or when `out` does not match, this is plainly layer(h).
    """
    if (torch.is_grad_enabled() or torch.is_autocast_enabled(h.device.type)
            or not buffer_fits(out, (h.shape[0], layer.out_features), h.dtype, h.device)):
        return layer(h)
    return torch.addmm(layer.bias, h, layer.weight.t(), out=out)  # [B, I]


def linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_normal_(layer.weight)
    nn.init.normal_(layer.bias, 0.0, 0.001)
    return layer


def multinomial_nll(logits: torch.Tensor, x: SparseBatch) -> torch.Tensor:
    """-sum_i x_ui log softmax(logits_u)_i per user, reading only the user's items. [B]"""
    log_p = F.log_softmax(logits.float(), dim=-1)
    picked = log_p[x.rows, x.cols] * x.vals
    return -x.row_sum(picked)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per user. [B]"""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def log_normal_pdf(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (logvar + math.log(2 * math.pi) + (z - mu).pow(2) / logvar.exp())
