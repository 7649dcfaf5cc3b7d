"""Free text → sentence embeddings from a model that ships inside its PyPI wheel (issue 29; nothing is downloaded).

WordLlama (github.com/dleemiller/WordLlama, MIT): token embeddings distilled from an LLM's embedding table and
trained for sentence similarity, pooled per text; 256 dimensions, a 16 MB weights file and its tokenizer inside the
package. Loaded with downloads disabled and the package folder as its cache (0.4.0 looks for the packaged tokenizer
under `tokenizer/`, the wheel puts it under `tokenizers/`: pointing the cache there finds it).

A text becomes its embedding centred on the mean over the items that have text, then L2-normalised; an item without
text keeps an empty row, so it is similar to nothing. Not min-max scaled like the other blocks (MAREC.md §2): that
moves every embedding into one orthant, where all cosines are alike. On ml-1m's plots (seed 0's split, MARec's δ in
{10, 50}, λ1 500) the text block added +0.0% hr@10 min-max scaled and +3.1% centred (TF-IDF: +6.4%).
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


def is_embedding(block: str) -> bool:
    """Whether a block name ("plot:wordllama") is a sentence-embedding block (dense, signed, not min-max scaled)."""
    return block.partition(":")[2] == "wordllama"


def sentence_embeddings(texts: Sequence[str | None]) -> sp.csr_matrix:
    """[len(texts), 256] float32: centred, L2-normalised embeddings of the non-empty texts; empty rows for the rest."""
    rows = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    if not rows:
        return sp.csr_matrix((len(texts), 0), dtype=np.float32)
    e = np.asarray(_wordllama().embed([str(texts[i]) for i in rows]), dtype=np.float64)
    e -= e.mean(axis=0)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    out = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
    out[rows] = e
    return sp.csr_matrix(out)
