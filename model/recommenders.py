"""The concrete recommenders behind the Recommender interface, and a registry by name."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import scipy.sparse as sp
import torch
from pydantic import BaseModel
from torch import nn

from model.base import Recommender
from model.ease import EASEConfig, EDLAEConfig, ease_weights
from model.layers import buffer_fits
from model.marec import AlignmentTarget
from model.pia import PIAConfig
from model.popularity import item_popularity
from model.recvae import RecVAE, RecVAEConfig
from model.sparse import SparseBatch
from model.split import HeldOut
from model.train import TrainConfig, Trainer, resolve_device
from model.vae import MultiVAE, VAEConfig, dae_config


class Popularity(Recommender):
    name = "popularity"
    scores_into_buffer = True

    def __init__(self) -> None:
        self.counts = torch.zeros(0)

    def _fit(self, train: sp.csr_matrix, valid: HeldOut | None, **kwargs: Any) -> None:
        self.counts = item_popularity(train)

    def score(self, history: SparseBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.counts.to(history.vals.device).expand(history.n_rows, -1)  # [B, I], a view
        if out is not None and buffer_fits(out, tuple(rows.shape), rows.dtype, rows.device):
            return out.copy_(rows)
        return rows.clone()

    def to(self, device: torch.device | str) -> Popularity:
        self.counts = self.counts.to(resolve_device(str(device)))
        return self


class EASE(Recommender):
    name = "ease"

    def __init__(self, config: EASEConfig | None = None, device: str = "auto"):
        self.config = config or EASEConfig()
        self._device = str(resolve_device(device))
        self.weights = torch.zeros(0, 0)

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    def _fit(self, train: sp.csr_matrix, valid: HeldOut | None, **kwargs: Any) -> None:
        self.weights = ease_weights(train, self.config, self.device)

    def to(self, device: torch.device | str) -> EASE:
        self._device = str(resolve_device(str(device)))
        self.weights = self.weights.to(self._device)
        return self

    def score(self, history: SparseBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weights
        # x_u @ B as a weighted sum of B's rows for the user's items (embedding_bag has no `out`: unused here)
        return nn.functional.embedding_bag(history.cols, w, history.offsets, mode="sum",
                                           per_sample_weights=history.vals.to(w.dtype)).float()


class EDLAE(EASE):
    """EASE's scoring with EDLAE's weights (model.ease: the dropout-emphasis penalty, full rank by default)."""

    name = "edlae"

    def __init__(self, config: EDLAEConfig | None = None, device: str = "auto"):
        super().__init__(config or EDLAEConfig(), device)
        self.config: EDLAEConfig


class Autoencoder(Recommender):
    """Multi-VAE, Multi-DAE or RecVAE, each with optional PIA (training only)."""

    scores_into_buffer = True

    def __init__(self, arch: str, model_config: BaseModel | None = None, train: TrainConfig | None = None,
                 pia: PIAConfig | None = None, name: str | None = None):
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}: one of {sorted(ARCHS)}")
        self.arch = arch
        self.model_config = model_config or ARCHS[arch][1]()
        self.train_config = train or TrainConfig()
        self.pia = pia or PIAConfig()
        self.name = name or (arch + ("-pia" if self.pia.enabled else ""))  # type: ignore[misc]
        self.module: nn.Module | None = None
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.anchors: torch.Tensor | None = None
        self.alignment: AlignmentTarget | None = None  # MARec's target for the next fit (then dropped)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device if self.module is not None else torch.device("cpu")

    def build(self, n_items: int) -> nn.Module:
        torch.manual_seed(self.train_config.seed)  # weight init is part of the seed
        return ARCHS[self.arch][0](n_items, self.model_config)

    def _fit(self, train: sp.csr_matrix, valid: HeldOut | None, **kwargs: Any) -> None:
        module = self.build(train.shape[1])
        # MARec's target (model.marec.AlignmentTarget): Multi-VAE/DAE only; the fit's own, else the one set on self
        alignment = kwargs.get("alignment") or getattr(self, "alignment", None)
        self.alignment = None  # training only: never pickled with the fitted model
        if alignment is not None:
            if not hasattr(module, "alignment"):
                raise ValueError(f"MARec alignment needs a Multi-VAE/DAE backbone, not {self.arch}")
            if alignment.n_items != train.shape[1]:
                raise ValueError(f"the alignment target covers {alignment.n_items} items, the training matrix has "
                                 f"{train.shape[1]}")
            if self.train_config.cuda_graph:
                raise ValueError("MARec alignment is not in the CUDA-graph step: train with cuda_graph=False")
            module.alignment = alignment.to(resolve_device(self.train_config.device))
        trainer = Trainer(module, train, self.train_config, self.pia, valid, on_epoch=kwargs.get("on_epoch"))
        if kwargs.get("resume") is not None:
            trainer.load_state_dict(kwargs["resume"])
            self.resumed_seconds = trainer.earlier_seconds
        self.history = trainer.fit(checkpoint=kwargs.get("checkpoint"))
        self.best_epoch = trainer.best_epoch
        self.module = trainer.model
        if alignment is not None:
            cast(MultiVAE, self.module).alignment = None  # training-only: never pickled or used in scoring
        # PIA's item anchors [I, d] (training-only: never saved or scored with), kept for the training-time
        # diagnostics' anchor-centroid distance; None without PIA
        self.anchors = None if trainer.anchors is None else trainer.anchors.weight.detach().cpu()

    def to(self, device: torch.device | str) -> Autoencoder:
        if self.module is not None:
            self.module.to(resolve_device(str(device)))
        return self

    def score(self, history: SparseBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError("the model is not fitted")
        return self.module.score(history, out=out)  # type: ignore[operator]

    def inference_state(self) -> dict[str, torch.Tensor]:
        """The weights inference needs: no anchors (they never enter the module), no RecVAE old encoder."""
        if self.module is None:
            raise RuntimeError("the model is not fitted")
        sd = getattr(self.module, "inference_state_dict", self.module.state_dict)()
        return {k: v.detach().cpu() for k, v in sd.items()}

    def __getstate__(self) -> dict[str, Any]:  # pickles on any machine: weights go to the CPU
        state = self.__dict__.copy()
        if self.module is not None:
            state["module"] = self.module if self.device.type == "cpu" else copy.deepcopy(self.module).to("cpu")
        return state


ARCHS: dict[str, tuple[Callable[[int, Any], nn.Module], Callable[[], BaseModel]]] = {
    "multivae": (MultiVAE, VAEConfig),
    "multidae": (MultiVAE, dae_config),
    "recvae": (RecVAE, RecVAEConfig),
}

MODEL_NAMES = ("popularity", "ease", "edlae", "multidae", "multivae", "multivae-pia", "recvae", "recvae-pia")
CLOSED_FORM = ("popularity", "ease", "edlae")  # fit in one solve: no epochs, no early stopping
RECVAE_EPOCHS = 50  # RecVAE's reference budget (Shenbin et al. 2020)


def epoch_budget(name: str, epochs: int, recvae_epochs: int | None = None) -> int | None:
    """Max epochs of model `name` under an experiment's budget; None for the closed-form models."""
    if name in CLOSED_FORM:
        return None
    if name.startswith("recvae"):
        return recvae_epochs or min(epochs, RECVAE_EPOCHS)
    return epochs


def make_recommender(name: str, *, train: TrainConfig | None = None, pia: PIAConfig | None = None,
                     ease: EASEConfig | None = None, model_config: BaseModel | None = None) -> Recommender:
    """A fresh recommender by name; `-pia` names need a PIAConfig with weight > 0. `ease` configures EASE, and
    EDLAE too: an EDLAEConfig as is, a plain EASEConfig as EDLAE's defaults with its l2 and dtype."""
    if name == "popularity":
        return Popularity()
    if name == "ease":
        if isinstance(ease, EDLAEConfig):
            raise ValueError("an EDLAEConfig configures 'edlae', not 'ease' (EASE would ignore its dropout)")
        return EASE(ease, device=(train or TrainConfig()).device)
    if name == "edlae":
        edlae = ease if isinstance(ease, EDLAEConfig) or ease is None else EDLAEConfig(l2=ease.l2, dtype=ease.dtype)
        return EDLAE(edlae, device=(train or TrainConfig()).device)
    arch = name.removesuffix("-pia")
    if arch not in ARCHS:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES)}")
    if name.endswith("-pia"):
        if pia is None or not pia.enabled:
            pia = PIAConfig(weight=1.0)
    else:
        pia = PIAConfig()
    if arch == "recvae" and train is None:
        train = TrainConfig(lr=5e-4, epochs=RECVAE_EPOCHS)
    return Autoencoder(arch, model_config, train, pia, name=name)
