"""Most-popular baseline: every user gets items ranked by training interaction count."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def item_popularity(x: sp.csr_matrix) -> torch.Tensor:
    """Interaction count per item [I], float32."""
    counts = np.asarray((sp.csr_matrix(x) > 0).sum(axis=0)).ravel().astype(np.float32)
    return torch.from_numpy(counts)
