"""Free text → sentence embeddings from a model that ships inside its PyPI wheel (issue 29; nothing is downloaded).

WordLlama (github.com/dleemiller/WordLlama, MIT): token embeddings distilled from an LLM's embedding table and
trained for sentence similarity, pooled per text; 256 dimensions, a 16 MB weights file and its tokenizer inside the
package. Loaded with downloads disabled and the package folder as its cache (0.4.0 looks for the packaged tokenizer
under `tokenizer/`, the wheel puts it under `tokenizers/`: pointing the cache there finds it).

A block named "<column>:<encoder>" (e.g. "plot:wordllama") embeds a free-text column; a bare column is TF-IDF.
Used by the research features (pipeline.data.text_embedding) and the serving cold head (model.cold_head).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENCODERS = ("tfidf", "wordllama")  # tfidf: a bare text column; the others embed it
EMBEDDINGS = ("wordllama",)


@functools.cache
def _wordllama() -> Any:
    import wordllama
    from wordllama import WordLlama

    return WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def split_block(block: str) -> tuple[str, str]:
    """"plot:wordllama" → ("plot", "wordllama"); a bare column → (column, "")."""
    column, _, encoder = block.partition(":")
    return column, encoder


def is_embedding(block: str) -> bool:
    """Whether a block name ("plot:wordllama") is a sentence-embedding block (dense, signed, not min-max scaled)."""
    return split_block(block)[1] in EMBEDDINGS


def encoder_problem(block: str, text_columns: Sequence[str], allowed: Sequence[str] = ENCODERS) -> str | None:
    """Why "<column>:<encoder>" is not a block (the encoder unknown, or the column not free text), else None."""
    column, encoder = split_block(block)
    if ":" in block and (encoder not in allowed or column not in text_columns):
        return (f"block {block!r}: an encoder applies to a free-text column ({', '.join(text_columns)}) and is one of "
                f"{', '.join(allowed)} (e.g. 'plot:wordllama'; {column!r} alone is TF-IDF)")
    return None


def centred_unit_rows(e: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Embeddings minus `mean` (the fitted items' mean embedding), each row L2-normalised, in place."""
    e -= mean
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e


def embed(texts: Sequence[str], encoder: str = "wordllama") -> np.ndarray:
    """[len(texts), d] float64 raw sentence embeddings of non-empty texts (not centred, not normalised)."""
    if encoder not in EMBEDDINGS:
        raise ValueError(f"unknown text encoder {encoder!r}: choose from {', '.join(EMBEDDINGS)}")
    if not texts:
        return np.zeros((0, 0))
    return np.asarray(_wordllama().embed([str(t) for t in texts]), dtype=np.float64)
