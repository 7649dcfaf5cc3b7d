"""The model as it travels: a fitted recommender + its item vocabulary + config + the fallback ranking.

A `ModelBundle` is saved as one folder and logged to MLflow as one pyfunc model (pipeline.io.pyfunc.BundleModel),
so that inference can never pair weights with the wrong item index. The registered pyfunc's artifact "bundle"
is that folder. This module does not import MLflow (inference workers load bundles without it).

    bundle/recommender.pt   the weights only: a state dict of tensors (torch.save), loaded with weights_only=True
    bundle/items.parquet    column → external item id, and the training popularity of each column
    bundle/bundle.json      format version, name, config (credentials stripped from URIs), snapshot id, the
                            recommender's description (model name from model.recommenders.MODEL_NAMES, its
                            architecture config) and the sha256 + size of the two files above (and of the
                            optional cold head's, pipeline.io.cold_head: new items scored from their metadata)

Loading never unpickles arbitrary objects: a bundle is a description that is validated, weights that are only
tensors (torch's weights-only unpickler), and a recommender rebuilt from both through model.recommenders (a
fixed list of classes). The files are checked against the checksums bundle.json records before they are
parsed. Format 1 (the pickled recommender object) is refused: loading it would run whatever code the pickle names.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from pydantic import ValidationError

from model.base import Recommender
from model.cold_head import ColdHead
from pipeline.errors import DataError
from pipeline.io.cold_head import FILES as COLD_HEAD_FILES
from pipeline.io.cold_head import dump_cold_head, load_cold_head
from pipeline.io.redact import redact_values

FORMAT_VERSION = 2
WEIGHTS, ITEMS, META = "recommender.pt", "items.parquet", "bundle.json"
RETRAIN = "retrain the model (`recsys train`) and load the newly registered version, or re-save the bundle with this code"


@dataclass
class ModelBundle:
    recommender: Recommender  # fitted
    item_ids: np.ndarray  # [I] external id of each column (int64 or str)
    popularity: np.ndarray  # [I] float32 training interactions per column: the cold-start fallback
    name: str = "multivae-pia"
    config: dict[str, Any] = field(default_factory=dict)
    snapshot_id: str = ""
    cold_head: ColdHead | None = None  # optional (model.cold_head): scores items that appeared after training

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.popularity) or len(self.item_ids) != getattr(self.recommender, "n_items", -1):
            raise ValueError("item_ids, popularity and the recommender must cover the same item columns")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self) -> dict[Any, int]:
        """External item id → column (unknown ids are absent)."""
        return {k: i for i, k in enumerate(self.item_ids.tolist())}

    def fallback(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k columns by training popularity, with their normalized popularity as the score."""
        k = min(k, self.n_items)
        order = np.lexsort((np.arange(self.n_items), -self.popularity))[:k]  # ties: lower column first
        total = float(self.popularity.sum()) or 1.0
        return order.astype(np.int64), (self.popularity[order] / total).astype(np.float32)

    def recommend(self, history: sp.csr_matrix, k: int, batch_size: int = 2000,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k columns and scores for rows of `history` (over this bundle's columns), seen items removed."""
        return self.recommender.recommend(history, k, batch_size=batch_size, on_batch=on_batch)

    def save(self, directory: str | Path) -> Path:
        """Write the bundle folder (see module doc); returns it. Only the recommenders of
        model.recommenders can be saved (a ValueError for anything else)."""
        spec, state = _describe(self.recommender)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        weights = buf.getvalue()
        ids = pa.array(self.item_ids.astype(np.int64)) if np.issubdtype(self.item_ids.dtype, np.integer) \
            else pa.array(self.item_ids.astype(str))
        buf = io.BytesIO()
        pq.write_table(pa.table({"item_id": ids, "popularity": pa.array(self.popularity.astype(np.float32))}), buf)
        items = buf.getvalue()
        (d / WEIGHTS).write_bytes(weights)
        (d / ITEMS).write_bytes(items)
        files = {WEIGHTS: _file_entry(weights), ITEMS: _file_entry(items)}
        if self.cold_head is not None:
            for name, data in dump_cold_head(self.cold_head).items():
                (d / name).write_bytes(data)
                files[name] = _file_entry(data)
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "config": redact_values(self.config),
                "snapshot_id": self.snapshot_id, "n_items": self.n_items, "recommender": spec, "files": files}
        (d / META).write_text(json.dumps(meta, indent=2, default=str))  # written last: it vouches for the others
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None, max_bytes: int | None = None) -> ModelBundle:
        """A bundle folder written by `save`, validated (see module doc); a DataError naming the file otherwise.
        `max_bytes`: refuse, before reading them, weights larger than this (a dense EASE is I x I floats)."""
        d = Path(directory)
        meta = _read_meta(d)
        n_items = meta["n_items"]
        check_weights_size(meta, max_bytes)
        weights = _read_checked(d, WEIGHTS, meta)
        items = _read_checked(d, ITEMS, meta)
        state = _load_state(d / WEIGHTS, weights)
        item_ids, popularity = _load_items(d / ITEMS, items, n_items)
        rec = _rebuild(meta["recommender"], state, n_items, d / WEIGHTS)
        if device is not None:
            rec.to(device)
        head = None
        if all(name in meta["files"] for name in COLD_HEAD_FILES):  # optional: older bundles have none
            head = load_cold_head(d, n_items, lambda name: _read_checked(d, name, meta))
        return cls(rec, item_ids, popularity, meta["name"], meta["config"], meta["snapshot_id"], head)


def check_weights_size(meta: dict[str, Any], max_bytes: int | None) -> None:
    """The weights' size (from bundle.json, before any is read) against the serving memory budget."""
    size = int((meta.get("files", {}).get(WEIGHTS) or {}).get("bytes") or 0)
    if max_bytes is not None and size > max_bytes:
        raise DataError(f"the model's weights ({meta.get('name')}, {meta.get('n_items')} items) take "
                        f"{size / 2**20:,.0f} MiB, over the serving memory budget of {max_bytes / 2**20:,.0f} MiB; "
                        "nothing was scored or published",
                        "raise --max-model-mb (RECSYS_MAX_MODEL_MB) where the scoring machine has the memory, or "
                        "promote a model that fits (an autoencoder's weights grow with I, EASE's with I x I)")


# -- what is saved: a description and tensors -----------------------------------------------------------------


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _describe(rec: Recommender) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the recommender's JSON description, its weights as CPU tensors)."""
    from model.recommenders import EASE, MODEL_NAMES, Autoencoder, Popularity

    name = getattr(rec, "name", None)
    if name not in MODEL_NAMES:
        raise ValueError(f"cannot save a {type(rec).__name__} ({name!r}) in a model bundle: only the models of "
                         f"model.recommenders ({', '.join(MODEL_NAMES)})")
    spec: dict[str, Any] = {"model": name, "fit_seconds": float(rec.fit_seconds)}
    if isinstance(rec, Autoencoder):
        spec |= {"model_config": rec.model_config.model_dump(mode="json"), "pia": rec.pia.model_dump(mode="json"),
                 "best_epoch": int(rec.best_epoch)}
        return spec, rec.inference_state()
    if isinstance(rec, Popularity):
        return spec, {"counts": rec.counts.detach().cpu()}
    if isinstance(rec, EASE):  # and EDLAE, its subclass: the config under the model's name ("ease" / "edlae")
        return spec | {name: rec.config.model_dump(mode="json")}, {"weights": rec.weights.detach().cpu()}
    raise ValueError(f"cannot save a {type(rec).__name__} in a model bundle")


# -- loading: every step validated ----------------------------------------------------------------------------


def _read_meta(d: Path) -> dict[str, Any]:
    path = d / META
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise DataError(f"model bundle {d} has no {META}", "pass a folder written by ModelBundle.save "
                        "(or a registered models:/NAME@ALIAS)") from e
    except (OSError, ValueError) as e:
        raise DataError(f"model bundle file {path} is not readable JSON ({e})", RETRAIN) from e
    if not isinstance(meta, dict):
        raise DataError(f"model bundle file {path} is a JSON {type(meta).__name__}, not an object", RETRAIN)
    version = meta.get("format_version")
    if version == 1:
        raise DataError(f"model bundle {d} is format 1 (a pickled Python object, which is not loaded: it could run "
                        "code)", RETRAIN)
    if version != FORMAT_VERSION:
        raise DataError(f"model bundle {d} has format {version!r}, this code reads format {FORMAT_VERSION}", RETRAIN)
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"model bundle file {path} is malformed: {problem}", RETRAIN)
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a format-2 bundle.json's fields (None: nothing)."""
    from model.recommenders import MODEL_NAMES

    n = meta.get("n_items")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"n_items {n!r} is not a positive integer"
    for key, typ in (("name", str), ("snapshot_id", str), ("config", dict), ("recommender", dict), ("files", dict)):
        if not isinstance(meta.get(key), typ):
            return f"{key} is not a JSON {'object' if typ is dict else 'string'}"
    spec = meta["recommender"]
    if spec.get("model") not in MODEL_NAMES:
        return f"recommender model {str(spec.get('model'))[:40]!r} is not one of {', '.join(MODEL_NAMES)}"
    for name in (WEIGHTS, ITEMS):
        entry = meta["files"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or \
                not isinstance(entry.get("bytes"), int):
            return f"no sha256/bytes recorded for {name}"
    return None


def _read_checked(d: Path, name: str, meta: dict[str, Any]) -> bytes:
    """The file's bytes, refused unless they match the checksum and size bundle.json records."""
    path = d / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"model bundle file {path} is not readable ({e.strerror or e})", RETRAIN) from e
    want = meta["files"][name]
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise DataError(f"model bundle file {path} does not match the checksum recorded in {META} (changed or "
                        "corrupted since it was saved)", "load the bundle again from the registry, or retrain")
    return data


def _load_state(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """Tensors only: weights_only=True refuses any pickled object other than tensors and plain containers."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a torch file), EOFError...
        raise DataError(f"model bundle file {path} is not a weights-only state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})", RETRAIN) from e
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"model bundle file {path} is not a mapping of names to tensors", RETRAIN)
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise DataError(f"model bundle file {path} holds non-float weights ({', '.join(bad[:3])})", RETRAIN)
    return state


def _load_items(path: Path, data: bytes, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    # an Arrow-owned copy: reading from Python bytes can leave Arrow I/O tasks holding Python objects after an
    # error, which abort the interpreter at exit
    buf = pa.allocate_buffer(len(data))
    np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    try:
        table = pq.read_table(pa.BufferReader(buf))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"model bundle file {path} is not readable Parquet ({e})", RETRAIN) from e
    if table.column_names != ["item_id", "popularity"] or table.num_rows != n_items:
        raise DataError(f"model bundle file {path} does not hold {n_items} rows of (item_id, popularity)", RETRAIN)
    ids_type, pop_type = table.schema.field("item_id").type, table.schema.field("popularity").type
    if not (pa.types.is_int64(ids_type) or pa.types.is_string(ids_type)) or not pa.types.is_floating(pop_type):
        raise DataError(f"model bundle file {path} has item ids of type {ids_type} and popularity of type "
                        f"{pop_type} (int64 or string, and float expected)", RETRAIN)
    if table["item_id"].null_count or table["popularity"].null_count:
        raise DataError(f"model bundle file {path} has missing item ids or popularity values", RETRAIN)
    item_ids = table["item_id"].to_numpy(zero_copy_only=False)
    popularity = table["popularity"].to_numpy().astype(np.float32)
    if len(set(item_ids.tolist())) != n_items:
        raise DataError(f"model bundle file {path} lists an item id twice", RETRAIN)
    if not np.isfinite(popularity).all() or (popularity < 0).any():
        raise DataError(f"model bundle file {path} has negative or non-finite popularity values", RETRAIN)
    return item_ids, popularity


def _rebuild(spec: dict[str, Any], state: dict[str, torch.Tensor], n_items: int, path: Path) -> Recommender:
    """The recommender named by `spec` (checked against MODEL_NAMES) with the weights in `state`."""
    from model.ease import EASEConfig, EDLAEConfig
    from model.pia import PIAConfig
    from model.recommenders import ARCHS, Autoencoder, make_recommender
    from model.train import TrainConfig

    name = spec["model"]

    def want(keys: set[str], shapes: dict[str, tuple[int, ...]]) -> None:
        if set(state) != keys or any(tuple(state[k].shape) != s for k, s in shapes.items()):
            got = {k: tuple(v.shape) for k, v in list(state.items())[:4]}
            raise DataError(f"model bundle file {path} does not hold {name}'s weights for {n_items} items "
                            f"(expected {shapes}, found {got})", RETRAIN)

    try:
        if name == "popularity":
            want({"counts"}, {"counts": (n_items,)})
            rec = make_recommender(name)
            rec.counts = state["counts"].float()  # type: ignore[attr-defined]
        elif name in ("ease", "edlae"):
            want({"weights"}, {"weights": (n_items, n_items)})
            config = (EASEConfig if name == "ease" else EDLAEConfig).model_validate(spec.get(name))
            rec = make_recommender(name, train=TrainConfig(device="cpu"), ease=config)
            rec.weights = state["weights"].float()  # type: ignore[attr-defined]
        else:
            arch = name.removesuffix("-pia")
            config_type = type(ARCHS[arch][1]())
            rec = make_recommender(name, model_config=config_type.model_validate(spec.get("model_config")),
                                   pia=PIAConfig.model_validate(spec["pia"]) if "pia" in spec else None)
            assert isinstance(rec, Autoencoder)
            module = ARCHS[arch][0](n_items, rec.model_config)  # not rec.build: that reseeds torch's global RNG
            missing, unexpected = module.load_state_dict(state, strict=False)
            # the inference state leaves out training-only weights (RecVAE's previous-epoch encoder)
            missing = [k for k in missing if not k.startswith("encoder_old.")]
            if missing or unexpected:
                raise DataError(f"model bundle file {path} does not match {name}'s architecture (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]})", RETRAIN)
            rec.module = module.eval()
            best = spec.get("best_epoch", 0)
            rec.best_epoch = best if isinstance(best, int) else 0
    except ValidationError as e:
        raise DataError(f"model bundle {path.parent}/{META} has an invalid {name} configuration "
                        f"({e.error_count()} error(s), first: {e.errors()[0]['loc']}: {e.errors()[0]['msg']})",
                        RETRAIN) from e
    except RuntimeError as e:  # load_state_dict: a tensor of the wrong shape
        raise DataError(f"model bundle file {path} does not match {name}'s architecture "
                        f"({str(e).splitlines()[-1].strip()[:200]})", RETRAIN) from e
    rec.n_items = n_items
    fit = spec.get("fit_seconds", 0.0)
    rec.fit_seconds = float(fit) if isinstance(fit, int | float) and math.isfinite(fit) else 0.0
    return rec
