"""Precision by capability (faked machines), the CPU bf16 path (bf16 candidates, fp32 re-score), auto's overlap
guard and fallback, the manifest's reason, and, on a real matrix (ml-100k), the overlap and NDCG tolerances."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from model.sparse import as_batch
from pipeline.errors import DataError
from pipeline.io import hardware
from pipeline.io.bundle import ModelBundle
from pipeline.io.hardware import Bf16Capability, MatmulRates, parse_cpuinfo
from pipeline.serving import precision
from pipeline.serving.job import InferJob
from pipeline.serving.precision import (
    MAX_NDCG_DELTA,
    MIN_OVERLAP,
    choose_precision,
    compare_precisions,
    guard_bf16,
    recommend_bf16,
    topk_overlap,
)
from tests.pipeline.infer_support import events_table, run_infer, tiny_bundle, write_events_local

DAY = dt.date(2024, 5, 3)
NATIVE = Bf16Capability(True, "CPU reports amx_bf16; bf16 matmul 500 vs fp32 100 GFLOP/s (5.0x)",
                        parse_cpuinfo("flags: amx_bf16"), MatmulRates(100.0, 500.0, (512, 600, 4096)))
NOT_NATIVE = Bf16Capability(False, "CPU reports no bf16 instructions (amx_bf16 or avx512_bf16 absent)",
                            parse_cpuinfo("flags: avx2"), None)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle(n_items=40)


def histories(n_users: int, n_items: int, seed: int = 3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < 0.15).astype(np.float32))


def test_auto_picks_by_capability_and_device(bundle: ModelBundle) -> None:
    native = choose_precision("auto", "cpu", bundle, lambda: NATIVE)
    assert (native.chosen, native.guard) == ("bf16", True) and "amx_bf16" in native.reason
    plain = choose_precision("auto", "cpu", bundle, lambda: NOT_NATIVE)
    assert (plain.chosen, plain.guard) == ("fp32", False) and "no bf16 instructions" in plain.reason
    assert choose_precision("auto", "cuda", bundle, lambda: NATIVE).chosen == "tf32"  # CUDA as before
    assert choose_precision("bf16", "cuda", bundle, lambda: NOT_NATIVE).chosen == "bf16"
    assert choose_precision("tf32", "cpu", bundle, lambda: NATIVE).chosen == "fp32"
    assert choose_precision("fp32", "cpu", bundle, lambda: NATIVE).chosen == "fp32"


def test_models_without_a_decoder_layer_stay_fp32() -> None:
    from model.recommenders import make_recommender

    x = histories(30, 12)
    pop = make_recommender("popularity").fit(x)
    b = ModelBundle(pop, np.arange(12, dtype=np.int64), np.ones(12, np.float32), "popularity")
    choice = choose_precision("auto", "cpu", b, lambda: NATIVE)
    assert choice.chosen == "fp32" and "no decoder output layer" in choice.reason


def test_explicit_bf16_without_native_support_warns_but_is_used(bundle: ModelBundle,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="pipeline.serving.precision"):
        choice = choose_precision("bf16", "cpu", bundle, lambda: NOT_NATIVE)
    assert "emulated here and much slower" in caplog.text
    assert choice.chosen == "bf16" and not choice.guard  # asked for: no guard, but never chosen by auto
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.serving.precision"):
        choose_precision("bf16", "cpu", bundle, lambda: NATIVE)
    assert not caplog.text  # native: no warning


def test_unknown_precision_names_the_choices(bundle: ModelBundle) -> None:
    with pytest.raises(DataError, match="pass one of auto, fp32, tf32, bf16"):
        choose_precision("fp16", "cpu", bundle, lambda: NATIVE)
    from pydantic import ValidationError

    from pipeline.cli.main import error_lines

    with pytest.raises(ValidationError) as e:
        InferJob(date=DAY, events="e", out="o", precision="fp16")  # type: ignore[arg-type]
    (line,) = error_lines(e.value, ["--precision"])
    assert "unknown precision 'fp16'" in line and "auto" in line and "fp32, tf32 or bf16" in line


def test_bf16_path_gives_fp32_scores_of_the_fp32_lists(bundle: ModelBundle) -> None:
    x = histories(70, bundle.n_items)
    ref_items, _ = bundle.recommend(x, 10, batch_size=32)
    items, scores = recommend_bf16(bundle.recommender, x, 10, batch_size=32, margin=10)
    assert items.shape == (70, 10) and scores.dtype == np.float32
    assert topk_overlap(ref_items, items) >= MIN_OVERLAP
    # the scores are fp32 recomputations: equal to the fp32 path's scores of the same columns
    full = bundle.recommender.score(as_batch(torch.from_numpy(x.toarray()))).numpy()
    np.testing.assert_allclose(scores, np.take_along_axis(full, items, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()  # ordered by the fp32 scores
    assert not x[np.arange(70)[:, None], items].toarray().any()  # seen items are never recommended


def test_bf16_path_when_fewer_unseen_items_than_candidates() -> None:
    b = tiny_bundle(n_items=12)
    dense = histories(20, 12, seed=5).toarray()
    dense[0, :10] = 1.0  # 2 unseen items for user 0, k = 8: the rest are seen, marked -inf as in the fp32 path
    x = sp.csr_matrix(dense)
    items, scores = recommend_bf16(b.recommender, x, 8, batch_size=8, margin=20)
    ref_items, ref_scores = b.recommend(x, 8, batch_size=8)
    assert np.isneginf(scores[0]).sum() == np.isneginf(ref_scores[0]).sum() == 6
    assert set(items[0][np.isfinite(scores[0])]) == set(ref_items[0][np.isfinite(ref_scores[0])])


def test_topk_overlap() -> None:
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert topk_overlap(a, a[:, ::-1]) == 1.0  # order inside the top-k aside
    assert topk_overlap(a, np.array([[1, 2, 9, 10], [5, 6, 7, 8]])) == 0.75


def degenerate_bundle() -> ModelBundle:
    """A model whose logits differ only below bf16's resolution: the bf16 candidates are arbitrary."""
    b = tiny_bundle(n_items=200, seed=2)
    last = b.recommender.module.decoder[-1]  # type: ignore[attr-defined]
    with torch.no_grad():
        last.weight.mul_(1e-4)
        last.bias.fill_(64.0)  # bf16 spacing at 64 is 0.5: every logit rounds to the same value
    return b


def test_guard_keeps_bf16_when_lists_agree_and_falls_back_when_not(bundle: ModelBundle) -> None:
    ok = guard_bf16(choose_precision("auto", "cpu", bundle, lambda: NATIVE), bundle, histories(80, 40), 10, 64)
    assert ok.chosen == "bf16" and not ok.guard and "overlap with fp32 1.0000 on 80 users" in ok.reason
    bad_b = degenerate_bundle()
    bad = guard_bf16(choose_precision("auto", "cpu", bad_b, lambda: NATIVE), bad_b, histories(80, 200), 10, 64)
    assert bad.chosen == "fp32" and "fell back to fp32" in bad.reason
    explicit = precision.PrecisionChoice("bf16", "requested (bf16)")  # asked for: the guard does not run
    assert guard_bf16(explicit, bad_b, histories(80, 200), 10, 64) is explicit


@pytest.mark.parametrize(("degenerate", "want"), [(False, "bf16"), (True, "fp32")])
def test_auto_on_a_native_cpu_records_precision_and_reason_in_the_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: ModelBundle, degenerate: bool, want: str) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: NATIVE)  # a CPU with AMX, as far as the engine can tell
    b = degenerate_bundle() if degenerate else bundle
    items = b.n_items
    table = events_table(n_users=60)
    table = table.set_column(1, "item_id", pa.array([1000 + (i - 1000) % items for i in table["item_id"].to_pylist()],
                                                     pa.int64()))
    uri = write_events_local(table, tmp_path / "events")
    job = InferJob(date=DAY, events=uri, out=str(tmp_path / "out"), device="cpu", progress=False, shard_events=100,
                   top_n=10, precision="auto")
    m = run_infer(job, b, "7")
    assert m["precision"] == want and "amx_bf16" in m["precision_reason"]
    assert ("fell back to fp32" in m["precision_reason"]) is degenerate
    assert "precision_guard" in m["phase_seconds"]


def test_auto_without_native_bf16_stays_fp32_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          bundle: ModelBundle) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: NOT_NATIVE)
    uri = write_events_local(events_table(n_users=30), tmp_path / "events")
    job = InferJob(date=DAY, events=uri, out=str(tmp_path / "out"), device="cpu", progress=False, top_n=10)
    m = run_infer(job, bundle, "7")
    assert m["precision"] == "fp32" and "no bf16 instructions" in m["precision_reason"]
    assert "precision_guard" not in m["phase_seconds"]


@pytest.mark.data
@pytest.mark.slow
def test_bf16_lists_match_fp32_on_a_real_matrix(shared_data: Path) -> None:
    """ml-100k, Multi-VAE trained briefly: bf16 candidates + fp32 re-score keep top-100 overlap ≥ 0.99 and
    NDCG@100 within 0.001 of fp32 on the held-out users (bf16 runs on any CPU, emulated where not native)."""
    from model.recommenders import make_recommender
    from model.split import strong_generalization_split
    from model.train import TrainConfig
    from pipeline.data.dataset import BinarizeRule, load_dataset

    data = load_dataset("ml-100k", shared_data, BinarizeRule(min_rating=4.0))
    split = strong_generalization_split(data.matrix, seed=0)
    rec = make_recommender("multivae", train=TrainConfig(epochs=5, batch_size=100, device="cpu", progress=False)).fit(
        split.train)
    keep = split.test.users_with_targets()
    r = compare_precisions(rec, split.test.fold_in[keep], split.test.targets[keep], k=100, margin=20)
    assert r["users"] >= 50
    assert r["overlap"] >= MIN_OVERLAP, r
    assert abs(r["ndcg_delta"]) <= MAX_NDCG_DELTA, r
    assert r["ndcg_fp32"] > 0.05  # a trained model: the comparison is not between two random rankings
