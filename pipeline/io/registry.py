"""MLflow plumbing shared by the training, gate and inference jobs: where tracking lives, registering a
model version, moving aliases, loading a registered bundle back.

Where things live (embedded default, no server): ``RECSYS_HOME`` (default ``~/.recsys``) holds
``mlflow.db`` (SQLite tracking + registry) and ``artifacts/`` (the experiment's explicit artifact location,
so no ``./mlruns`` appears wherever a job runs). A remote server (and its S3 artifacts) is chosen by
configuration only: ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``; the server then decides artifact storage.

A tracking URI may carry credentials (``https://user:password@host``). `setup` keeps them out of everything
printed or logged: MLflow's "View run ... at: <url>" line is switched off, every log record of the process has
URLs and secret-looking parameters masked (`secret_free`), and `tracking_errors` turns MLflow's errors (whose
text holds the full URL) into one redacted DataError line. It also bounds the wait for a server that is down:
MLflow's HTTP retries default to minutes, here to seconds (MLFLOW_DEFAULTS; ``MLFLOW_HTTP_REQUEST_*`` variables
set in the environment win).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DataError
from pipeline.io.redact import MASK, redact_text

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


# MLflow's HTTP client: a down server fails in seconds, not after MLflow's default ~4 minutes of retries.
# Each applies unless the environment sets it.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # bars on stderr would bury a one-line error
TRACKING_FIX = "start the tracking server, or point --tracking-uri / MLFLOW_TRACKING_URI at one that is up"


def setup(explicit_uri: str | None = None) -> str:
    """Point the mlflow module (fluent API) and new clients at one tracking + registry URI; returns it.
    Also: bounded HTTP retries, no URL printed by MLflow, credentials masked in log records (module doc)."""
    import mlflow

    for k, v in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # "View run <name> at: <url with credentials>"
    install_log_redaction()
    uri = tracking_uri(explicit_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


# -- credentials out of errors and logs; a down server told apart from a missing model ---------------------------

# `name=value` of a secret-looking parameter outside a full URL: urllib3 logs request paths
# ("/?token=t0k/api/2.0/...") without the scheme and host that redact_text keys on.
_BARE_SECRET = re.compile(r"([?&;][^=&\s'\"/]*(?:token|passw|pwd|secret|key|sig|credential|auth)[^=&\s'\"/]*=)[^&\s'\"]+",
                          re.IGNORECASE)


def secret_free(text: str) -> str:
    """`text` with credentials masked: userinfo and secret parameters of URLs (redact_text), and secret
    parameters of bare request paths."""
    return _BARE_SECRET.sub(lambda m: m.group(1) + MASK, redact_text(text))


_redaction_installed = False


def install_log_redaction() -> None:
    """Mask credentials in every log record created from now on, whichever logger (MLflow's, urllib3's retry
    warnings, ours) and whichever handler (CLI, Airflow, pytest) gets it. Idempotent."""
    global _redaction_installed
    if _redaction_installed:
        return
    _redaction_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string: the handler reports it as usual
            return record
        clean = secret_free(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if secret_free(text) != text:
                record.exc_text = secret_free(text)  # formatters use exc_text when set
        return record

    logging.setLogRecordFactory(factory)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def server_failure(e: BaseException, explicit_uri: str | None = None) -> DataError | None:
    """A DataError when `e` (from an MLflow call) means the tracking server could not be used at all:
    unreachable, timing out, failing every retry, or refusing the credentials. None for any other error
    (e.g. no such model or alias: the server answered)."""
    import requests
    from mlflow.exceptions import MlflowException

    where = secret_free(tracking_uri(explicit_uri))
    text = " ".join(str(e).split())
    network = any(isinstance(x, requests.exceptions.ConnectionError | requests.exceptions.Timeout |
                             requests.exceptions.RetryError) for x in _chain(e))
    if network or (isinstance(e, MlflowException) and text.startswith("API request to ")
                   and (" failed with exception " in text or " failed with timeout exception " in text)):
        reason = re.search(r"\[Errno -?\d+\] ([^'\")(]+)|(timed out)|(too many \d+ error responses)|(Name or service "
                           r"not known)|(Connection (?:refused|reset|aborted))", text)
        why = next((g for g in reason.groups() if g), "") if reason else type(e).__name__
        return DataError(f"tracking server {where} is unreachable or not answering ({why.strip()})", TRACKING_FIX)
    code = getattr(e, "error_code", None)
    if isinstance(e, MlflowException) and code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return DataError(f"tracking server {where} refused the request ({code})",
                         "check the credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                         "MLFLOW_TRACKING_TOKEN) and the user's permissions")
    return None


@contextmanager
def tracking_errors(explicit_uri: str | None = None) -> Iterator[None]:
    """MLflow errors inside the block → one DataError line, credentials masked (the chained original is
    dropped: its text and traceback hold the URL)."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as e:
        failure = server_failure(e, explicit_uri)
        if failure is None:
            text = secret_free(" ".join(str(e).split()))
            failure = DataError(f"MLflow request failed: {text[:400]}",
                                "check --tracking-uri / MLFLOW_TRACKING_URI and the tracking server's log; re-run "
                                "with -v for details")
        raise failure from None


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
    """Whether `name` has version `version`; a DataError when the server cannot tell (down, refused)."""
    from mlflow.exceptions import MlflowException

    try:
        client(explicit_uri).get_model_version(name, canonical_version(version))
    except MlflowException as e:
        failure = server_failure(e, explicit_uri)
        if failure is not None:
            raise failure from None
        return False
    return True


def require_version(name: str, version: str, explicit_uri: str | None = None) -> None:
    """A DataError unless `name` has version `version` (or the server cannot tell)."""
    if not version_exists(name, version, explicit_uri):
        raise DataError(f"registered model {name!r} has no version {version}",
                        "pass an existing version (`recsys train` registers new ones; see the MLflow UI)")


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
            failure = server_failure(e, explicit_uri)
            if failure is not None:  # not "no alias": the server never answered
                raise failure from None
            raise DataError(f"registered model {name!r} has no alias {alias!r}",
                            "train and promote a version first (`recsys train`, `recsys gate`)") from None
    assert version is not None
    return name, version


def load_bundle(model_uri: str, device: str | None = None, tracking: str | None = None,
                max_bytes: int | None = None) -> tuple[ModelBundle, str]:
    """A registered model (models:/NAME@ALIAS or models:/NAME/VERSION) → (its ModelBundle, version number).

    The alias is resolved once and the pinned version is loaded, so the returned version is exactly the
    weights returned even when the alias moves meanwhile. Only the bundle folder is downloaded and read
    (ModelBundle.load: validated, weights only); the pyfunc's pickled wrapper is never unpickled.
    """
    import mlflow.artifacts
    import yaml

    from pipeline.io.bundle import ModelBundle

    name, version = resolve_version(model_uri, tracking)
    require_version(name, version, tracking)
    uri = setup(tracking)
    base = f"models:/{name}/{version}"
    with tracking_errors(tracking), tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp,
                                                           tracking_uri=uri, registry_uri=uri))
        try:
            rel = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
        except (yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise DataError(f"{base} is not a model logged by `recsys train` (its MLmodel names no bundle artifact)",
                            "pass a version registered by `recsys train`") from e
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
            raise DataError(f"{base}: its MLmodel names the bundle at {str(rel)[:80]!r}", "retrain the model")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=f"{tmp}/bundle",
                                                    tracking_uri=uri, registry_uri=uri)
        bundle = ModelBundle.load(local, device, max_bytes)
    return bundle, version


def version_tags(name: str, version: str, explicit_uri: str | None = None) -> dict[str, str]:
    with tracking_errors(explicit_uri):
        return dict(client(explicit_uri).get_model_version(name, canonical_version(version)).tags)


def alias_version(name: str, alias: str, explicit_uri: str | None = None) -> str | None:
    """The version an alias points at, or None (no such alias, or no such registered model); a DataError
    when the server cannot tell (down, refused)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client(explicit_uri).get_registered_model(name).aliases
    except MlflowException as e:
        failure = server_failure(e, explicit_uri)
        if failure is not None:
            raise failure from None
        return None
    return str(aliases[alias]) if alias in aliases else None


def register(model_uri: str, name: str, tags: dict[str, Any], explicit_uri: str | None = None) -> str:
    """Register a logged model as a new version of `name` with tags and the `challenger` alias; returns the version."""
    import mlflow

    setup(explicit_uri)
    with tracking_errors(explicit_uri):
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
        client(explicit_uri).set_registered_model_alias(name, CHALLENGER, str(mv.version))
    return str(mv.version)
