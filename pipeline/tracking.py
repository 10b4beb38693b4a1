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

Stages record their run through :class:`RunRecorder`, which does the MLflow work in a helper process
(``python -m pipeline.tracking``): importing MLflow, opening (or creating) the store and writing
thousands of metric values cost several seconds of CPU, and in a second process they run on the
machine's other core while the stage does its own start-up and work. A thread would not help: it
would hold the same interpreter lock as the stage's own Python code.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import yaml

from pipeline.cli import PipelineError, configure_logging, exit_now
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
# How long an interrupted stage waits for its helper to mark the run FAILED before killing it.
ABORT_SECONDS = 30


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
    return open_store(uri, experiment, artifact_location(uri, root))


def open_store(uri: str, experiment: str | None, location: str | None):
    """Open (creating if new) the store at ``uri`` and return (client, id of ``experiment``, or None)."""
    configure_client_timeouts()
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    try:
        # Creating the client opens the store, which for a new SQLite file creates its schema.
        with store_init_lock(uri):
            client = MlflowClient(uri)
            return client, None if experiment is None else experiment_id(client, experiment, location)
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


def log_metrics(client, run_id: str, metrics: Mapping[str, float]) -> None:
    """Log single values (step 0) in one call."""
    from mlflow.entities import Metric

    timestamp_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp_ms, 0) for key, value in metrics.items()],
                     synchronous=True)


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


def log_keras_model(client, run_id: str, experiment_id: str, model, input_example: np.ndarray,
                    pip_requirements: list[str], metrics: Mapping[str, float]):
    """Log ``model`` as run ``run_id``'s model, in MLflow's Keras flavour with a signature and an
    input example, and log ``metrics`` into the run linked to that model.

    ``Model.log(run_id=...)`` would do the linking itself, but it does so by rereading every metric
    history of the run to pick out those at the model's step: the 20,000 per-step values cost it
    ~0.8 s, more than all the rest of per-step logging. So the steps are taken here: create the
    logged model with the run as its source, save the flavour into it, link it to the run as an
    output, and log the metrics with the model's id. ``runs:/<run id>/model`` finds it by its
    source run. (MLmodel's own ``run_id`` field stays empty; the logged model records the run.)

    MLflow 3.17's ``mlflow.keras.log_model`` writes the input example before it creates the model
    directory and fails; this goes through ``Model.log`` with the real Keras flavour, only creating
    the directory first. ``client`` comes from :func:`open_client_in_background`, which also points
    MLflow's global tracking URI at its store.
    """
    import types

    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model, infer_signature

    def save_model(path, validate_serving_input, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)

    flavor = types.SimpleNamespace(__name__="mlflow.keras", save_model=save_model)
    signature = infer_signature(input_example, np.asarray(model(input_example)))
    try:
        params = {key: str(value) for key, value in client.get_run(run_id).data.params.items()}
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id, params=params)
        Model.log(
            artifact_path=None,
            flavor=flavor,
            model_id=logged.model_id,
            model=model,
            signature=signature,
            input_example=input_example,
            # Pinning the requirements skips MLflow's slow inference of them (it reloads the model).
            pip_requirements=pip_requirements,
            # MLflow would reload the model it just wrote and predict the example to check that a
            # server could; the signature comes from that very prediction, and the tests load the
            # logged model and predict with it, so the check would only cost every run ~0.3 s.
            validate_serving_input=False,
        )
        timestamp_ms = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp_ms, 0, model_id=logged.model_id)
                                          for key, value in metrics.items()], synchronous=True)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(f"logging the model to MLflow run {run_id} failed: {short(error.message)}") from None
    return logged


# --------------------------------------------------------------------------------------------
# The run recorder and its helper process


class RunRecorder:
    """One MLflow run, written by a helper process while the stage goes on with its own work.

    Creating the recorder checks the tracking URI (a server must answer its health check, so a
    wrong one fails at once, before any work) and starts ``python -m pipeline.tracking``. The helper
    imports MLflow, opens the store (creating it on first use) and starts a new run, or resumes
    ``run_id``; then it performs the ``log_*`` calls in the order they were made. Those calls only
    queue their work and return at once; histories that queue up while the helper is busy are
    logged together, in large batches. :meth:`check` raises the helper's failure, if it has had
    one, as a PipelineError; :meth:`wait_ready` waits for the run to exist; leaving the ``with``
    block waits until everything is logged and ends the run, FINISHED, or FAILED when the block
    raised (an interrupted stage included).
    """

    def __init__(self, params_uri: str, experiment: str, *, run_id: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, params: Mapping[str, object] | None = None) -> None:
        root = store_root()
        self.uri = tracking_uri(params_uri, root)
        check_reachable(self.uri)
        configure_client_timeouts()  # Inherited by the helper through the environment.
        self.info: dict[str, str] | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.tracking", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()])
        theirs.close()
        from multiprocessing.connection import Connection

        self.connection = Connection(ours.detach())
        threading.Thread(target=self._receive, name="mlflow-recorder", daemon=True).start()
        self._send("start", {
            "uri": self.uri, "experiment": experiment, "location": artifact_location(self.uri, root),
            "run_id": run_id, "run_name": run_name, "tags": dict(tags or {}), "params": dict(params or {}),
        })

    def _receive(self) -> None:
        """Read the helper's replies: ("ready", run info), ("error", message) or ("done", None)."""
        try:
            while True:
                kind, value = self.connection.recv()
                if kind == "ready":
                    self.info = value
                    self._ready.set()
                elif kind == "error":
                    self.error = self.error or value
                    self._ready.set()
                elif kind == "done":
                    break
        except (EOFError, OSError):
            if self.error is None:
                self.error = (f"the MLflow helper process stopped unexpectedly (exit code {self.process.wait()}) "
                              f"while recording to {self.uri}.")
        self._ready.set()
        self._done.set()

    def _send(self, *message) -> None:
        self.check()
        try:
            self.connection.send(message)
        except OSError:
            # The helper has gone; its reply or the reader above will say why.
            self._done.wait(timeout=ABORT_SECONDS)
            self.check()
            raise PipelineError(f"the MLflow helper process stopped unexpectedly while recording to {self.uri}.") from None

    def check(self) -> None:
        """Raise the helper's failure, if it has had one."""
        if self.error is not None:
            raise PipelineError(self.error)

    def wait_ready(self) -> dict[str, str]:
        """Wait for the run to exist and return its run_id, experiment_id and tracking_uri."""
        self._ready.wait()
        self.check()
        return self.info

    def log_series(self, series: Mapping[str, tuple[Iterable[int], Iterable[float]]]) -> None:
        """Queue whole metric histories: {key: (steps, values)}."""
        self._send("series", {key: (list(steps), [float(value) for value in values])
                              for key, (steps, values) in series.items()})

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._send("metrics", {key: float(value) for key, value in metrics.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send("artifact", str(Path(path).resolve()), artifact_path)

    def _end(self, status: str, timeout: float | None) -> None:
        try:
            self.connection.send(("end", status))
        except OSError:
            pass
        if not self._done.wait(timeout=timeout):
            self.process.kill()
        self.process.wait()
        self.connection.close()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self._end("FINISHED", timeout=None)
            self.check()
        else:
            self._end("FAILED", timeout=ABORT_SECONDS)


def open_client_in_background(recorder: RunRecorder) -> Future:
    """Import MLflow in a thread and open the recorder's store once its run exists; a Future of the client.

    For a stage that must call MLflow itself as well (train logs its Keras model, which needs the
    model object, so the helper cannot do it). Started before a long stretch of compiled TensorFlow
    code, which releases the interpreter lock, the import costs the stage almost nothing.
    """
    future: Future = Future()

    def work() -> None:
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            recorder.wait_ready()
            mlflow.set_tracking_uri(recorder.uri)
            future.set_result(MlflowClient(recorder.uri))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future.
            future.set_exception(error)

    threading.Thread(target=work, name="mlflow-import", daemon=True).start()
    return future


def _start_run(config: Mapping) -> tuple[object, str, dict[str, str]]:
    """In the helper: open the store and start (or resume) the run; return (client, run_id, info)."""
    import mlflow

    # Resuming needs no experiment lookup (the run names its own), so none is made or created.
    client, experiment = open_store(config["uri"], None if config["run_id"] else config["experiment"], config["location"])
    try:
        if config["run_id"]:
            try:
                run = client.get_run(config["run_id"])
            except mlflow.exceptions.MlflowException:
                raise PipelineError(
                    f"MLflow run {config['run_id']} is not in the tracking store {config['uri']}; rerun the train "
                    f"stage (dvc repro -f train) against this store."
                ) from None
            experiment = run.info.experiment_id
        else:
            run = client.create_run(experiment, run_name=config["run_name"], tags=config["tags"])
            from mlflow.entities import Param

            params = [Param(key, str(value)) for key, value in config["params"].items()]
            if params:
                client.log_batch(run.info.run_id, params=params, synchronous=True)
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(f"the MLflow tracking store {config['uri']} failed: {short(error.message)} {TRACKING_FIX_HINT}") from None
    info = {"run_id": run.info.run_id, "experiment_id": experiment, "tracking_uri": config["uri"]}
    return client, run.info.run_id, info


def _describe(error: BaseException, uri: str | None) -> str:
    """One paragraph for a failure in the helper, which has no traceback to show."""
    if isinstance(error, PipelineError):
        return str(error)
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    where = f" {uri}" if uri else ""
    return f"recording to the MLflow tracking store{where} failed: {short(message)} {TRACKING_FIX_HINT}"


class _Inbox:
    """The helper's queue of calls, filled by a thread that reads the connection as messages arrive.

    Draining the connection at once keeps the stage from ever blocking on a full socket buffer
    while the helper is busy (importing MLflow, creating a store).
    """

    def __init__(self, connection) -> None:
        self.connection = connection
        self.messages: collections.deque = collections.deque()
        self.arrived = threading.Condition()
        threading.Thread(target=self._receive, name="mlflow-inbox", daemon=True).start()

    def _receive(self) -> None:
        try:
            while True:
                message = self.connection.recv()
                with self.arrived:
                    self.messages.append(message)
                    self.arrived.notify()
        except (EOFError, OSError):
            # The stage has gone without saying how the run ended: it failed.
            with self.arrived:
                self.messages.append(("end", "FAILED"))
                self.arrived.notify()

    def next(self) -> tuple:
        with self.arrived:
            while not self.messages:
                self.arrived.wait()
            return self.messages.popleft()

    def more_series(self) -> Mapping | None:
        """The next waiting metric history, if the next waiting message is one."""
        with self.arrived:
            if self.messages and self.messages[0][0] == "series":
                return self.messages.popleft()[1]
        return None


def _merge_series(inbox: _Inbox, first: Mapping) -> dict[str, tuple[list, list]]:
    """``first`` and the histories waiting behind it, up to a few thousand values.

    MLflow's SQL store spends most of a log_batch call on the call rather than on its values, so a
    backlog of chunks is logged far faster together than one by one.
    """
    series: dict[str, tuple[list, list]] = {}
    chunk = first
    while chunk is not None:
        for key, (steps, values) in chunk.items():
            series.setdefault(key, ([], []))
            series[key][0].extend(steps)
            series[key][1].extend(values)
        if sum(len(steps) for steps, _ in series.values()) >= 5 * METRICS_PER_BATCH:
            break
        chunk = inbox.more_series()
    return series


def serve(fd: int) -> None:
    """The helper process: perform a RunRecorder's calls on the connection ``fd``."""
    from multiprocessing.connection import Connection

    configure_logging()
    # The stage decides how the run ends. Ctrl-C in a terminal reaches both processes; the stage
    # then sends "end FAILED", and if it dies outright the connection closes, which ends as FAILED.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(fd)
    inbox = _Inbox(connection)

    def reply(kind: str, value) -> None:
        with contextlib.suppress(OSError):
            connection.send((kind, value))

    client = run_id = uri = None
    failed = resumed = False
    while True:
        command, *args = inbox.next()
        if command == "end":
            status = "FAILED" if failed else args[0]
            break
        if failed:
            continue
        try:
            if command == "start":
                uri, resumed = args[0]["uri"], bool(args[0]["run_id"])
                client, run_id, info = _start_run(args[0])
                reply("ready", info)
                # From here on the helper only writes what the stage hands it, which is never more
                # urgent than the stage's own work: when both want the same core, the stage wins.
                with contextlib.suppress(OSError, AttributeError):
                    os.nice(10)
            elif command == "series":
                log_series(client, run_id, _merge_series(inbox, args[0]))
            elif command == "metrics":
                log_metrics(client, run_id, args[0])
            elif command == "artifact":
                client.log_artifact(run_id, args[0], artifact_path=args[1])
        except Exception as error:  # noqa: BLE001 - reported to the stage, which exits cleanly.
            logger.debug("MLflow helper failed on %s", command, exc_info=True)
            failed = True
            reply("error", _describe(error, uri))
    # A resumed run (report adding to train's run) keeps its status if this stage failed: the
    # training it records did finish.
    if run_id is not None and not (resumed and status != "FINISHED"):
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)
    reply("done", None)
    exit_now(0)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
