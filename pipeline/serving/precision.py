"""Which precision the scoring matmuls run at, and bf16 scoring on the CPU that keeps the lists of fp32.

    choose_precision(requested, device, bundle)   auto → bf16 on a CPU with native bf16 (pipeline.io.hardware),
                                                  tf32 on CUDA, fp32 otherwise; with the reason (manifest)
    guard_bf16(choice, bundle, history, k)        auto's online check: bf16 and fp32 lists of a sample of users
                                                  must overlap ≥ MIN_OVERLAP at top-k, else fp32 (and it says so)
    recommend_bf16(recommender, history, k, ...)  the CPU bf16 path: the decoder's output product in bf16 picks
                                                  top (k + margin) candidates; their scores are recomputed in
                                                  fp32 (a sampled product over the candidate columns only) and
                                                  ordered by those. Scores returned are float32.
    compare_precisions(recommender, history, targets, k)  offline: overlap and NDCG@k of both precisions

Tolerances (issue 30): top-100 overlap ≥ 0.99 and |ΔNDCG@100| ≤ 0.001. Inference has no targets, so the online
guard checks the overlap only, on the first users it scores (GUARD_USERS of the first non-empty shard: real
histories of this run, at no extra read); the NDCG tolerance is checked offline (bench.precision_agreement, and
the data test) on held-out users, where the fp32 overlap is the thing that makes NDCG equal anyway.
CUDA keeps its paths: tf32 for auto, autocast for bf16.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from pipeline.io import hardware

if TYPE_CHECKING:
    import torch

    from model.base import Recommender
    from pipeline.io.bundle import ModelBundle

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
MIN_OVERLAP = 0.99  # top-k overlap of bf16 with fp32 lists that auto accepts
MAX_NDCG_DELTA = 0.001  # |NDCG@100(bf16) - NDCG@100(fp32)| accepted offline
GUARD_USERS = 512  # users of the first shard both precisions score before auto commits to bf16
DEFAULT_MARGIN = 20  # candidates beyond k taken from the bf16 logits (see docs/results.md for the measurement)


@dataclass(frozen=True)
class PrecisionChoice:
    chosen: str  # fp32 | tf32 | bf16: what the scoring matmuls run at
    reason: str  # one line, recorded in the manifest
    guard: bool = False  # auto chose bf16: the overlap guard must confirm it on real users first


def decoder_parts(rec: Recommender) -> tuple[Callable[[Any], torch.Tensor], torch.nn.Linear] | None:
    """(histories → the input of the output layer [B, H], the output layer [H → I]) for the autoencoders; None
    for models without such a layer (popularity, EASE): bf16 scoring does not apply to them."""
    import torch

    from model.recommenders import Autoencoder
    from model.recvae import RecVAE
    from model.vae import MultiVAE

    module = rec.module if isinstance(rec, Autoencoder) else None
    if isinstance(module, MultiVAE):
        mvae = module

        def hidden(x: Any) -> torch.Tensor:
            h, _ = mvae.encode(x)  # the posterior mean (eval mode: no dropout)
            for layer in mvae.decoder[:-1]:
                h = torch.tanh(layer(h))
            return h

        last = mvae.decoder[-1]
        assert isinstance(last, torch.nn.Linear)
        return hidden, last
    if isinstance(module, RecVAE):
        rvae = module
        return (lambda x: rvae.encode(x)[0]), rvae.decoder
    return None


def choose_precision(requested: str, device: str, bundle: ModelBundle,
                     capability: Callable[[], hardware.Bf16Capability] | None = None) -> PrecisionChoice:
    """The precision a run uses and why. auto: tf32 on CUDA; on the CPU bf16 where `capability()` says the CPU
    multiplies bf16 natively and the model has a decoder output layer (then `guard` is set), else fp32.
    An explicit bf16 on a CPU without native bf16 is used, with a warning (it is emulated: slow)."""
    import torch

    capability = capability or hardware.detect  # looked up per call: tests replace it with a fake machine
    if requested not in PRECISIONS:
        from pipeline.errors import DataError

        raise DataError(f"unknown precision {requested!r}", f"pass one of {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if requested == "auto":
            return PrecisionChoice("tf32", "auto on CUDA: tf32 tensor-core matmuls, fp32 storage")
        return PrecisionChoice(requested, f"requested ({requested}) on CUDA")
    if requested == "tf32":
        return PrecisionChoice("fp32", "tf32 requested, but tf32 exists only on CUDA: fp32 on the CPU")
    if requested == "fp32":
        return PrecisionChoice("fp32", "requested (fp32)")
    parts = decoder_parts(bundle.recommender)
    if requested == "bf16":
        cap = capability()
        if not cap.native:
            msg = (f"--precision bf16 on a CPU without native bf16 ({cap.reason}): bf16 is emulated here and much "
                   "slower than fp32; use --precision auto or fp32")
            log.warning(msg)
        if parts is None:
            return PrecisionChoice("fp32", f"bf16 requested, but {bundle.name} has no decoder output layer: fp32")
        return PrecisionChoice("bf16", f"requested (bf16); {cap.reason}")
    if parts is None:
        return PrecisionChoice("fp32", f"auto: {bundle.name} has no decoder output layer for bf16 scoring: fp32")
    cap = capability()
    if not cap.native:
        return PrecisionChoice("fp32", f"auto: {cap.reason}: fp32")
    return PrecisionChoice("bf16", f"auto: {cap.reason}", guard=True)


def _device_history(history: sp.csr_matrix, device: torch.device) -> tuple[Any, np.ndarray]:
    from model.sparse import DeviceCSR, canonical_csr

    history = canonical_csr(history)
    return DeviceCSR.from_scipy(history, device), np.asarray(history.indptr)


def recommend_bf16(rec: Recommender, history: sp.csr_matrix, k: int, *, batch_size: int = 2000,
                   margin: int = DEFAULT_MARGIN, on_batch: Callable[[int], None] | None = None,
                   rerank: bool = True, emulate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns and float32 scores per row of `history`, seen items removed, with the output product in bf16.

    Per batch: h (fp32, the small encoder/decoder layers) → bf16 logits [B, I] → seen masked → unsorted top
    (k + margin) → those columns re-scored exactly in fp32 (torch.sparse.sampled_addmm: B × (k + margin) dot
    products, ~1% of the full product at k=100 of 20k items) → ordered by the fp32 scores, ties to the lower
    column (as model.metrics.topk_items). `rerank=False` keeps the bf16 order and scores (measurements only).
    `emulate=True` (measurements on CPUs without bf16, where the real product is ~100× slower): the same
    bf16-rounded inputs and bf16 output, products and accumulation in fp32 (exact products of bf16 values, as
    native bf16 GEMMs accumulate): equal to the native product up to the summation order.
    """
    import torch

    from model.metrics import topk_items

    parts = decoder_parts(rec)
    if parts is None:
        raise ValueError(f"{rec.name} has no decoder output layer: bf16 scoring does not apply")
    hidden, final = parts
    if history.shape[1] != rec.n_items:
        raise ValueError(f"history has {history.shape[1]} item columns, the model has {rec.n_items}")
    module = rec.module  # type: ignore[attr-defined]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            x, indptr = _device_history(history, rec.device)
            n, n_items = x.n_rows, rec.n_items
            k = min(k, n_items)
            c = min(k + max(margin, 0), n_items)
            w, b = final.weight, final.bias  # [I, H], [I] fp32
            w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
            items = np.empty((n, k), np.int64)
            scores = np.empty((n, k), np.float32)
            buf = torch.empty(min(n, batch_size), n_items, dtype=torch.bfloat16, device=x.device)  # [B, I]
            for start in range(0, n, batch_size):
                end = min(n, start + batch_size)
                hist = x.batch(torch.arange(start, end, device=x.device), total=int(indptr[end] - indptr[start]))
                h = hidden(hist)  # [B, H] fp32
                if emulate:
                    logits = buf[: end - start]
                    logits.copy_(torch.addmm(b16.float(), h.to(torch.bfloat16).float(), w16.float().t()))
                else:
                    logits = torch.addmm(b16, h.to(torch.bfloat16), w16.t(), out=buf[: end - start])  # [B, I] bf16
                logits[hist.rows, hist.cols] = -torch.inf
                if not rerank:
                    top = topk_items(logits, k)
                    items[start:end] = top.cpu().numpy()
                    scores[start:end] = logits.gather(1, top).float().cpu().numpy()
                else:
                    cand = _candidates(logits, c)  # [B, c] ascending
                    exact = _exact_scores(h, w, b, cand)  # [B, c] fp32
                    exact[torch.isneginf(logits.gather(1, cand))] = -torch.inf  # seen items stay seen
                    order = topk_items(exact, k)  # positions in cand; ties → lower position = lower column
                    items[start:end] = cand.gather(1, order).cpu().numpy()
                    scores[start:end] = exact.gather(1, order).cpu().numpy()
                if on_batch is not None:
                    on_batch(end - start)
    finally:
        module.train(was)
    return items, scores


def _candidates(logits: torch.Tensor, c: int) -> torch.Tensor:
    """The c best columns of each row, in column order. On the CPU model.topk's kernel (2.2x faster than
    torch.topk on a [3217, 20108] bf16 batch, and its choice among tied logits does not depend on threads)."""
    import torch

    from model import topk

    top = topk.topk_rows(logits, c) if topk.supports(logits) else torch.topk(logits, c, dim=1, sorted=False).indices
    return top.sort(dim=1).values


def _exact_scores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """fp32 h_u · w_c + b_c for each candidate column c of row u: a sampled product (no [B, c, H] gather, which
    measured 5-7× slower on the CPU: it writes B·c·H floats to memory)."""
    import torch

    rows, c = cand.shape
    crow = torch.arange(0, rows * c + 1, c, device=h.device, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"; the pattern is valid by construction
        pattern = torch.sparse_csr_tensor(crow, cand.reshape(-1), torch.zeros(rows * c, device=h.device),
                                          size=(rows, w.shape[0]))
        prod = torch.sparse.sampled_addmm(pattern, h, w.t())
    return prod.values().view(rows, c) + b[cand]


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |set(a_u) ∩ set(b_u)| / k for two [U, k] column lists (order inside the top-k aside)."""
    if a.shape != b.shape:
        raise ValueError(f"lists of shape {a.shape} and {b.shape}")
    if a.size == 0:
        return 1.0
    k = a.shape[1]
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each row's columns are distinct within a and within b
    return float(shared.mean() / k)


def guard_bf16(choice: PrecisionChoice, bundle: ModelBundle, history: sp.csr_matrix, k: int, batch_size: int,
               users: int = GUARD_USERS) -> PrecisionChoice:
    """auto's online check, on the first `users` rows of `history` (users with a known item): bf16 stays only if
    its top-k lists overlap the fp32 ones by ≥ MIN_OVERLAP; otherwise fp32, logged and in the reason."""
    if not choice.guard:
        return choice
    sample = history[: min(users, history.shape[0])]
    if sample.shape[0] == 0:
        return choice
    rec = bundle.recommender
    ref, _ = rec.recommend(sample, k, batch_size=batch_size)
    got, _ = recommend_bf16(rec, sample, k, batch_size=batch_size)
    overlap = topk_overlap(ref, got)
    seen = f"top-{ref.shape[1]} overlap with fp32 {overlap:.4f} on {sample.shape[0]} users of the first shard"
    if overlap < MIN_OVERLAP:
        log.warning("bf16 scoring refused: %s < %s; scoring in fp32", seen, MIN_OVERLAP)
        return PrecisionChoice("fp32", f"{choice.reason}; but {seen} < {MIN_OVERLAP}: fell back to fp32")
    log.info("bf16 scoring: %s", seen)
    return PrecisionChoice("bf16", f"{choice.reason}; {seen} ≥ {MIN_OVERLAP}")


def compare_precisions(rec: Recommender, history: sp.csr_matrix, targets: sp.csr_matrix, k: int = 100,
                       batch_size: int = 1024, margin: int = DEFAULT_MARGIN, emulate: bool = False) -> dict[str, float]:
    """Offline agreement of bf16 with fp32 scoring on held-out users: top-k overlap of the lists (bf16 with the
    fp32 re-score, and bf16 alone), NDCG@k of each against `targets` (rows aligned with `history`)."""
    import torch

    from model.metrics import mean_over_valid, ndcg_at_k

    ref, _ = rec.recommend(history, k, batch_size=batch_size)
    got, _ = recommend_bf16(rec, history, k, batch_size=batch_size, margin=margin, emulate=emulate)
    raw, _ = recommend_bf16(rec, history, k, batch_size=batch_size, rerank=False, emulate=emulate)
    tgt = torch.from_numpy(np.asarray(targets.astype(bool).todense()))

    def ndcg(top: np.ndarray) -> float:
        return mean_over_valid(ndcg_at_k(torch.from_numpy(top), tgt, k))

    n32, n16, nraw = ndcg(ref), ndcg(got), ndcg(raw)
    return {"users": float(history.shape[0]), "overlap": topk_overlap(ref, got), "overlap_no_rerank": topk_overlap(ref, raw),
            "ndcg_fp32": n32, "ndcg_bf16": n16, "ndcg_delta": n16 - n32, "ndcg_bf16_no_rerank": nraw}
