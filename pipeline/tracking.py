"""MLflow plumbing shared by train and report: where the store is, what to tag, how to log fast.

Two directories matter, and they differ for queued experiments (``dvc exp run --queue``), which DVC
runs in temporary copies of the repository under ``.dvc/tmp/exps``:

* the *store root*, where the default tracking store lives: an SQLite file
  ``sqlite:///<store root>/mlflow.db`` (absolute path) with its artifacts beside it in
  ``<store root>/mlartifacts``. It is DVC's ``$DVC_ROOT`` when DVC sets it (for queued experiments
  DVC points it at the parent repository, so their runs land in the project's own store rather than
  in a copy that is deleted afterwards), else the nearest directory holding ``dvc.yaml``;
* the *project root* (the working copy), where the stage runs: the nearest directory holding
  ``dvc.yaml``. Its ``dvc.lock`` and git state describe the run, so tags are read from there.

``$MLFLOW_TRACKING_URI``, then ``tracking.uri`` in params.yaml, override the default store. Runs
started at the same time (``dvc queue start -j 2``) share an SQLite store safely: its first use is
serialised by a lock file, and SQLite waits for a busy database instead of failing at once.

MLflow is imported lazily so that parameter and input errors are reported before its import cost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import yaml

from pipeline.cli import PipelineError
from pipeline.params import tracking_uri_problem

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first use of a new store is then unguarded.
    fcntl = None

logger = logging.getLogger(__name__)

# MLflow accepts at most 1,000 metric values per log_batch call.
METRICS_PER_BATCH = 1000
# A tracking server that cannot answer a health check within this many seconds is reported as
# unreachable before any training time is spent.
SERVER_CHECK_SECONDS = 5.0
# How long a process writing to an SQLite store waits for another one to finish its write. SQLite's
# own default, 5 s, is short when two trainings share the machine's two cores.
SQLITE_BUSY_SECONDS = 60
# How long a process waits for another one to finish creating or upgrading an SQLite store.
SQLITE_INIT_LOCK_SECONDS = 120
# Appended to every "cannot use the tracking store" error, so users know what to do next.
TRACKING_FIX_HINT = (
    "Start or repair the server, fix MLFLOW_TRACKING_URI (or tracking.uri in params.yaml), or unset it "
    "to use the local SQLite store. Nothing was trained and no output was changed."
)


def project_root(start: Path | None = None) -> Path:
    """The working copy the stage runs in: the nearest ancestor of ``start`` (or cwd) with dvc.yaml.

    Unlike :func:`store_root` this ignores $DVC_ROOT, which for a queued experiment names the parent
    repository rather than the temporary copy whose dvc.lock and sources this run actually used.
    """
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / "dvc.yaml").exists() or (directory / ".dvc").is_dir():
            return directory
    return here


def store_root(start: Path | None = None) -> Path:
    """Where the default store lives: $DVC_ROOT when DVC sets it, else :func:`project_root`."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return project_root(start)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI, or None for other stores and in-memory databases."""
    if urlparse(uri).scheme != "sqlite" or ":///" not in uri:
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def with_busy_timeout(uri: str) -> str:
    """Add SQLITE_BUSY_SECONDS as the ``timeout`` of an SQLite URI that does not set one.

    SQLAlchemy hands the parameter to sqlite3.connect, so a writer waits for a concurrent one (two
    queued experiments logging metrics at once) instead of failing with "database is locked".
    """
    if sqlite_path(uri) is None or "timeout" in parse_qs(urlparse(uri).query):
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_SECONDS}"


def tracking_uri(params_uri: str, root: Path) -> str:
    """Pick the tracking URI: $MLFLOW_TRACKING_URI, then params.yaml, then SQLite at the root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params_uri
    if uri:
        problem = tracking_uri_problem(uri)
        if problem:
            source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
            raise PipelineError(f"{source} {problem}.")
        return with_busy_timeout(uri)
    return with_busy_timeout(f"sqlite:///{(root / 'mlflow.db').as_posix()}")


def artifact_location(uri: str, root: Path) -> str | None:
    """Artifacts of a local store live beside it at the root; a server decides for itself."""
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return None
    return (root / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout: float = SERVER_CHECK_SECONDS) -> None:
    """Fail fast, with a clear message, when a tracking server or a local store cannot be used."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as response:
                if response.status != 200:
                    raise PipelineError(f"the MLflow tracking server at {uri} answered {response.status} to {health}.")
        except urllib.error.HTTPError as error:
            # Something answers there, but not an MLflow server's health check: a wrong port or path.
            raise PipelineError(
                f"{uri} does not look like an MLflow tracking server: {health} answered HTTP {error.code} "
                f"({error.reason}). {TRACKING_FIX_HINT}"
            ) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PipelineError(
                f"the MLflow tracking server at {uri} cannot be reached ({reason}) within {timeout:g} s. "
                f"{TRACKING_FIX_HINT}"
            ) from None
    elif (database := sqlite_path(uri)) is not None:
        if not database.parent.is_dir():
            raise PipelineError(f"the MLflow SQLite store {uri} is in {database.parent}, which does not exist.")


@contextlib.contextmanager
def store_init_lock(uri: str, timeout: float = SQLITE_INIT_LOCK_SECONDS) -> Iterator[None]:
    """Hold an exclusive lock beside an SQLite store while this process first opens it.

    MLflow creates and migrates the schema on first use; two processes doing that at once (a queue
    started with -j 2 on a fresh project) fail with "duplicate column" or alembic errors. The lock
    file ``mlflow.db-lock`` matches the ``mlflow.db-*`` pattern that git already ignores. Other
    stores (a server, PostgreSQL) handle concurrency themselves.
    """
    database = sqlite_path(uri)
    if database is None or fcntl is None:
        yield
        return
    with open(f"{database}-lock", "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"another process has held {database}-lock for over {timeout:g} s while opening the "
                        f"MLflow store {uri}; if none is running, delete that file."
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure_client_timeouts() -> None:
    """Keep MLflow's HTTP retries short, so a server that dies mid-run fails in seconds, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def connect(params_uri: str, experiment: str):
    """Point MLflow at the store, check it answers, and return (client, experiment_id)."""
    root = store_root()
    uri = tracking_uri(params_uri, root)
    check_reachable(uri)
    configure_client_timeouts()
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    try:
        # Creating the client opens the store, which for a new SQLite file creates its schema.
        with store_init_lock(uri):
            client = MlflowClient(uri)
            return client, experiment_id(client, experiment, artifact_location(uri, root))
    except mlflow.exceptions.MlflowException as error:
        # A server that passed the health check but cannot serve the API (its database is down, a
        # proxy in front of it rejects the call) is reported here, still before any training.
        raise PipelineError(f"the MLflow tracking store {uri} failed: {short(error.message)} {TRACKING_FIX_HINT}") from None


def experiment_id(client, name: str, location: str | None) -> str:
    """The id of the experiment ``name``, created (with artifacts at ``location``) if it is new."""
    import mlflow

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Two runs against a server may race to create it; the loser simply uses the winner's.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def short(message: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters: server errors can carry whole HTML pages."""
    flat = " ".join(str(message).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def git_info(root: Path) -> dict[str, str]:
    """The commit the run started from and whether tracked sources differed from it."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    # An experiment's own commit does not exist yet while it runs; DVC names the one it started from.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git("rev-parse", "HEAD") or "unknown"
    # Compared with that commit rather than with HEAD, so an experiment's -S changes to params.yaml
    # count in a queued copy too. Outputs that the pipeline itself rewrites while it runs
    # (dvc.lock, metrics/) do not count as a dirty tree; a changed source file or params.yaml does.
    changed = None if commit == "unknown" else git("diff", "--name-only", commit, "--", ".", ":!dvc.lock", ":!metrics")
    dirty = "unknown" if changed is None else str(bool(changed)).lower()
    return {"git.commit": commit, "git.dirty": dirty}


def data_hashes(root: Path) -> dict[str, str]:
    """The md5 of every fetch and preprocess output recorded in ``root``'s dvc.lock, keyed by path.

    DVC updates dvc.lock after each stage, so when train runs it holds the entries of the data that
    train is about to read, in a queued experiment's temporary copy as in the workspace.
    """
    lock_path = root / "dvc.lock"
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    hashes = {}
    for stage in ("fetch", "preprocess"):
        for out in (lock.get("stages", {}).get(stage, {}) or {}).get("outs", []) or []:
            if "md5" in out:
                hashes[f"data.{out['path']}"] = out["md5"]
    return hashes


def run_tags(root: Path | None = None) -> dict[str, str]:
    """Tags linking a run to its DVC experiment, commit and data, read from the working copy ``root``."""
    root = root or project_root()
    tags = {**git_info(root), **data_hashes(root)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def metric_batches(series: Mapping[str, tuple[Iterable[int], Iterable[float]]], timestamp_ms: int | None = None):
    """Yield lists of at most METRICS_PER_BATCH MLflow Metric objects covering every (step, value)."""
    from mlflow.entities import Metric

    timestamp_ms = timestamp_ms or int(time.time() * 1000)
    batch = []
    for key, (steps, values) in series.items():
        for step, value in zip(steps, values):
            batch.append(Metric(key, float(value), timestamp_ms, int(step)))
            if len(batch) == METRICS_PER_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def log_series(client, run_id: str, series: Mapping[str, tuple[Iterable[int], Iterable[float]]]) -> None:
    """Log whole metric histories with one call per thousand values instead of one per value."""
    for batch in metric_batches(series):
        client.log_batch(run_id, metrics=batch, synchronous=True)


def write_run_info(path: Path, run_id: str, experiment_id: str, uri: str) -> None:
    from pipeline.files import write_json

    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri})


def read_run_info(path: Path) -> dict[str, str]:
    try:
        info = json.loads(Path(path).read_text())
        return {key: str(info[key]) for key in ("run_id", "experiment_id", "tracking_uri")}
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the train stage first (dvc repro).") from None
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"{path} is corrupt or not a run-info file; rerun the train stage (dvc repro -f train).") from None


def log_keras_model(model, input_example, pip_requirements: list[str]):
    """Log ``model`` with MLflow's Keras flavour, a signature and an input example.

    MLflow 3.17's ``mlflow.keras.log_model`` writes the input example before it creates the model
    directory and fails; this goes through the same ``Model.log`` with the real Keras flavour, only
    creating the directory first.
    """
    import types

    import mlflow
    from mlflow.models import Model, infer_signature

    def save_model(path, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)

    flavor = types.SimpleNamespace(__name__="mlflow.keras", save_model=save_model)
    signature = infer_signature(input_example, np.asarray(model(input_example)))
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=flavor,
        model=model,
        signature=signature,
        input_example=input_example,
        # Pinning the requirements skips MLflow's slow inference of them (it reloads the model).
        pip_requirements=pip_requirements,
    )
