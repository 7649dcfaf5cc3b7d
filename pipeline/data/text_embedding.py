"""Free text → sentence embeddings from a model that ships inside its PyPI wheel (issue 29; nothing is downloaded).

WordLlama (github.com/dleemiller/WordLlama, MIT): token embeddings distilled from an LLM's embedding table and
trained for sentence similarity, pooled per text; 256 dimensions, a 16 MB weights file and its tokenizer inside the
package. Loaded with downloads disabled and the package folder as its cache (0.4.0 looks for the packaged tokenizer
under `tokenizer/`, the wheel puts it under `tokenizers/`: pointing the cache there finds it).

A text becomes its embedding min-max scaled per dimension over the items that have text (MAREC.md §2: blocks are
min-max scaled before the cosine); an item without text keeps an empty row, so it is similar to nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ENCODERS = ("tfidf", "wordllama")


@functools.cache
def _wordllama() -> Any:
    import wordllama
    from wordllama import WordLlama

    return WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def sentence_embeddings(texts: Sequence[str | None]) -> sp.csr_matrix:
    """[len(texts), 256] float32: min-max scaled embeddings of the non-empty texts; empty rows for the rest."""
    rows = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    if not rows:
        return sp.csr_matrix((len(texts), 0), dtype=np.float32)
    e = np.asarray(_wordllama().embed([str(texts[i]) for i in rows]), dtype=np.float64)
    lo, hi = e.min(axis=0), e.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    scaled = (e - lo) / span * (hi - lo > 0)
    out = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
    out[rows] = scaled
    return sp.csr_matrix(out)
