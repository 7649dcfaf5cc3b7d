"""`recsys experiment --protocol cold-start`: item cold start with MARec-EASE (../shared/reference/MAREC.md §1, §4).

Per seed (one split each):
- items: a random `cold_fraction` (20%) of the items that have metadata become cold (their clicks leave training,
  their metadata stays), halved into cold-val and cold-test; every other item is warm, and its clicks are split at
  random 80/10/10 into train / warm-val / warm-test (the paper's ML10M/Netflix protocol);
- users without a training click drop out (nothing to rank from).

Candidate sets, both reported:
- "cold": rank the cold-test items only (warm and cold-val items masked) for the users who clicked a cold-test
  item; targets = those clicks. α and β do not change this ranking (MAREC.md §2's structure result).
- "all": rank the whole catalogue minus the user's training and validation clicks; targets = warm-test ∪
  cold-test clicks; reported over all targets and split into the warm and the cold targets (the paper's Table 7).
  MARec's αβ (cold-vs-warm trade-off) and both models' λ1 are chosen on the "all" validation ranking; "marec (warm
  guard)" takes the best such setting whose warm validation NDCG@25 stays within 1% of EASE's (αβ = 0, i.e. EASE,
  when none does): a product rule for "do not lose warm accuracy".

Hyperparameters come from the validation items/clicks only, chosen on each seed's own split (or, with
tune_every_seed=False, on the first one and reused): MARec's δ, λ1 and feature blocks (all, and all but free
text where a text block exists) on cold-val NDCG@25; item-kNN's neighbourhood size likewise. Metrics
(model.metrics): hr@K = hits@K / min(K, #targets) (our recall@K), NDCG@K binary with IDCG over min(K, #targets);
K = 10, 25 and NDCG@100.

Baselines on "cold":
- random: cold items in random order. EASE without alignment is exactly this: every cold item scores 0 (its
  column and row of XᵀX are empty), so its order among cold items is whatever tie-break the ranker uses.
- popularity-among-cold: cold items have no clicks, so "popularity" must come from metadata: each feature value's
  mean training clicks over warm items carrying it, averaged over the cold item's values (non-personalised).
- meta-knn: item-kNN on metadata (cosine of the concatenated, min-max scaled blocks; the k most similar warm
  items of each cold item), score = Σ over the user's items.
- marec-eq5: the metadata-only scores X S (MARec's alignment target without the backbone).
- marec-topk (ours, not the paper's): MARec with S_wc kept on each cold item's k most similar warm items (k from
  the kNN grid, chosen on cold-val), to separate the effect of neighbourhood truncation from the alignment.

The Multi-VAE backbone (`vae_epochs` > 0; MAREC.md §2, Eq 7): "marec-vae" trains Multi-VAE with MARec's alignment
target b_u = αβ x_u S_wc on the cold columns (model.marec.AlignmentTarget; S from MARec-EASE's chosen blocks and δ,
αβ from `align_grid` on cold-val NDCG@25), against "multivae (no alignment)", the same backbone, seed and epochs
without it (its cold columns only ever learn to score low). Both train a fixed `vae_epochs` (no validation users
are split off in this protocol) and are scored on both candidate sets; MARec-VAE must not lose the backbone's warm
accuracy in the whole catalogue.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
from pydantic import Field, field_validator

from model.ease import _spd_inverse_inplace, gram_dense
from model.marec import AlignmentTarget, MARecConfig, combine, fit_mu, regressors, top_k_columns
from model.metadata import smoothed_cosine
from model.metrics import ranking_metrics
from model.recommenders import Autoencoder
from model.sparse import DeviceCSR
from model.train import TrainConfig
from pipeline.data.dataset import BinarizeRule, Interactions, prepare, read_interactions, resolve_dataset
from pipeline.data.item_features import block_column, build_block, default_blocks, feature_blocks
from pipeline.data.items import TEXT_COLUMNS, read_items
from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.io.publish import write_single_object
from pipeline.job import Job
from pipeline.research.experiment import ExperimentResult
from pipeline.training.evaluation import machine_name

log = logging.getLogger(__name__)

METRICS = ("recall@10", "recall@25", "ndcg@10", "ndcg@25", "ndcg@100")  # recall@K is the paper's hr@K
SELECT = "ndcg@25"
WARM_GUARD = 0.01  # "marec (warm guard)": at most 1% below EASE's warm validation NDCG@25 in the whole catalogue
CATALOGUE_MODELS = ("ease", "marec", "marec (warm guard)")
VAE_BACKBONE = "multivae (no alignment)"
class ColdStartResult(ExperimentResult):
    """The cold-start results table and where it was written (the same fields as the warm experiment's)."""


class ColdStartJob(Job):
    """MARec-EASE and baselines under the item cold-start protocol (see the module doc)."""

    dataset: str
    data_dir: Path = Path("../shared/data")
    out: Path
    seeds: int = Field(3, ge=1)
    first_seed: int = 0
    cold_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    min_rating: float | None = None
    min_user_interactions: int = Field(5, ge=1)
    min_item_users: int = Field(1, ge=1, description="keep items with at least this many positive users")
    blocks: tuple[str, ...] | None = None  # feature blocks (item columns, or 'year'); default: what the set has
    delta_grid: tuple[float, ...] = (1.0, 10.0, 50.0, 200.0, 1000.0)
    l2_grid: tuple[float, ...] = (1.0, 10.0, 100.0, 500.0)
    ab_grid: tuple[float, ...] = (0.0, 0.03, 0.1, 0.2, 0.5, 1.0, 3.0, 10.0, 100.0)
    knn_grid: tuple[int, ...] = (20, 100, 0)  # 0: every warm item
    w0: float = 0.1
    tune_every_seed: bool = True  # False: tune on the first seed's split, reuse for the others (faster)
    second_order: bool = True
    max_items: int = Field(20_000, ge=1)
    feature_cache: Path | None = None  # feature blocks cached here by content hash (pipeline.data.item_features)
    vae_epochs: int = Field(0, ge=0, description="epochs of Multi-VAE and MARec-VAE (0: the autoencoder rows are skipped)")
    align_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), description=(
        "MARec-VAE's αβ: chosen on cold-val for cold-only ranking, on the whole-catalogue validation (and with the "
        "warm guard) for the catalogue"))
    device: str = "auto"  # where the autoencoders train
    text_encoder: Literal["tfidf", "wordllama"] = Field("tfidf", description=(
        "free text as TF-IDF, or as sentence embeddings of the model inside the wordllama wheel (default blocks)"))

    @field_validator("ab_grid")
    @classmethod
    def _one_positive_ab(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(a < 0 for a in v) or not any(a > 0 for a in v):
            raise ValueError("ab_grid needs values >= 0 with at least one > 0 (0 is EASE in the whole catalogue)")
        return v

    @field_validator("align_grid")
    @classmethod
    def _positive_align(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not a > 0 for a in v):
            raise ValueError("align_grid needs at least one αβ > 0 (the backbone without alignment is always run)")
        return v

    def run(self) -> ColdStartResult:
        results = ColdStart(self).run()
        return ColdStartResult(results=results, results_json=str(self.out / "results.json"),
                               results_md=str(self.out / "results.md"))


# -- data -----------------------------------------------------------------------------------------------

def load(cfg: ColdStartJob) -> tuple[Interactions, dict[str, sp.csr_matrix], list[str]]:
    """The binarised matrix (items with metadata only) and its feature blocks [I, *], min-max scaled."""
    path = resolve_dataset(cfg.dataset, cfg.data_dir)
    items_path = path.parent / "items.parquet"
    if not items_path.exists():
        raise DataError(f"{cfg.dataset} has no items.parquet next to {path.name}",
                        "run the cold-start protocol on a set with item metadata (ml-100k, ml-1m-*, lastfm-hetrec2011, anime)")
    df = read_interactions(path)
    if "rating" in df.columns and df["rating"].isna().any():  # anime: listed without a rating; no rating, no positive
        log.warning("%s: %d interactions without a rating dropped", cfg.dataset, int(df["rating"].isna().sum()))
        df = df[df["rating"].notna()]
    rule = BinarizeRule(min_rating=cfg.min_rating if cfg.min_rating is not None else (4.0 if "rating" in df.columns else None))
    items = read_items(items_path).to_pandas().set_index("item_id")
    names = list(cfg.blocks) if cfg.blocks else [
        f"{n}:{cfg.text_encoder}" if n in TEXT_COLUMNS and cfg.text_encoder != "tfidf" else n
        for n in default_blocks(items.columns)]
    df = df[df["item_id"].isin(items.index)]
    data = prepare(df, rule, cfg.min_user_interactions)
    users_per_item = np.diff(data.matrix.tocsc().indptr)
    keep = users_per_item >= cfg.min_item_users
    raw = {n: build_block(items, n, data.item_ids) for n in names}  # which items have any metadata
    has_meta = np.zeros(data.n_items, dtype=bool)
    for z in raw.values():
        has_meta |= np.diff(z.indptr) > 0
    keep &= has_meta
    if keep.sum() > cfg.max_items:
        raise DataError(f"{int(keep.sum())} items with metadata exceed max_items={cfg.max_items} (dense I x I)",
                        "raise --min-item-users or --max-items")
    cols = np.flatnonzero(keep)
    m = sp.csr_matrix(data.matrix[:, cols])
    rows = np.flatnonzero(np.diff(m.indptr) > 0)
    data = Interactions(sp.csr_matrix(m[rows]), data.user_ids[rows], data.item_ids[cols], data.stats)
    blocks = feature_blocks(items, data.item_ids, names, cfg.feature_cache)
    if not blocks:
        raise DataError(f"no metadata value of {names} is shared by two items: no similarity to learn from",
                        "choose --blocks with shared values (genres, tags, people)")
    return data, blocks, names


@dataclass(frozen=True)
class ColdSplit:
    train: sp.csr_matrix  # [U, I] warm training clicks (cold columns empty)
    warm_val: sp.csr_matrix
    warm_test: sp.csr_matrix
    cold_val: sp.csr_matrix  # clicks on cold-val items
    cold_test: sp.csr_matrix
    cold_val_items: np.ndarray
    cold_test_items: np.ndarray

    @property
    def warm(self) -> np.ndarray:
        w = np.ones(self.train.shape[1], dtype=bool)
        w[self.cold_val_items] = False
        w[self.cold_test_items] = False
        return w


def cold_split(x: sp.csr_matrix, seed: int, cold_fraction: float = 0.2) -> ColdSplit:
    rng = np.random.default_rng(seed)
    n_items = x.shape[1]
    cold = rng.permutation(n_items)[: max(2, round(cold_fraction * n_items))]
    half = len(cold) // 2
    cv, ct = np.sort(cold[:half]), np.sort(cold[half:])
    coo = sp.coo_matrix(x)
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold] = True
    in_cv = np.isin(coo.col, cv)
    in_ct = np.isin(coo.col, ct)
    draw = rng.random(coo.nnz)
    warm = ~is_cold[coo.col]

    def part(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(int(mask.sum()), np.float32), (coo.row[mask], coo.col[mask])), shape=x.shape)

    return ColdSplit(part(warm & (draw < 0.8)), part(warm & (draw >= 0.8) & (draw < 0.9)), part(warm & (draw >= 0.9)),
                     part(in_cv), part(in_ct), cv, ct)


# -- scoring ----------------------------------------------------------------------------------------------

def metrics(scores: np.ndarray, targets: sp.csr_matrix, mask: sp.csr_matrix | None = None) -> dict[str, float]:
    """Mean metrics over rows with a target; scores [U, C] (C candidate columns), masked cells never ranked."""
    s = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    if mask is not None and mask.nnz:
        mc = sp.coo_matrix(mask)
        s[torch.from_numpy(mc.row.astype(np.int64)), torch.from_numpy(mc.col.astype(np.int64))] = -torch.inf
    t = torch.from_numpy(sp.csr_matrix(targets).toarray() > 0)
    out = ranking_metrics(s, t, ks_recall=(10, 25), ks_ndcg=(10, 25, 100))
    res = {k: float(np.nanmean(v.numpy())) if torch.isfinite(v).any() else float("nan") for k, v in out.items()}
    res["users"] = float(int((t.sum(1) > 0).sum()))
    return res


def autoencoder_scores(rec: Autoencoder, rows: sp.csr_matrix, batch: int = 2000) -> np.ndarray:
    """The model's scores [U, I] for these users' training rows."""
    out = np.empty(rows.shape, dtype=np.float32)
    for a in range(0, rows.shape[0], batch):
        chunk = DeviceCSR.from_scipy(sp.csr_matrix(rows[a:a + batch], dtype=np.float32), rec.device)
        out[a:a + chunk.n_rows] = rec.score(chunk.batch(torch.arange(chunk.n_rows))).float().cpu().numpy()
    return out


def _users_with(targets: sp.csr_matrix, train: sp.csr_matrix) -> np.ndarray:
    return np.flatnonzero((np.diff(sp.csr_matrix(targets).indptr) > 0) & (np.diff(train.indptr) > 0))


class ColdStart:
    def __init__(self, cfg: ColdStartJob):
        self.cfg = cfg

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        data, blocks, _ = load(cfg)
        text = [n for n in blocks if block_column(n) in TEXT_COLUMNS]
        blocksets = {"all": list(blocks)} | ({"no-text": [n for n in blocks if n not in text]} if text else {})
        print(f"[{cfg.dataset}] {data.n_users} users x {data.n_items} items, {data.matrix.nnz} clicks; blocks "
              + ", ".join(f"{n}({z.shape[1]})" for n, z in blocks.items()), flush=True)
        per_seed: list[dict[str, Any]] = []
        first: dict[str, Any] | None = None
        tuning: list[dict[str, Any]] = []
        for si, seed in enumerate(range(cfg.first_seed, cfg.first_seed + cfg.seeds)):
            split = cold_split(data.matrix, seed, cfg.cold_fraction)
            row = self.one_seed(split, blocks, blocksets, seed, first if si and not cfg.tune_every_seed else None, tuning)
            first = first or row["chosen"]
            per_seed.append(row)
            self.write(data, blocks, per_seed, tuning, time.perf_counter() - t0)
        return json.loads((cfg.out / "results.json").read_text())

    # one split: tune on its validation parts when `chosen_in` is None, else reuse those values
    def one_seed(self, sp_: ColdSplit, blocks: dict[str, sp.csr_matrix], blocksets: dict[str, list[str]], seed: int,
                 chosen_in: dict[str, Any] | None, tuning: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        tune = chosen_in is None
        chosen: dict[str, Any] = {} if tune else chosen_in  # type: ignore[assignment]
        x = sp_.train
        warm = sp_.warm
        wi, ci = np.flatnonzero(warm), np.flatnonzero(~warm)
        pos_v, pos_t = np.searchsorted(ci, sp_.cold_val_items), np.searchsorted(ci, sp_.cold_test_items)
        xw = sp.csr_matrix(x[:, wi])
        n_click = np.asarray(xw.sum(axis=0)).ravel()
        t_start = time.perf_counter()
        k_cache: dict[float, np.ndarray] = {}

        def k_inv(l2: float) -> np.ndarray:
            if l2 not in k_cache:
                k = gram_dense(sp.csr_matrix(xw, dtype=np.float32), np.dtype(np.float32))
                k[np.diag_indices_from(k)] += l2
                k_cache[l2] = _spd_inverse_inplace(k)
            return k_cache[l2]

        # cold-only candidate sets: scores over cold-val / cold-test columns, rows = users with such targets
        uv, ut = _users_with(sp_.cold_val, x), _users_with(sp_.cold_test, x)
        tv = sp.csr_matrix(sp_.cold_val[uv][:, sp_.cold_val_items])
        tt = sp.csr_matrix(sp_.cold_test[ut][:, sp_.cold_test_items])
        xv, xt = xw[uv], xw[ut]

        def cold_eval(c_cols: np.ndarray, val: bool) -> dict[str, float]:
            """c_cols [Iw, Ic]: weights from warm items to the cold items; scored on the cold-val or cold-test ones."""
            if val:
                return metrics(np.asarray(xv @ c_cols[:, pos_v]), tv)
            return metrics(np.asarray(xt @ c_cols[:, pos_t]), tt)

        results: dict[str, dict[str, float]] = {}
        rng = np.random.default_rng(seed + 10_000)
        results["random (= ease)"] = metrics(rng.random(tt.shape), tt)

        # popularity-among-cold: each feature value's mean training clicks over warm items, averaged per item
        f = sp.hstack([blocks[n] for n in blocks]).tocsr()
        fb = sp.csr_matrix(f > 0, dtype=np.float64)
        carriers = np.asarray(fb[wi].sum(axis=0)).ravel()
        value_pop = (fb[wi].T @ n_click) / np.maximum(carriers, 1)
        item_pop = (fb @ value_pop) / np.maximum(np.asarray(fb.sum(axis=1)).ravel(), 1)
        results["popularity-among-cold"] = metrics(np.tile(item_pop[sp_.cold_test_items], (len(ut), 1)), tt)

        # metadata item-kNN: plain cosine of the concatenated blocks, k nearest warm items per cold item
        g0 = smoothed_cosine(f, 0.0)[np.ix_(wi, ci)]  # [Iw, Ic]
        def knn(k: int) -> np.ndarray:
            return top_k_columns(g0, k)

        if tune:
            rows: list[dict[str, Any]] = [{"k": k, **cold_eval(knn(k), True)} for k in cfg.knn_grid]
            best = max(rows, key=lambda r: r[SELECT])
            chosen["meta-knn"] = {"k": best["k"]}
            tuning.append({"seed": seed, "model": "meta-knn", "rows": rows})
        results["meta-knn"] = cold_eval(knn(chosen["meta-knn"]["k"]), False)

        # MARec: S per (blocks, δ), μ by NNLS on the training clicks; C_λ = (I − λK) S_wc on the cold columns
        mcfg = MARecConfig(w0=cfg.w0, second_order=cfg.second_order, seed=seed)
        s_cache: dict[tuple[str, float], np.ndarray] = {}

        def s_wc(bs: str, delta: float) -> np.ndarray:
            key = (bs, delta)
            if key not in s_cache:
                gs = [smoothed_cosine(blocks[n], delta) for n in blocksets[bs]]
                regs = regressors(gs, mcfg.second_order, mcfg.max_pairs_blocks)
                mu = fit_mu(x, regs, mcfg)
                s_cache[key] = np.ascontiguousarray(combine(regs, mu)[np.ix_(wi, ci)])  # [Iw, Ic]
                log.info("S(%s, δ=%g): μ=%s", bs, delta, np.round(mu, 4))
            return s_cache[key]

        xk_cache: dict[tuple[str, float], np.ndarray] = {}

        def xk(rows: sp.csr_matrix, tag: str, l2: float) -> np.ndarray:
            """x K [U, Iw] for a fixed set of users (tag), once per λ1."""
            if (tag, l2) not in xk_cache:
                xk_cache[(tag, l2)] = np.asarray(rows @ k_inv(l2), dtype=np.float32)
            return xk_cache[(tag, l2)]

        def marec_eval(s_w: np.ndarray, l2: float, val: bool) -> dict[str, float]:
            """x C = x S_wc − λ1 (x K) S_wc on the cold-val or cold-test columns (never the [Iw, Ic] product K S_wc)."""
            rows, pos, tgt, tag = (xv, pos_v, tv, "v") if val else (xt, pos_t, tt, "t")
            s_cols = np.ascontiguousarray(s_w[:, pos])
            return metrics(np.asarray(rows @ s_cols) - np.float32(l2) * (xk(rows, tag, l2) @ s_cols), tgt)

        if tune:
            rows = []
            for bs in blocksets:
                for delta in cfg.delta_grid:
                    s_w = s_wc(bs, delta)
                    rows.append({"model": "marec-eq5", "blocks": bs, "delta": delta, **cold_eval(s_w, True)})
                    for l2 in cfg.l2_grid:
                        rows.append({"model": "marec", "blocks": bs, "delta": delta, "l2": l2, **marec_eval(s_w, l2, True)})
                        print(f"  tune marec {bs} δ={delta:g} λ1={l2:g}: val {SELECT}={rows[-1][SELECT]:.4f}", flush=True)
                        for k in [k for k in cfg.knn_grid if k > 0]:  # our variant: S kept on each cold item's top k
                            rows.append({"model": "marec-topk", "blocks": bs, "delta": delta, "l2": l2, "k": k,
                                         **marec_eval(top_k_columns(s_w, k), l2, True)})
            tuning.append({"seed": seed, "model": "marec", "rows": rows})
            for name in ("marec", "marec-eq5", "marec-topk"):
                if not any(r["model"] == name for r in rows):
                    continue
                best = max((r for r in rows if r["model"] == name), key=lambda r: r[SELECT])
                chosen[name] = {k: best[k] for k in ("blocks", "delta", "l2", "k") if k in best}
                if "no-text" in blocksets:  # the text ablation: the best of each block set, on the same validation
                    for bs, label in (("no-text", " (no text)"), ("all", " (with text)")):
                        nt = max((r for r in rows if r["model"] == name and r["blocks"] == bs), key=lambda r: r[SELECT])
                        chosen[name + label] = {k: nt[k] for k in ("blocks", "delta", "l2", "k") if k in nt}
        for name in [n for n in chosen if n.startswith("marec")]:  # marec, marec-eq5 and their text ablations
            c = chosen[name]
            s_w = top_k_columns(s_wc(c["blocks"], c["delta"]), c.get("k", 0))
            results[name] = cold_eval(s_w, False) if "eq5" in name else marec_eval(s_w, c["l2"], False)

        # whole catalogue: EASE (cold scores 0) vs MARec (cold columns αβ·C); λ1 and αβ chosen on the val ranking
        cm = chosen["marec"]
        s_w = s_wc(cm["blocks"], cm["delta"])
        all_val = sp.csr_matrix(sp_.warm_val + sp_.cold_val)
        all_test = sp.csr_matrix(sp_.warm_test + sp_.cold_test)
        av, at = _users_with(all_val, x), _users_with(all_test, x)

        parts: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray]] = {}

        def full_scores(users: np.ndarray, l2: float, ab: float, val: bool) -> np.ndarray:
            if (val, l2) not in parts:  # warm scores (EASE) and cold scores per unit αβ, once per λ1
                rows = xw[users]
                xk_u = xk(rows, "all-v" if val else "all-t", l2)
                # x B with B = −K diag(1/diag K), diag 0: −(xK)/diag K + x (the diagonal's −1 removed)
                warm_part = -xk_u / np.diag(k_inv(l2))[None, :] + rows.toarray()
                parts[(val, l2)] = (warm_part, np.asarray(rows @ s_w) - np.float32(l2) * (xk_u @ s_w))
            warm_s, cold_s = parts[(val, l2)]
            out = np.zeros((len(users), x.shape[1]), dtype=np.float32)
            out[:, wi] = warm_s
            out[:, ci] = np.float32(ab) * cold_s
            return out

        def all_eval(l2: float, ab: float, val: bool) -> dict[str, Any]:
            return part_eval(full_scores(av if val else at, l2, ab, val), val)

        def part_eval(s: np.ndarray, val: bool) -> dict[str, Any]:
            """Scores [users, I] of the "all" validation (av) or test (at) users: all, warm and cold targets."""
            users, tgt = (av, all_val) if val else (at, all_test)
            seen = x[users] if val else sp.csr_matrix(x[users] + all_val[users])
            out = {"all": metrics(s, tgt[users], seen)}
            warm_t, cold_t = (sp_.warm_val, sp_.cold_val) if val else (sp_.warm_test, sp_.cold_test)
            for part, t in (("warm", warm_t), ("cold", cold_t)):
                out[part] = metrics(s, t[users], seen)
            return out

        if tune:
            rows = []
            for l2 in cfg.l2_grid:
                for ab in cfg.ab_grid:
                    ev = all_eval(l2, ab, True)
                    rows.append({"l2": l2, "ab": ab, **ev["all"], "warm_" + SELECT: ev["warm"][SELECT]})
            tuning.append({"seed": seed, "model": "all-catalogue", "rows": rows})
            ease_row = max((r for r in rows if r["ab"] == 0), key=lambda r: r[SELECT])
            chosen["catalogue: ease"] = {"l2": ease_row["l2"]}
            best = max((r for r in rows if r["ab"] > 0), key=lambda r: r[SELECT])
            chosen["catalogue: marec"] = {"l2": best["l2"], "ab": best["ab"]}
            # the warm guard: the best union score among settings losing at most WARM_GUARD of EASE's warm validation
            floor = (1 - WARM_GUARD) * ease_row["warm_" + SELECT]
            guarded = max((r for r in rows if r["warm_" + SELECT] >= floor), key=lambda r: r[SELECT])
            chosen["catalogue: marec (warm guard)"] = {"l2": guarded["l2"], "ab": guarded["ab"]}
        catalogue = {m: all_eval(chosen[f"catalogue: {m}"]["l2"], chosen[f"catalogue: {m}"].get("ab", 0.0), False)
                     for m in CATALOGUE_MODELS}

        if cfg.vae_epochs:  # the Multi-VAE backbone, without and with MARec's alignment target
            s_cols = np.zeros((x.shape[1], len(ci)), dtype=np.float32)
            s_cols[wi] = s_w
            tcfg = TrainConfig(epochs=cfg.vae_epochs, seed=seed, device=cfg.device, progress=False)

            def vae(ab: float) -> Autoencoder:
                t = time.perf_counter()
                rec = Autoencoder("multivae", train=tcfg)
                rec.fit(x, alignment=AlignmentTarget(ci, s_cols, alpha=ab) if ab > 0 else None)
                print(f"  multivae αβ={ab:g}: {cfg.vae_epochs} epochs in {time.perf_counter() - t:.0f} s", flush=True)
                return rec

            def vae_cold(rec: Autoencoder, val: bool) -> dict[str, float]:
                users, items, tgt = (uv, sp_.cold_val_items, tv) if val else (ut, sp_.cold_test_items, tt)
                return metrics(autoencoder_scores(rec, x[users])[:, items], tgt)

            fitted = {0.0: vae(0.0)}
            if tune:  # one fit per αβ serves both choices: cold-only on cold-val, the catalogue on the "all" validation
                rows, cat_rows = [], []
                for ab in (0.0, *cfg.align_grid):
                    fitted[ab] = fitted.get(ab) or vae(ab)
                    ev = part_eval(autoencoder_scores(fitted[ab], x[av]), True)
                    cat_rows.append({"ab": ab, **ev["all"], "warm_" + SELECT: ev["warm"][SELECT]})
                    if ab > 0:
                        rows.append({"ab": ab, **vae_cold(fitted[ab], True)})
                        print(f"  tune marec-vae αβ={ab:g}: val {SELECT}={rows[-1][SELECT]:.4f} (cold), "
                              f"{cat_rows[-1][SELECT]:.4f} (catalogue)", flush=True)
                tuning += [{"seed": seed, "model": "marec-vae", "rows": rows},
                           {"seed": seed, "model": "catalogue: marec-vae", "rows": cat_rows}]
                chosen["marec-vae"] = {"ab": max(rows, key=lambda r: r[SELECT])["ab"]}
                chosen["catalogue: marec-vae"] = {"ab": max((r for r in cat_rows if r["ab"] > 0),
                                                            key=lambda r: r[SELECT])["ab"]}
                floor = (1 - WARM_GUARD) * cat_rows[0]["warm_" + SELECT]  # the backbone's warm validation
                chosen["catalogue: marec-vae (warm guard)"] = {"ab": max(
                    (r for r in cat_rows if r["warm_" + SELECT] >= floor), key=lambda r: r[SELECT])["ab"]}
            for key in ("marec-vae", "catalogue: marec-vae", "catalogue: marec-vae (warm guard)"):
                if chosen[key]["ab"] not in fitted:
                    fitted[chosen[key]["ab"]] = vae(chosen[key]["ab"])
            results[VAE_BACKBONE] = vae_cold(fitted[0.0], False)
            results["marec-vae"] = vae_cold(fitted[chosen["marec-vae"]["ab"]], False)
            for name, ab in (("multivae", 0.0), ("marec-vae", chosen["catalogue: marec-vae"]["ab"]),
                             ("marec-vae (warm guard)", chosen["catalogue: marec-vae (warm guard)"]["ab"])):
                catalogue[name] = part_eval(autoencoder_scores(fitted[ab], x[at]), False)
        return {"seed": seed, "cold": results, "catalogue": catalogue, "chosen": dict(chosen),
                "cold_items": {"val": len(sp_.cold_val_items), "test": len(sp_.cold_test_items)},
                "seconds": time.perf_counter() - t_start}

    def write(self, data: Interactions, blocks: dict[str, sp.csr_matrix], per_seed: list[dict[str, Any]],
              tuning: list[dict[str, Any]], wall: float) -> None:
        cfg = self.cfg
        res = {"dataset": cfg.dataset, "protocol": "cold-start",
               "data": {"users": data.n_users, "items": data.n_items, "nnz": int(data.matrix.nnz)},
               "blocks": {n: int(z.shape[1]) for n, z in blocks.items()},
               "config": json.loads(cfg.model_dump_json()), "machine": machine_name("cpu"),
               "seeds": [r["seed"] for r in per_seed], "chosen": [r["chosen"] for r in per_seed],
               "cold": summarize([r["cold"] for r in per_seed]),
               "catalogue": {m: {part: summarize_one([r["catalogue"][m][part] for r in per_seed])
                                 for part in ("all", "warm", "cold")} for m in per_seed[0]["catalogue"]},
               "gain": gain(per_seed), "per_seed": per_seed, "tuning": tuning, "wall_seconds": wall}
        if "marec-vae" in per_seed[0]["cold"]:
            res["gain_vae"] = gain(per_seed, "marec-vae")
        write_single_object(resolve(cfg.out / "results.json"), json.dumps(res, indent=1, default=_default).encode())
        write_single_object(resolve(cfg.out / "results.md"), render(res).encode())


def summarize_one(rows: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for m in (*METRICS, "users"):
        v = np.array([r[m] for r in rows], dtype=float)
        out[m] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
    return out


def summarize(rows: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    return {m: summarize_one([r[m] for r in rows]) for m in rows[0]}


BASELINES = ("random (= ease)", "popularity-among-cold", "meta-knn")


def gain(per_seed: list[dict[str, Any]], model: str = "marec") -> dict[str, Any]:
    """`model`'s relative gain (%) on each cold metric over the best baseline by that metric's mean (for MARec-VAE
    its backbone without alignment counts as a baseline too)."""
    out: dict[str, Any] = {}
    baselines = BASELINES + ((VAE_BACKBONE,) if model == "marec-vae" else ())
    for m in METRICS:
        means = {b: float(np.mean([r["cold"][b][m] for r in per_seed])) for b in baselines}
        best = max(means, key=lambda b: means[b])
        mar = float(np.mean([r["cold"][model][m] for r in per_seed]))
        out[m] = {"best_baseline": best, "baseline": means[best], "marec": mar,
                  "gain_pct": (mar / means[best] - 1) * 100 if means[best] > 0 else None}
    return out


def _fmt(d: dict[str, float | None]) -> str:
    return f"{d['mean']:.4f}" + (f" ± {d['std']:.4f}" if d.get("std") is not None else "")


def render(res: dict[str, Any]) -> str:
    lines = [f"# Cold-start protocol: {res['dataset']}", "",
             f"{res['data']['users']} users × {res['data']['items']} items, {res['data']['nnz']} clicks; seeds {res['seeds']}; "
             f"blocks {res['blocks']}; {res['machine']}; {res['wall_seconds']:.0f} s", "",
             "## Cold items only (hr@K = recall@K)", "", "| model | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for m, v in res["cold"].items():
        lines.append(f"| {m} | " + " | ".join(_fmt(v[k]) for k in METRICS) + " |")
    lines += ["", "Gain of MARec over the best baseline: " + ", ".join(
        f"{m} {g['gain_pct']:+.1f}% (vs {g['best_baseline']})" for m, g in res["gain"].items() if g["gain_pct"] is not None)]
    if "gain_vae" in res:
        lines += ["", "Gain of MARec-VAE over the best baseline: " + ", ".join(
            f"{m} {g['gain_pct']:+.1f}% (vs {g['best_baseline']})" for m, g in res["gain_vae"].items()
            if g["gain_pct"] is not None)]
    lines += ["", "## Whole catalogue (targets: warm-test ∪ cold-test)", "",
              "| model | part | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for m, parts in res["catalogue"].items():
        for part, v in parts.items():
            lines.append(f"| {m} | {part} | " + " | ".join(_fmt(v[k]) for k in METRICS) + " |")
    lines += ["", "Chosen on validation, per seed:", ""]
    lines += [f"- seed {seed}: `{json.dumps(c)}`" for seed, c in zip(res["seeds"], res["chosen"], strict=True)]
    lines.append("")
    return "\n".join(lines)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, pa.Scalar):
        return o.as_py()
    raise TypeError(type(o))
