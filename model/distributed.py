"""Data-parallel training arithmetic for model.train.Trainer (pure torch.distributed; no launching).

When a default process group is initialised with more than one rank, the trainer keeps one global batch
order (drawn identically on every rank from the same seeded generator) and each rank trains on its contiguous
shard of every global batch. The loss is a mean over a batch's users, so the single-process gradient of a
global batch of N users is sum_r (n_r / N) * grad_r, with n_r the users of rank r's shard: each rank scales its
gradient by n_r / N and the ranks sum them (one all-reduce of one flat buffer per step). Unequal shards (the
last, short batch) and empty ones (a batch smaller than the world) are therefore exact, which DDP's plain
average over ranks is not.

Why not torch.nn.parallel.DistributedDataParallel: it synchronises gradients only for a module called through
its forward(), while the trainer calls the models' own loss()/encode() and adds the PIA anchors, a second
module, to the loss; RecVAE's encoder and decoder phases each step a different parameter group, so DDP would
need find_unused_parameters and would still all-reduce the decoder's gradients in the encoder phase. Here the
reduced parameters are exactly those of the phase's optimizer, weighted by each rank's share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group; rank 0 of a world of 1 when there is none."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DataParallel:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch's rows (sizes differ by at most one; may be empty)."""
        return torch.tensor_split(rows, self.world_size)[self.rank] if self.active else rows

    def rank_seed(self, seed: int, epoch: int) -> int:
        """The seed of this rank's dropout and sampling noise in `epoch`: distinct per rank (the users differ, so
        should their noise) and a function of (seed, rank, epoch) only, so a resumed run draws the same noise."""
        return (seed * 1_000_003 + self.rank * 10_007 + epoch) % (2**63 - 1)

    def broadcast_params(self, modules: list[nn.Module]) -> None:
        """Make every rank's weights and buffers rank 0's (the caller's seeding makes them equal already; this
        makes it certain)."""
        if not self.active:
            return
        for m in modules:
            for t in m.state_dict().values():
                dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src=0)

    def reduce_grads(self, params: list[nn.Parameter], share: float) -> None:
        """grad := sum over ranks of share_r * grad_r for every parameter in `params` (share_r = n_r / N).

        A parameter without a gradient counts as zero on that rank; it keeps no gradient only when no rank gave
        it one (as in a single process, where the optimizer then skips it)."""
        if not self.active:
            return
        ref = params[0]
        flags = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
        parts = [(p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params]
        flat = torch.cat([*parts, flags])
        flat[: -len(params)].mul_(share)
        dist.all_reduce(flat)  # one message per step: SUM of the weighted gradients, and of the flags
        offset = 0
        for p, has in zip(params, flat[-len(params):].tolist(), strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p) if has > 0 else None  # views of one buffer: no copy
            offset += n

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Per key, the sum over ranks (a rank without the key counts zero); the same dict on every rank."""
        if not self.active:
            return values
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, values)
        out: dict[str, float] = {}
        for d in gathered:
            for k, v in d.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable object: validation metrics, a decision)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
