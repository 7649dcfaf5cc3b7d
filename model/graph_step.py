"""A Multi-VAE/DAE (+PIA) training step on dense rows, and the same step captured as one CUDA graph.

Why: on an H100 the sparse loop is bound by the host (about 6 ms of Python and kernel launches per
step against 2.5 ms of kernels). A CUDA graph replays the whole step (gather, forward, backward, Adam)
with one launch, but it needs static shapes and addresses. So this step works on dense rows: the binary
training matrix lives on the device as uint8 [U, I] (2.3 GB for ML-20M), a batch is `index_select` of a
fixed number of rows, and each sparse operation is replaced by its dense twin (the same function at
O(B·I) instead of O(nnz) work, which a GPU does not notice). β and λ_A are device scalars written before
each replay. The last, short batch is padded with weight-0 rows, so every epoch still sees every user
once in batches of `batch_size`.

`dense_loss` is the function both paths run; tests check it against the sparse model's loss on the CPU.
The warm-up before capture draws random numbers, so a resumed run's dropout and z noise differ from an
uninterrupted one's (weights and optimizer state resume exactly; the eager path also resumes the noise).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from model.layers import gaussian_kl
from model.pia import ItemAnchors
from model.vae import MultiVAE, kl_user_weight


def dense_loss(model: MultiVAE, x: torch.Tensor, row_weight: torch.Tensor, dropout: float, beta: torch.Tensor,
               anchors: ItemAnchors | None = None, lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted-mean loss terms for dense binary rows x [B, I]; row_weight [B] is 1 for real rows, 0 for pads.

    Same function as MultiVAE.loss (+ lam · ItemAnchors.loss): L2-normalized input, inverted dropout,
    reparameterized z, multinomial NLL, β·KL, and the closed-form or sampled anchor loss.
    """
    n = row_weight.sum().clamp_min(1.0)
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [B, I]
    if dropout > 0:
        xn = F.dropout(xn, dropout, training=True)
    h = xn @ model.item_in.weight + model.item_in.bias  # [B, H]
    for layer in model.encoder:
        h = layer(torch.tanh(h))
    terms: dict[str, torch.Tensor] = {}
    if model.config.variational:
        mu, logvar = h.chunk(2, dim=-1)  # [B, d] each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kl_u = gaussian_kl(mu, logvar) * row_weight  # [B]
        if model.config.kl_weight != "uniform":
            kl_u = kl_u * kl_user_weight(model.config, x.sum(-1), row_weight)
        kl = kl_u.sum() / n
        terms["kl"] = kl
    else:
        mu, logvar = torch.tanh(h), None
        z = mu
    nll = -((F.log_softmax(model.decode(z).float(), dim=-1) * x).sum(-1) * row_weight).sum() / n
    terms["nll"] = nll
    loss = nll + beta * terms["kl"] if "kl" in terms else nll
    if anchors is not None and lam is not None:
        e = anchors.weight  # [I, d]
        count = x.sum(-1)  # [B] items per user (binary history, not dropped out)
        inv = 1.0 / count.clamp_min(1.0)
        centroid = (x @ e) * inv[:, None]  # [B, d]
        mean_sq = (x @ (e * e).sum(-1)) * inv  # [B] mean_i ||e_i||^2
        spread = (mean_sq - (centroid * centroid).sum(-1)).clamp_min(0.0)
        point = z if anchors.config.estimator == "sampled" and logvar is not None else mu
        pull = (point.float() - centroid).pow(2).sum(-1)
        if anchors.config.estimator != "sampled" and logvar is not None:
            pull = pull + logvar.float().exp().sum(-1)  # tr(Sigma)
        per_user = torch.where(count > 0, pull + spread, torch.zeros_like(pull))
        anchor = (per_user * row_weight).sum() / n
        terms["anchor"] = anchor
        loss = loss + lam * anchor
    terms["loss"] = loss
    return terms


class GraphStep:
    """One training step (batch gather → loss → backward → optimizer) captured as a CUDA graph.

    `run(rows, beta, lam)` copies the batch's row ids into the static index, writes β and λ_A, and replays.
    Loss terms are summed on the device (`take_means()` reads them once per phase: one host sync).
    The optimizer must be built with capturable=True. Warm-up steps (needed before capture) are undone:
    parameters and optimizer state are restored in place, so training is the same as if they never ran.
    """

    def __init__(self, model: MultiVAE, anchors: ItemAnchors | None, optimizer: torch.optim.Optimizer,
                 matrix: torch.Tensor, batch_size: int, dropout: float, bf16: bool = False, warmup: int = 3):
        if matrix.device.type != "cuda":
            raise ValueError("a CUDA graph step needs the training matrix on a CUDA device")
        self.model, self.anchors, self.optimizer = model, anchors, optimizer
        self.matrix = matrix  # [U, I] uint8, binary
        self.batch_size, self.dropout, self.bf16 = batch_size, dropout, bf16
        dev = matrix.device
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.weight = torch.ones(batch_size, device=dev)
        self.beta = torch.zeros((), device=dev)
        self.lam = torch.zeros((), device=dev)
        names = ["loss", "nll"] + (["kl"] if model.config.variational else []) + (["anchor"] if anchors else [])
        self.sums = {k: torch.zeros((), device=dev) for k in names}
        self.count = 0
        self.host_sums: dict[str, float] = {}
        self._padded = False
        self._capture(warmup)

    def _params(self) -> list[torch.nn.Parameter]:
        return [*self.model.parameters(), *([] if self.anchors is None else self.anchors.parameters())]

    def _body(self) -> None:
        x = self.matrix.index_select(0, self.idx).float()  # [B, I]
        # no autocast weight cache: cached casts would be freed behind the graph's back
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            terms = dense_loss(self.model, x, self.weight, self.dropout, self.beta, self.anchors,
                               self.lam if self.anchors is not None else None)
        terms["loss"].backward()
        self.optimizer.step()
        for k, acc in self.sums.items():
            acc.add_(terms[k].detach().float())

    def _capture(self, warmup: int) -> None:
        params = self._params()
        saved = [p.detach().clone() for p in params]
        had_state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                     for p in params if p in self.optimizer.state}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        with torch.no_grad():  # undo the warm-up, in place (the graph holds these addresses)
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
            for p in params:
                before = had_state.get(id(p), {})
                for k, v in self.optimizer.state[p].items():
                    if torch.is_tensor(v) and k in before:
                        v.copy_(before[k])
                    elif torch.is_tensor(v):
                        v.zero_()  # Adam's state starts at zero (step, moments)
            for acc in self.sums.values():
                acc.zero_()

    def run(self, rows: torch.Tensor, beta: float, lam: float = 0.0) -> None:
        """One step on `rows` (device int64, at most batch_size ids; a short batch is padded)."""
        b = int(rows.numel())
        if b == self.batch_size:
            self.idx.copy_(rows)
            if self._padded:
                self.weight.fill_(1.0)
                self._padded = False
        else:
            self.idx[:b].copy_(rows)
            self.idx[b:].copy_(rows[:1].expand(self.batch_size - b))  # any real row; its weight is 0
            self.weight[:b].fill_(1.0)
            self.weight[b:].fill_(0.0)
            self._padded = True
        self.beta.fill_(beta)
        self.lam.fill_(lam)
        self.graph.replay()
        self.count += 1
        self.host_sums["beta"] = self.host_sums.get("beta", 0.0) + beta
        if self.anchors is not None:
            self.host_sums["lambda_a"] = self.host_sums.get("lambda_a", 0.0) + lam

    def take_means(self) -> dict[str, float]:
        """Means of the loss terms since the last call (one host sync), then reset."""
        n = max(self.count, 1)
        means = {k: float(v) / n for k, v in self.sums.items()} | {k: v / n for k, v in self.host_sums.items()}
        for acc in self.sums.values():
            acc.zero_()
        self.count, self.host_sums = 0, {}
        return means


def dense_matrix(indptr: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The binary [U, I] uint8 matrix of a CSR, built on the CSR's device."""
    rows = torch.repeat_interleave(torch.arange(shape[0], device=indices.device), indptr.diff())
    out = torch.zeros(shape, dtype=torch.uint8, device=indices.device)
    out[rows, indices] = 1
    return out
