"""Small shared fixtures for the model tests: tiny seeded matrices and tiny model configs.

Everything here is deliberately small (a CPU-heavy job may share this machine): 160 users × 40 items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.recvae import RecVAEConfig
from model.split import Split, strong_generalization_split
from model.train import TrainConfig
from model.vae import VAEConfig

N_USERS = 160
N_ITEMS = 40


def clustered_matrix(
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    seed: int = 0,
    n_clusters: int = 4,
    min_items: int = 5,
    max_items: int = 14,
) -> sp.csr_matrix:
    """Binary float32 users × items with taste clusters (so the autoencoders have something to learn).

    Each user draws distinct items, 80% of the draws from their cluster's items, the rest uniformly.
    """
    rng = np.random.default_rng(seed)
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters)
    rows, cols = [], []
    for u in range(n_users):
        c = rng.integers(n_clusters)
        p = np.where(item_cluster == c, 0.8 / np.sum(item_cluster == c), 0.2 / np.sum(item_cluster != c))
        k = int(rng.integers(min_items, max_items + 1))
        items = rng.choice(n_items, size=k, replace=False, p=p / p.sum())
        rows.extend([u] * k)
        cols.extend(items.tolist())
    data = np.ones(len(rows), dtype=np.float32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(n_users, n_items), dtype=np.float32)
    m.sum_duplicates()
    return m


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def matrix() -> sp.csr_matrix:
    return clustered_matrix()


@pytest.fixture(scope="session")
def split(matrix: sp.csr_matrix) -> Split:
    return strong_generalization_split(matrix, seed=0, n_valid=30, n_test=30)


@pytest.fixture(scope="session")
def make_matrix() -> Callable[..., sp.csr_matrix]:
    return clustered_matrix


TINY_VAE = VAEConfig(hidden_dims=(32,), latent_dim=8)
TINY_RECVAE = RecVAEConfig(hidden_dim=32, latent_dim=8)


@pytest.fixture(scope="session")
def tiny_vae() -> VAEConfig:
    return TINY_VAE


@pytest.fixture(scope="session")
def tiny_recvae() -> RecVAEConfig:
    return TINY_RECVAE


@pytest.fixture(scope="session")
def train_config() -> Callable[..., TrainConfig]:
    """TrainConfig factory: CPU, no progress bar, small batches, few epochs; overrides as keywords."""

    def make(**overrides: Any) -> TrainConfig:
        base: dict[str, Any] = {"epochs": 2, "batch_size": 40, "device": "cpu", "progress": False, "seed": 0}
        return TrainConfig(**{**base, **overrides})

    return make
