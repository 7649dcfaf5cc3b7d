"""Item metadata → feature blocks → smoothed cosine similarities (MARec's inputs, MAREC.md §2 "Features", "Alignment").

One block per field, rows aligned with the model's item columns:
- lists of values (tags, genres, people): multi-hot, values on fewer than `min_items` items dropped (a value on
  one item links it to nothing);
- free text: TF-IDF over the `max_words` most frequent words (lower-cased [a-z0-9']+ tokens of 2+ characters,
  English stop words dropped, document frequency on at least 2 items, smooth idf, rows L2-normalised), the
  paper's bag-of-words baseline features. Sentence embeddings are not used: no model here loads offline.
Blocks are min-max scaled per column before the cosine (the authors' code; `minmax_columns`).

G = Z Zᵀ / (‖z_i‖ ‖z_j‖ + δ) with a zero diagonal: δ damps pairs of items with thin features (an item with one
tag is "similar" to every item sharing it at cosine 1; with δ its similarities shrink toward 0).
Pure numpy/scipy: no pipeline imports.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"[a-z0-9']{2,}")
# a short English stop list (the most frequent function words); enough for plots and descriptions
_STOP = (
    "a about after all also an and any are as at be because been before being between both but by can could did do "
    "does during each few for from further had has have having he her here hers him his how i if in into is it its "
    "itself just me more most my no nor not now of off on once only or other our out over own same she should so "
    "some such than that the their theirs them then there these they this those through to too under until up very "
    "was we were what when where which while who whom why will with would you your yours it's he's she's they're"
)
STOP_WORDS = frozenset(_STOP.split())


def multi_hot(values: Sequence[Sequence[str] | None], min_items: int = 2) -> sp.csr_matrix:
    """[I, V] 0/1 for list-valued metadata; values on fewer than `min_items` items are dropped."""
    rows = [sorted(set(v or ())) for v in values]
    counts = Counter(x for r in rows for x in r)
    vocab = {x: i for i, x in enumerate(sorted(x for x, c in counts.items() if c >= min_items))}
    indptr, indices = [0], list[int]()
    for r in rows:
        indices.extend(vocab[x] for x in r if x in vocab)
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, np.asarray(indices, dtype=np.int64), np.asarray(indptr)), shape=(len(rows), len(vocab)))


def tokenize(text: str | None) -> list[str]:
    return [t for t in _TOKEN.findall((text or "").lower()) if t not in STOP_WORDS]


def tfidf(texts: Sequence[str | None], max_words: int = 1000, min_items: int = 2) -> sp.csr_matrix:
    """[I, ≤max_words] TF-IDF (sublinear-free counts, smooth idf), rows L2-normalised; empty rows stay 0."""
    docs = [Counter(tokenize(t)) for t in texts]
    df = Counter(w for d in docs for w in d)
    kept = [w for w, c in sorted(df.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_items][:max_words]
    vocab = {w: i for i, w in enumerate(kept)}
    n = len(docs)
    idf = np.array([np.log((1 + n) / (1 + df[w])) + 1.0 for w in kept], dtype=np.float64)
    indptr, indices, data = [0], [], []
    for d in docs:
        for w, c in d.items():
            if w in vocab:
                indices.append(vocab[w])
                data.append(c * idf[vocab[w]])
        indptr.append(len(indices))
    z = sp.csr_matrix((np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
                      shape=(n, len(kept)))
    norms = np.sqrt(np.asarray(z.multiply(z).sum(axis=1)).ravel())
    z = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ z
    return sp.csr_matrix(z, dtype=np.float32)


def minmax_columns(z: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Each column scaled to [0, 1]: (z - min) / (max - min); constant columns become 0.

    Sparse input keeps its zeros as the minimum when the column has any (nonnegative features: the usual case);
    a column with negative values is shifted, which densifies it."""
    z = sp.csr_matrix(z, dtype=np.float64)
    dense_cols = np.asarray(z.min(axis=0).todense()).ravel()
    hi = np.asarray(z.max(axis=0).todense()).ravel()
    if (dense_cols < 0).any():
        d = z.toarray()
        lo = d.min(axis=0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        return sp.csr_matrix(((d - lo) / span) * (hi - lo > 0), dtype=np.float32)
    full = np.diff(z.tocsc().indptr) == z.shape[0]  # columns without a zero: their min is not 0
    lo = np.where(full, dense_cols, 0.0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    z = z.tocsc(copy=True)
    for j in np.flatnonzero(full):  # rare (a value every item has): shift those columns' stored entries
        z.data[z.indptr[j] : z.indptr[j + 1]] -= lo[j]
    z = z @ sp.diags(np.where(hi - lo > 0, 1.0 / span, 0.0))
    z.eliminate_zeros()
    return sp.csr_matrix(z, dtype=np.float32)


def smoothed_cosine(z: sp.spmatrix | np.ndarray, delta: float) -> np.ndarray:
    """G [I, I] float32: z_i·z_j / (‖z_i‖‖z_j‖ + δ), zero diagonal; rows without features are all 0."""
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    zs = sp.csr_matrix(z, dtype=np.float32)
    g = (zs @ zs.T).toarray().astype(np.float32)  # [I, I]
    norms = np.sqrt(np.maximum(np.diag(g), 0.0)).astype(np.float32)
    denom = np.outer(norms, norms)
    denom += np.float32(delta)
    np.divide(g, denom, out=g, where=denom > 0)
    g[denom <= 0] = 0.0
    np.fill_diagonal(g, 0.0)
    return g


def decade_one_hot(years: Sequence[float | int | None]) -> sp.csr_matrix:
    """[I, decades] one-hot of the release decade (a typed attribute as a block); missing years are empty rows."""
    dec = [None if y is None or (isinstance(y, float) and np.isnan(y)) else str(int(y) // 10 * 10) for y in years]
    return multi_hot([[d] if d else [] for d in dec], min_items=2)
