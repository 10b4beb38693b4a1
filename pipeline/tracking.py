"""MLflow plumbing shared by train and report: where the store is, what to tag, how to log fast.

The tracking store defaults to an SQLite file at the project root, ``sqlite:///<root>/mlflow.db``
with an absolute path, and its artifacts beside it in ``<root>/mlartifacts``. The root is DVC's
``$DVC_ROOT`` when DVC sets it (queued experiments run in temporary copies of the repository, and a
relative path would lose their runs there), else the nearest directory holding ``dvc.yaml``.
``$MLFLOW_TRACKING_URI``, then ``tracking.uri`` in params.yaml, override the default.

MLflow is imported lazily so that parameter and input errors are reported before its import cost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml

from pipeline.cli import PipelineError
from pipeline.params import tracking_uri_problem

logger = logging.getLogger(__name__)

# MLflow accepts at most 1,000 metric values per log_batch call.
METRICS_PER_BATCH = 1000
# A tracking server that cannot answer a health check within this many seconds is reported as
# unreachable before any training time is spent.
SERVER_CHECK_SECONDS = 5.0


def project_root(start: Path | None = None) -> Path:
    """The repository root: $DVC_ROOT when DVC sets it, else the nearest ancestor with dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / "dvc.yaml").exists() or (directory / ".dvc").is_dir():
            return directory
    return here


def tracking_uri(params_uri: str, root: Path) -> str:
    """Pick the tracking URI: $MLFLOW_TRACKING_URI, then params.yaml, then SQLite at the root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params_uri
    if uri:
        problem = tracking_uri_problem(uri)
        if problem:
            source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
            raise PipelineError(f"{source} {problem}.")
        return uri
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


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
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PipelineError(
                f"the MLflow tracking server at {uri} cannot be reached ({reason}) within {timeout:g} s. "
                "Start it, fix MLFLOW_TRACKING_URI (or tracking.uri in params.yaml), or unset it to use "
                "the local SQLite store. Nothing was trained and no output was changed."
            ) from None
    elif parsed.scheme == "sqlite":
        database = Path(parsed.path)
        if not database.parent.is_dir():
            raise PipelineError(f"the MLflow SQLite store {uri} is in {database.parent}, which does not exist.")


def configure_client_timeouts() -> None:
    """Keep MLflow's HTTP retries short, so a server that dies mid-run fails in seconds, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def connect(params_uri: str, experiment: str):
    """Point MLflow at the store, check it answers, and return (client, experiment_id)."""
    root = project_root()
    uri = tracking_uri(params_uri, root)
    check_reachable(uri)
    configure_client_timeouts()
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    try:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location(uri, root))
    except mlflow.exceptions.MlflowException:
        # Two queued experiments may race to create it; the loser simply uses the winner's.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        experiment_id = found.experiment_id
    return client, experiment_id


def git_info(root: Path) -> dict[str, str]:
    """The commit the run started from and whether tracked sources differed from it."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git("rev-parse", "HEAD") or "unknown"
    # Outputs that the pipeline itself rewrites while it runs (dvc.lock, metrics/) do not count
    # as a dirty tree; a changed source file or params.yaml does.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!metrics")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git.commit": commit, "git.dirty": dirty}


def data_hashes(root: Path) -> dict[str, str]:
    """The md5 of every stage output DVC recorded in dvc.lock, keyed by path."""
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


def run_tags(root: Path) -> dict[str, str]:
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
