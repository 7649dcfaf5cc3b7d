"""Which weights score: a registered model (models:/NAME@ALIAS or models:/NAME/VERSION, through the MLflow
registry at an explicit tracking URI) or a bundle folder written by ModelBundle.save (development, tests),
loaded once onto the chosen device, with the concrete version every output row will name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle


def resolve_device(name: str) -> str:
    """'auto' | 'cpu' | 'cuda' → the torch device string scoring runs on (auto: CUDA when present)."""
    from model.train import resolve_device as resolve

    return str(resolve(name))


def load_model(model_uri: str, device: str | None, tracking_uri: str | None = None,
               max_bytes: int | None = None) -> tuple[ModelBundle, str]:
    """models:/NAME@ALIAS → (bundle, concrete version): the alias is resolved once, against `tracking_uri`
    (None: MLFLOW_TRACKING_URI, else the local SQLite registry; pipeline.io.registry.tracking_uri).

    A local folder written by ModelBundle.save also works (development, tests): its version is
    "local-" + the weights' checksum, so outputs still name exactly which weights made them.
    `max_bytes`: weights over it are refused before they are read (ModelBundle.load)."""
    if not model_uri.startswith("models:/"):
        from pipeline.io.bundle import ModelBundle

        path = Path(model_uri)
        if not (path / "bundle.json").is_file():
            raise DataError(f"--model {model_uri!r} is neither models:/NAME@ALIAS nor a saved bundle folder",
                            "pass models:/NAME@champion (or a folder with bundle.json)")
        bundle = ModelBundle.load(path, device, max_bytes)  # first: it refuses over-budget weights unread
        digest = hashlib.sha256((path / "recommender.pt").read_bytes()).hexdigest()[:12]
        return bundle, f"local-{digest}"
    from pipeline.io.registry import load_bundle  # lazy: MLflow is heavy and only needed here

    return load_bundle(model_uri, device=device, tracking=tracking_uri, max_bytes=max_bytes)
