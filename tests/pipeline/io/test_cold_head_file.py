"""The cold head's bundle files (pipeline.io.cold_head): `neighbours` survives a save, a head saved before the
option loads as the dense S it was fitted with, and a malformed value is a DataError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from model.cold_head import ColdHead, ColdHeadConfig, build_cold_head
from model.ease import EASEConfig
from model.recommenders import make_recommender
from pipeline.errors import DataError
from pipeline.io.cold_head import HEAD_JSON, HEAD_TENSORS, dump_cold_head, load_cold_head

N = 30


def head(neighbours: int) -> tuple[ColdHead, np.ndarray]:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((80, N)) < 0.25).astype(np.float32))
    rec = make_recommender("ease", ease=EASEConfig(l2=5.0)).fit(x)
    values = ["drama", "comedy", "action", "horror", "era1", "era2", "era3", "film"]
    tags = [sorted(set(rng.choice(values, size=int(rng.integers(1, 5))).tolist())) for _ in range(N)]
    cfg = ColdHeadConfig(delta=1.0, ab=3.0, mu=(1.0,), neighbours=neighbours)
    return build_cold_head(rec, x, {"tags": tags}, cfg), rec.weights  # type: ignore[attr-defined]


def load(files: dict[str, bytes]) -> ColdHead:
    return load_cold_head(Path("bundle"), N, lambda name: files[name])  # checksums are the bundle's job (test_bundle)


def test_neighbours_round_trip_and_change_the_columns() -> None:
    h, w = head(4)
    again = load(dump_cold_head(h))
    assert again.neighbours == 4
    new = h.encode({"tags": [["drama", "era1", "film"]]}, 1)
    np.testing.assert_array_equal(h.cold_columns(new, w), again.cold_columns(new, w))
    dense, _ = head(0)
    assert np.count_nonzero(again.similarity(new)) < np.count_nonzero(dense.similarity(new))


def test_a_head_saved_before_the_option_loads_dense() -> None:
    h, w = head(0)
    files = dump_cold_head(h)
    meta = json.loads(files[HEAD_JSON])
    del meta["neighbours"]
    old = load({HEAD_JSON: json.dumps(meta).encode(), HEAD_TENSORS: files[HEAD_TENSORS]})
    assert old.neighbours == 0
    new = h.encode({"tags": [["comedy"]]}, 1)
    np.testing.assert_array_equal(old.cold_columns(new, w), h.cold_columns(new, w))


@pytest.mark.parametrize("bad", [-1, "5", True, 2.5])
def test_a_malformed_neighbour_count_is_refused(bad: object) -> None:
    h, _ = head(3)
    files = dump_cold_head(h)
    meta = json.loads(files[HEAD_JSON]) | {"neighbours": bad}
    with pytest.raises(DataError, match=r"cold head in bundle is malformed.*neighbours"):
        load({HEAD_JSON: json.dumps(meta).encode(), HEAD_TENSORS: files[HEAD_TENSORS]})
