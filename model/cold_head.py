"""The cold head: score items that appeared after training from their metadata alone (issue 29; MAREC.md §2).

A fitted recommender knows its training items (the warm columns). The cold head keeps what it takes to place a
NEW item (one with metadata and no clicks, not in the model's vocabulary) next to them, with no retraining:

- a metadata featurizer fitted at training (`BlockFeaturizer`, JSON-safe): per block its vocabulary (tags,
  genres, people, decades) or its TF-IDF words + idf, and the per-column min-max scaling of the fitted items,
  so a new item's feature row lands in the same space as the warm items' (model.metadata's construction:
  multi_hot / tfidf / decade_one_hot, then minmax_columns; new values outside the fitted range are clipped to
  [0, 1], new words and tags outside the vocabulary are ignored);
- the warm items' scaled feature rows (CSR per block) and the smoothing δ, the block weights μ (NNLS, model.marec),
  and whether pair terms G^(k) ∘ G^(l) are used: S_wn = Σ μ_r R_r over the blocks' smoothed cosines warm × new,
  kept on each new item's k nearest model columns (`neighbours`; 0 keeps the paper's dense S: with a few coarse
  genres most titles tie with hundreds of others and the dense sum blurs them, docs/results.md "marec-topk");
- for the MARec/EASE family ("marec"): diag K, K = (XᵀX + λ1 I)⁻¹ over the model's columns. With the EASE
  weights B = I − K diag(1/diag K) (diag 0) already in the bundle, K = (I − B) diag(diag K), so only its
  diagonal is stored (I floats, not another I × I matrix). A new item's column is MARec's cold column
  (model.marec, p = 1): c_j = αβ (S_wj − λ1 K S_wj), on the EASE scores' own scale;
- for other families ("eq5": the autoencoders): the metadata-only score x_u · S_wj (MAREC.md's Eq 5 ablation),
  whose scale is not the model's: pipeline.serving.cold_items merges it by a rule, not by value.

A model column without training clicks (a training-time cold item) gets K's column e_j/λ1 and so contributes 0 to
c_j, as in MARec's formula (sum over warm items only). Pure numpy/scipy/torch: no pipeline imports.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.ease import _spd_inverse_inplace, gram_dense
from model.marec import MARecConfig, fit_mu, regressors, top_k_columns
from model.metadata import smoothed_cosine, tokenize
from model.text_encoder import EMBEDDINGS, centred_unit_rows, embed, encoder_problem, is_embedding, split_block

BlockKind = Literal["list", "scalar", "text", "decade", "embedding"]
HeadKind = Literal["marec", "eq5"]
TEXT_COLUMNS = ("description", "plot")  # as pipeline.io.items.TEXT_COLUMNS (model/ imports nothing of pipeline)
LIST_BLOCKS = ("tags", "genres", "directors", "writers", "actors")
SCALAR_BLOCKS = ("type",)
NOT_CONTENT = ("site_rating", "members")
LINEAR_FAMILIES = ("ease", "marec")  # scores x_u Θ: the cold column is MARec's, on the model's scale
_YEAR = re.compile(r"^-?\d+$")


def default_blocks(columns: Any) -> list[str]:
    """The blocks pipeline.data.item_features.default_blocks picks (tests check that the two agree)."""
    cols = set(columns)
    out = [c for c in LIST_BLOCKS if c in cols]
    if "genres" in cols and "tags" in cols:
        out.remove("tags")
    out += [c for c in SCALAR_BLOCKS if c in cols]
    out += [c for c in TEXT_COLUMNS if c in cols]
    if "year" in cols:
        out.append("year")
    return [c for c in out if c not in NOT_CONTENT]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def block_kind(name: str, values: Sequence[Any]) -> BlockKind:
    if is_embedding(name):
        return "embedding"
    if name in TEXT_COLUMNS:
        return "text"
    if name == "year":
        return "decade"
    first = next((v for v in values if not _missing(v)), None)
    return "scalar" if isinstance(first, str) else "list"


def _tokens(kind: BlockKind, v: Any) -> list[str]:
    """The values of one item's field as the block's vocabulary keys (text: its tokens, with repeats)."""
    if _missing(v):
        return []
    if kind == "text":
        return tokenize(v) if isinstance(v, str) else []
    if kind == "decade":
        try:
            return [str(int(v) // 10 * 10)]
        except (TypeError, ValueError):
            return []
    if kind == "scalar":
        return [v] if isinstance(v, str) and v else []
    return sorted({str(t) for t in v})


@dataclass(frozen=True)
class BlockFeaturizer:
    """One metadata field → a scaled sparse block, fitted on the training items (JSON-safe via to_json).

    An "embedding" block ("plot:wordllama": model.text_encoder) has the embedding's dimensions as its vocabulary and
    the fitted items' mean embedding in `lo`: a text's row is its embedding minus that mean, L2-normalised (signed,
    not min-max scaled: pipeline.data.text_embedding says why), so new and fitted items share one centring."""

    name: str
    kind: BlockKind
    vocab: tuple[str, ...]
    idf: tuple[float, ...] = ()  # text only
    lo: tuple[float, ...] = ()  # per column: min over the fitted items (0 unless every item has the value); embedding: mean
    scale: tuple[float, ...] = ()  # per column: 1 / (max - min), 0 for a constant column

    @property
    def column(self) -> str:
        """The items column the block reads ("plot" for "plot:wordllama")."""
        return split_block(self.name)[0]

    def _embedded(self, values: Sequence[Any]) -> sp.csr_matrix:
        rows = [i for i, v in enumerate(values) if isinstance(v, str) and v.strip()]
        out = np.zeros((len(values), len(self.vocab)), np.float32)
        if rows:
            e = embed([str(values[i]) for i in rows], split_block(self.name)[1])
            if e.shape[1] != len(self.vocab):
                raise ValueError(f"cold head block {self.name!r} was fitted with {len(self.vocab)}-d embeddings, the "
                                 f"encoder now gives {e.shape[1]}: retrain with this encoder version")
            out[rows] = centred_unit_rows(e, np.asarray(self.lo))
        return sp.csr_matrix(out)

    def raw(self, values: Sequence[Any]) -> sp.csr_matrix:
        """[n, V] unscaled: 0/1 for lists, TF-IDF rows (L2-normalised) for text, centred unit rows for embeddings."""
        if self.kind == "embedding":
            return self._embedded(values)
        index = {w: i for i, w in enumerate(self.vocab)}
        indptr, indices, data = [0], list[int](), list[float]()
        for v in values:
            toks = _tokens(self.kind, v)
            if self.kind == "text":
                counts = Counter(t for t in toks if t in index)
                row = {index[w]: c * self.idf[index[w]] for w, c in counts.items()}
                norm = float(np.sqrt(sum(x * x for x in row.values()))) or 1.0
                row = {k: x / norm for k, x in row.items()}
            else:
                row = {index[t]: 1.0 for t in toks if t in index}
            indices.extend(row)
            data.extend(row.values())
            indptr.append(len(indices))
        return sp.csr_matrix((np.asarray(data, np.float64), np.asarray(indices, np.int64), np.asarray(indptr)),
                             shape=(len(values), len(self.vocab)))

    def transform(self, values: Sequence[Any]) -> sp.csr_matrix:
        """[n, V] float32 in the fitted items' [0, 1] scaling (model.metadata.minmax_columns), clipped to it;
        embeddings as raw() gives them."""
        if self.kind == "embedding":
            return sp.csr_matrix(self.raw(values), dtype=np.float32)
        z = self.raw(values).tocsc()
        lo, scale = np.asarray(self.lo), np.asarray(self.scale)
        for j in np.flatnonzero(lo):  # a value every fitted item had: its stored entries shift (minmax_columns)
            z.data[z.indptr[j]:z.indptr[j + 1]] -= lo[j]
        z = sp.csr_matrix(z @ sp.diags(scale))
        np.clip(z.data, 0.0, 1.0, out=z.data)
        z.eliminate_zeros()
        return sp.csr_matrix(z, dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "vocab": list(self.vocab), "idf": list(self.idf),
                "lo": list(self.lo), "scale": list(self.scale)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BlockFeaturizer:
        b = cls(str(d["name"]), d["kind"], tuple(map(str, d["vocab"])), tuple(map(float, d["idf"])),
                tuple(map(float, d["lo"])), tuple(map(float, d["scale"])))
        n = len(b.vocab)
        if b.kind not in ("list", "scalar", "text", "decade", "embedding") or len(b.lo) != n or len(b.scale) != n or \
                (b.kind == "text" and len(b.idf) != n) or (b.kind == "embedding" and not is_embedding(b.name)):
            raise ValueError(f"cold head block {b.name!r} is malformed ({b.kind}, {n} values)")
        return b


def fit_block(name: str, values: Sequence[Any], min_items: int = 2, max_words: int = 1000) -> BlockFeaturizer:
    """The block's featurizer fitted on `values` (one per item), with model.metadata's rules: values on fewer than
    `min_items` items dropped; text: the `max_words` most frequent words (document frequency ≥ min_items), smooth idf."""
    kind = block_kind(name, values)
    if kind == "embedding":
        texts = [str(v) for v in values if isinstance(v, str) and v.strip()]
        if len(texts) < min_items:  # nothing to compare with: the head drops a block without vocabulary
            return BlockFeaturizer(name, kind, ())
        mean = embed(texts, split_block(name)[1]).mean(axis=0)
        return BlockFeaturizer(name, kind, tuple(f"e{i}" for i in range(len(mean))), (), tuple(map(float, mean)),
                               (1.0,) * len(mean))
    docs = [_tokens(kind, v) for v in values]
    df = Counter(w for d in docs for w in set(d))
    idf: tuple[float, ...] = ()
    if kind == "text":
        vocab = tuple(w for w, c in sorted(df.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_items)[:max_words]
        n = len(docs)
        idf = tuple(float(np.log((1 + n) / (1 + df[w])) + 1.0) for w in vocab)
    else:
        vocab = tuple(sorted(w for w, c in df.items() if c >= min_items))
    b = BlockFeaturizer(name, kind, vocab, idf, (0.0,) * len(vocab), (1.0,) * len(vocab))
    z = b.raw(values)
    hi = np.asarray(z.max(axis=0).todense()).ravel() if z.shape[1] else np.zeros(0)
    full = np.diff(z.tocsc().indptr) == z.shape[0]
    lo = np.where(full, np.asarray(z.min(axis=0).todense()).ravel() if z.shape[1] else 0.0, 0.0)
    span = hi - lo
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)
    return BlockFeaturizer(name, kind, vocab, idf, tuple(map(float, lo)), tuple(map(float, scale)))


class ColdHeadTuning(BaseModel):
    """Choosing δ and `neighbours` at training on pseudo-cold titles (model.cold_head_tuning): a random `holdout`
    share of the clicked titles with metadata lose their clicks, the head is fitted without them, and each (δ, k)
    ranks them for the users who clicked them (NDCG@`k_eval` among the held-out titles, as the research protocol's
    cold-only ranking). The bundle's head is then fitted on all clicks with the best pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delta_grid: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    neighbours_grid: tuple[int, ...] = (0, 20, 100)
    holdout: float = Field(0.1, gt=0.0, lt=0.5, description="share of the clicked titles with metadata held out")
    max_holdout: int = Field(2000, ge=2, description="at most this many held-out titles")
    max_users: int = Field(5000, ge=1, description="at most this many users (drawn at random) rank them")
    k_eval: int = Field(25, ge=1, description="NDCG cut-off")
    seed: int = 0

    @field_validator("delta_grid")
    @classmethod
    def _deltas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (d >= 0 and np.isfinite(d)) for d in v):
            raise ValueError(f"delta_grid needs at least one finite δ >= 0, got {list(v)}")
        return v

    @field_validator("neighbours_grid")
    @classmethod
    def _neighbours(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 0 for k in v):
            raise ValueError(f"neighbours_grid needs at least one k >= 0 (0: all titles), got {list(v)}")
        return v


class ColdHeadConfig(BaseModel):
    """How the head is built at training. `ab` = αβ, MARec's cold-vs-warm trade-off (the research protocol picks it
    on validation: `recsys experiment --protocol cold-start`, "catalogue: marec (warm guard)"); `l2` defaults to
    the EASE model's own λ1 (it must be: the warm block and K come from the same solve)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blocks: tuple[str, ...] | None = None  # item columns (or 'year', or 'plot:wordllama'); None: default_blocks
    delta: float = Field(10.0, ge=0.0, description="δ of the smoothed cosine")
    neighbours: int = Field(0, ge=0, description=(
        "keep each new item's similarities on its k most similar model columns (0: all of them, the paper's dense "
        "S); with `tune` the weekly job chooses it (docs/results.md: k = 20-100 on catalogues with a few coarse "
        "genres or one tag list, the dense S with people and plots)"))
    ab: float = Field(1.0, ge=0.0, description="αβ: the height of MARec's cold columns (linear families)")
    l2: float | None = Field(None, gt=0.0, description="λ1; None: the EASE model's config.l2")
    mu: tuple[float, ...] | None = None  # block weights (e.g. from the research run); None: NNLS on the training clicks
    second_order: bool = True
    max_pairs_blocks: int = Field(6, ge=1)
    w0: float = Field(0.1, gt=0.0)
    seed: int = 0
    tune: ColdHeadTuning | None = Field(default_factory=ColdHeadTuning, description=(
        "the weekly job (pipeline.training.cold_head_fit) chooses delta and neighbours on pseudo-cold titles, "
        "replacing the two values above (kept when there is too little to hold out); null: use them as given. "
        "build_cold_head itself always uses them as given"))

    @field_validator("blocks")
    @classmethod
    def _known_encoders(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for b in v or ():
            if (problem := encoder_problem(b, TEXT_COLUMNS, EMBEDDINGS)) is not None:
                raise ValueError(problem)
        return v


@dataclass
class ColdHead:
    """See the module doc. `warm_rows[b]` [n_items, V_b] are the model columns' scaled feature rows."""

    kind: HeadKind
    blocks: list[BlockFeaturizer]
    warm_rows: list[sp.csr_matrix]
    mu: np.ndarray  # one weight per regressor: the blocks, then their pairs (model.marec.regressors)
    delta: float
    second_order: bool
    max_pairs_blocks: int
    ab: float = 0.0
    l2: float = 0.0
    k_diag: np.ndarray | None = None  # [n_items] diag K (kind "marec")
    neighbours: int = 0  # S_wn kept on each new item's k most similar model columns (0: dense)
    _norms: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.warm_rows) or not self.blocks:
            raise ValueError("a cold head needs one warm feature block per featurizer (and at least one)")
        n = {z.shape[0] for z in self.warm_rows}
        if len(n) != 1:
            raise ValueError("the warm feature blocks cover different numbers of items")
        if self.kind == "marec" and (self.k_diag is None or len(self.k_diag) != self.n_items):
            raise ValueError("a 'marec' cold head needs diag K over the model's columns")
        self._norms = [np.sqrt(np.asarray(z.multiply(z).sum(axis=1)).ravel()).astype(np.float32) for z in self.warm_rows]

    @property
    def n_items(self) -> int:
        return int(self.warm_rows[0].shape[0])

    @property
    def linear(self) -> bool:
        """Cold scores on the model's own scale (merged by value), or not (merged by a rule)."""
        return self.kind == "marec"

    def encode(self, items: Mapping[str, Sequence[Any]], n: int) -> list[sp.csr_matrix]:
        """The new items' scaled feature rows per block; `items` maps column → n values (a missing column: empty)."""
        return [b.transform(list(items[b.column]) if b.column in items else [None] * n) for b in self.blocks]

    def similarity(self, new_rows: list[sp.csr_matrix], exclude: np.ndarray | None = None) -> np.ndarray:
        """S_wn [n_items, n_new] float32 = Σ μ_r R_r over the smoothed cosines warm × new (model.metadata), kept on
        each new item's `neighbours` largest entries; rows in `exclude` (model columns) are zeroed first."""
        gs = []
        for zw, nw, zn in zip(self.warm_rows, self._norms, new_rows, strict=True):
            g = np.asarray((zw @ zn.T).todense(), dtype=np.float32)
            nn_ = np.sqrt(np.asarray(zn.multiply(zn).sum(axis=1)).ravel()).astype(np.float32)
            denom = np.outer(nw, nn_) + np.float32(self.delta)
            np.divide(g, denom, out=g, where=denom > 0)
            g[denom <= 0] = 0.0
            gs.append(g)
        regs = regressors(gs, self.second_order, self.max_pairs_blocks)
        s = np.zeros_like(gs[0])
        for m, r in zip(self.mu, regs, strict=True):
            if m:
                s += np.float32(m) * r
        if exclude is not None:
            s[np.asarray(exclude, dtype=np.int64)] = 0.0
        return top_k_columns(s, self.neighbours)

    def cold_columns(self, new_rows: list[sp.csr_matrix], weights: Any = None) -> np.ndarray:
        """C [n_items, n_new] float32: x_u · C[:, j] is user u's score of new item j.

        "marec": αβ (S − λ1 K S) with K = (I − B) diag(diag K), B = `weights` (the EASE weights [I, I]);
        "eq5": S."""
        s = self.similarity(new_rows)
        if self.kind == "eq5":
            return s
        import torch

        if weights is None:
            raise ValueError("a 'marec' cold head needs the model's EASE weights")
        b = weights if isinstance(weights, torch.Tensor) else torch.from_numpy(np.asarray(weights))
        assert self.k_diag is not None
        ds = torch.from_numpy(self.k_diag.astype(np.float32)[:, None] * s).to(b.device, torch.float32)
        ks = ds - b.float() @ ds  # K S = (I − B) diag(dK) S
        c = s - np.float32(self.l2) * ks.cpu().numpy()
        return (np.float32(self.ab) * c).astype(np.float32)


class MetadataOnly:
    """A stand-in model for build_cold_head when only the metadata-only ("eq5") head is wanted: its name is not a
    linear family, so no λ1 or diag K is involved."""

    name = "metadata-only"


def marec_k_diag(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """diag (XᵀX + λ1 I)⁻¹ [I] (one SPD inverse, as the EASE fit; float64 for the small diagonal entries)."""
    g = gram_dense(sp.csr_matrix(x, dtype=np.float32), np.dtype(np.float64))
    g[np.diag_indices_from(g)] += l2
    return np.diag(_spd_inverse_inplace(g)).copy()


def build_cold_head(rec: Any, train: sp.csr_matrix, items: Mapping[str, Sequence[Any]],
                    config: ColdHeadConfig | None = None) -> ColdHead:
    """The cold head of a fitted recommender.

    `train` [U, I] is the training matrix over the model's columns; `items` maps each metadata column to its
    values for the model's columns in column order (e.g. ``items_df.reindex(item_ids).to_dict("list")``; an
    item without metadata has None / []). Kind "marec" for EASE (and MARec) models, "eq5" otherwise."""
    cfg = config or ColdHeadConfig()
    kept, rows = featurize(items, cfg.blocks, train.shape[1])
    name = getattr(rec, "name", "")
    kind: HeadKind = "marec" if name in LINEAR_FAMILIES else "eq5"
    l2 = float(cfg.l2 if cfg.l2 is not None else getattr(getattr(rec, "config", None), "l2", 0.0) or 0.0)
    if kind == "marec" and l2 <= 0:
        raise ValueError("a 'marec' cold head needs λ1 (ColdHeadConfig.l2 or the model's config.l2)")
    head = ColdHead(kind, kept, rows, np.zeros(0), cfg.delta, cfg.second_order, cfg.max_pairs_blocks,
                    cfg.ab, l2, marec_k_diag(train, l2) if kind == "marec" else None, cfg.neighbours)
    n_regs = pair_count(len(kept), cfg.second_order, cfg.max_pairs_blocks)
    if cfg.mu is not None:
        if len(cfg.mu) != n_regs:
            raise ValueError(f"mu has {len(cfg.mu)} weights, the {len(kept)} blocks need {n_regs}")
        head.mu = np.asarray(cfg.mu, np.float64)
    else:  # NNLS on the training clicks (model.marec.fit_mu), over dense [I, I] similarities of the model's items
        gs = [smoothed_cosine(z, cfg.delta) for z in rows]
        mcfg = MARecConfig(w0=cfg.w0, second_order=cfg.second_order, max_pairs_blocks=cfg.max_pairs_blocks, seed=cfg.seed)
        head.mu = fit_mu(sp.csr_matrix(train), regressors(gs, cfg.second_order, cfg.max_pairs_blocks), mcfg)
    return head


def featurize(items: Mapping[str, Sequence[Any]], blocks: Sequence[str] | None,
              n: int) -> tuple[list[BlockFeaturizer], list[sp.csr_matrix]]:
    """The fitted featurizers of the usable blocks (`blocks`, or default_blocks) and the n model columns' rows."""
    names = list(blocks) if blocks else default_blocks(items.keys())
    if not names:
        raise ValueError(f"no metadata block among the items' columns ({', '.join(map(str, items))[:200]})")
    for c in names:
        col = split_block(c)[0]
        if col not in items or len(items[col]) != n:
            raise ValueError(f"metadata column {col!r} must hold one value per model column ({n})")
    fitted = [fit_block(c, items[split_block(c)[0]]) for c in names]
    kept = [b for b in fitted if b.vocab and any(b.scale)]
    if not kept:
        raise ValueError(f"no value of {names} is shared by two items: nothing to compare new items with")
    return kept, [b.transform(items[b.column]) for b in kept]


def pair_count(n_blocks: int, second_order: bool, max_pairs_blocks: int) -> int:
    """How many regressors `n_blocks` blocks give (the blocks, then their pairs when used)."""
    pairs = len(list(itertools.combinations(range(n_blocks), 2))) if second_order and 1 < n_blocks <= max_pairs_blocks else 0
    return n_blocks + pairs
