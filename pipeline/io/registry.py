"""MLflow plumbing shared by the training, gate and inference jobs: where tracking lives, registering a
model version, moving aliases, loading a registered bundle back.

Where things live (embedded default, no server): ``RECSYS_HOME`` (default ``~/.recsys``) holds
``mlflow.db`` (SQLite tracking + registry) and ``artifacts/`` (the experiment's explicit artifact location,
so no ``./mlruns`` appears wherever a job runs). A remote server (and its S3 artifacts) is chosen by
configuration only: ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``; the server then decides artifact storage.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DataError

if TYPE_CHECKING:  # mlflow and torch stay lazy: the CLI imports this module for every command
    from mlflow import MlflowClient

    from pipeline.io.bundle import ModelBundle

DEFAULT_EXPERIMENT = "recsys-train"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


def recsys_home() -> Path:
    return Path(os.environ.get("RECSYS_HOME") or Path.home() / ".recsys").expanduser().resolve()


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the SQLite file under RECSYS_HOME (absolute: 4 slashes)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = recsys_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def setup(explicit_uri: str | None = None) -> str:
    """Point the mlflow module (fluent API) and new clients at one tracking + registry URI; returns it."""
    import mlflow

    uri = tracking_uri(explicit_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(explicit_uri: str | None = None) -> MlflowClient:
    from mlflow import MlflowClient

    uri = setup(explicit_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str = DEFAULT_EXPERIMENT, explicit_uri: str | None = None) -> str:
    """The experiment's id, created on first use with an explicit artifact location when tracking is local."""
    c = client(explicit_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = os.environ.get("RECSYS_ARTIFACT_LOCATION")
    if location is None and is_local(tracking_uri(explicit_uri)):
        location = (recsys_home() / "artifacts").as_uri()
    return str(c.create_experiment(name, artifact_location=location))


def git_commit() -> str:
    """HEAD of the repository this code runs from ('+dirty' when the tree has changes); 'unknown' outside git."""
    repo = Path(__file__).resolve().parents[2]  # <repo>/pipeline/io/registry.py -> <repo>
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def canonical_version(version: object) -> str:
    """A model version from outside (CLI, ledger, URI) as MLflow spells it: '02' -> '2'. MLflow itself accepts
    '02', so comparing raw strings with alias values would treat one version as two."""
    s = str(version)
    if not (s.isascii() and s.isdigit()) or int(s) == 0:
        raise DataError(f"model version {s!r} is not a positive integer", "pass a registered version number, e.g. 3")
    return str(int(s))


def version_exists(name: str, version: str, explicit_uri: str | None = None) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client(explicit_uri).get_model_version(name, canonical_version(version))
    except MlflowException:
        return False
    return True


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION → (name, alias, version)."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a registered model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = model_uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise ValueError(f"{model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, canonical_version(version)


def resolve_version(model_uri: str, explicit_uri: str | None = None) -> tuple[str, str]:
    """(name, version number) a models:/ URI points at now (an alias is read once, then pinned)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    if alias is not None:
        try:
            version = str(client(explicit_uri).get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            raise ValueError(f"registered model {name!r} has no alias {alias!r}: train and promote a version first") from e
    assert version is not None
    return name, version


def load_bundle(model_uri: str, device: str | None = None, tracking: str | None = None) -> tuple[ModelBundle, str]:
    """A registered model (models:/NAME@ALIAS or models:/NAME/VERSION) → (its ModelBundle, version number).

    The alias is resolved once and the pinned version is loaded, so the returned version is exactly the
    weights returned even when the alias moves meanwhile.
    """
    import mlflow.pyfunc

    name, version = resolve_version(model_uri, tracking)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    bundle = model.unwrap_python_model().bundle
    if device is not None:
        bundle.recommender.to(device)
    return bundle, version


def version_tags(name: str, version: str, explicit_uri: str | None = None) -> dict[str, str]:
    return dict(client(explicit_uri).get_model_version(name, canonical_version(version)).tags)


def alias_version(name: str, alias: str, explicit_uri: str | None = None) -> str | None:
    """The version an alias points at, or None (no such alias, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client(explicit_uri).get_registered_model(name).aliases
    except MlflowException:
        return None
    return str(aliases[alias]) if alias in aliases else None


def register(model_uri: str, name: str, tags: dict[str, Any], explicit_uri: str | None = None) -> str:
    """Register a logged model as a new version of `name` with tags and the `challenger` alias; returns the version."""
    import mlflow

    setup(explicit_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client(explicit_uri).set_registered_model_alias(name, CHALLENGER, str(mv.version))
    return str(mv.version)
