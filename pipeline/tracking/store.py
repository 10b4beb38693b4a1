"""Where the MLflow tracking store is, and how it is opened.

Two directories matter, and they differ for queued experiments (``dvc exp run --queue``), which DVC
runs in temporary copies of the repository under ``.dvc/tmp/exps``:

* the *store root*, where the default store lives: an SQLite file ``sqlite:///<store root>/mlflow.db``
  (absolute path) with its artifacts beside it in ``<store root>/mlartifacts``. It is DVC's
  ``$DVC_ROOT`` when DVC sets it (for queued experiments DVC points it at the parent repository, so
  their runs land in the project's own store rather than in a copy that is deleted afterwards), else
  the nearest directory holding ``dvc.yaml``;
* the *project root* (the working copy), where the stage runs; its ``dvc.lock`` and git state
  describe the run (see :mod:`pipeline.tracking.tags`).

``$MLFLOW_TRACKING_URI`` overrides the default store (see :func:`pipeline.params.tracking_settings`).
Runs started at the same time (``dvc queue start -j 2``) share an SQLite store safely: its first use
is serialised by a lock file, and SQLite waits for a busy database instead of failing at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from pipeline.cli import PipelineError, redact
from pipeline.params import TrackingSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

# A tracking server that cannot answer a health check within this many seconds is reported as
# unreachable before any training time is spent.
SERVER_CHECK_SECONDS = 5.0
# How long a process writing to an SQLite store waits for another one to finish its write. SQLite's
# own default, 5 s, is short when two trainings share the machine's two cores.
SQLITE_BUSY_SECONDS = 60
# How long a process waits for another one to finish creating or upgrading an SQLite store.
SQLITE_INIT_LOCK_SECONDS = 120
# Appended to every "cannot use the tracking store" error, so users know what to do next.
TRACKING_FIX_HINT = "Start or repair the server, fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."
# How often a stage logging to a tracking server checks the server's health while it runs.
HEALTH_CHECK_SECONDS = 2.0
# Once the stage has given up on a server, each remaining request (ending the run, values still
# queued) gets this one short try, so that the stage exits promptly instead of waiting on it again.
GIVE_UP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}


# MLflow 3's UI shows an experiment either as a GenAI one (traces, token usage) or as model training
# (runs, metric charts). Earlier 3.x UIs pick the view by this experiment tag; the UI of the MLflow
# this project locks picks it by the sidebar's "GenAI / Machine learning" switch (remembered by the
# browser, GenAI by default), or by the URL parameter workflowType=machine_learning. Experiments get
# the tag, and the README says which click (or URL parameter) opens the training runs in the newer UI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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


def tracking_uri(uri: str, root: Path) -> str:
    """The store ``uri`` names (TrackingSettings.uri), or, when it is empty, the SQLite file at the root."""
    return with_busy_timeout(uri or f"sqlite:///{(root / 'mlflow.db').as_posix()}")


def artifact_location(uri: str, root: Path) -> str | None:
    """Artifacts of a local store live beside it at the root; a server decides for itself."""
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return None
    return (root / "mlartifacts").as_uri()


def health_url(uri: str) -> str | None:
    """The health-check URL of a tracking server, or None for a store that is not a server.

    Without the URI's credentials (``http://user:password@host``, which MLflow accepts): urllib would
    read them as part of the host name, and the health check needs none.
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"


def server_problem(uri: str, timeout: float) -> tuple[str, str] | None:
    """Ask a server's health check once: None if it answered, else ("hung" or "down", why)."""
    health = health_url(uri)
    if health is None:
        return None
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            return None if response.status == 200 else ("down", f"its health check answered HTTP {response.status}")
    except urllib.error.HTTPError as error:
        return "down", f"its health check answered HTTP {error.code}"
    except TimeoutError:
        return "hung", f"it took the request but sent no answer within {timeout:g} s"
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            return "hung", f"it took the request but sent no answer within {timeout:g} s"
        return "down", f"it cannot be reached ({reason})"


class ServerWatch:
    """Checks a tracking server's health while the stage runs, and stops the stage when the server fails it.

    MLflow's own retries ride out a server that is briefly down (its requests wait and are retried,
    keeping their values), but a server that hangs holds every request for its whole timeout, once
    per retry, and one that stays down is noticed only when the stage next waits on a request. A
    health check every HEALTH_CHECK_SECONDS finds both: a check with no answer within the request
    timeout, or failing checks for longer than the retry time, stop the stage as Ctrl-C would (its
    outputs are left unwritten) and :meth:`interrupted` turns that into a clear error.
    """

    def __init__(self, uri: str, settings: TrackingSettings, interval: float = HEALTH_CHECK_SECONDS) -> None:
        self.uri, self.settings, self.interval = uri, settings, interval
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tracking-server-watch", daemon=True)

    def _watch(self) -> None:
        down_since = None
        while not self._stop.wait(self.interval):
            found = server_problem(self.uri, self.settings.request_timeout)
            if found is None:
                down_since = None
                continue
            kind, why = found
            down_since = down_since or time.monotonic()
            if kind == "hung":
                self._give_up(f"the MLflow tracking server at {redact(self.uri)} stopped answering: {why}")
                return
            if time.monotonic() - down_since > self.settings.retry_seconds:
                self._give_up(
                    f"the MLflow tracking server at {redact(self.uri)} has failed its health check for over "
                    f"{self.settings.retry_seconds} s (the time MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
                    f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR retry for): {why}"
                )
                return

    def _give_up(self, problem: str) -> None:
        self.problem = problem
        os.environ.update(GIVE_UP_SETTINGS)
        os.kill(os.getpid(), signal.SIGTERM)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Watch the server while the block runs; raise a PipelineError if the watch stopped the block."""
        if health_url(self.uri) is not None:
            self._thread.start()
        try:
            yield
        except KeyboardInterrupt as interrupt:
            if self.problem is None:
                raise
            # What happened to the MLflow run, as pipeline.tracking.record says it.
            outcome = f" {interrupt}." if interrupt.args else ""
            raise PipelineError(
                f"{self.problem}. The stage stopped and wrote no output.{outcome} A run the server could not mark "
                "FAILED is marked so by the next training against the server (runs whose train process has ended "
                f"are closed as FAILED). {TRACKING_FIX_HINT}"
            ) from None
        finally:
            self._stop.set()


def fix_hint(uri: str) -> str:
    """What to do about a store that cannot be used: a server's hint, or a damaged SQLite file's."""
    database = sqlite_path(uri)
    if database is None:
        return TRACKING_FIX_HINT
    return (
        f"If {database} is damaged, move it aside (with its mlartifacts folder) to start a new store there, or "
        "restore it from a backup; or point MLFLOW_TRACKING_URI at another store."
    )


def check_artifact_folder(location: str | None) -> None:
    """Fail before any work when a local store's artifact folder cannot take files."""
    if location is None or urlparse(location).scheme != "file":
        return
    folder = Path(urlparse(location).path)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise PipelineError(
            f"the MLflow artifact folder {folder} cannot be created: {existing} is a file, not a folder. "
            "Move that file away. Nothing was trained."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(
            f"the MLflow artifact folder {folder} cannot take files: {existing} is read-only for this user. "
            "Make it writable, or point MLFLOW_TRACKING_URI at another store. Nothing was trained."
        )


def check_reachable(uri: str, timeout: float = SERVER_CHECK_SECONDS) -> None:
    """Fail fast, with a clear message, when a tracking server or a local store cannot be used."""
    shown = redact(uri)
    if (health := health_url(uri)) is not None:
        try:
            with urllib.request.urlopen(health, timeout=timeout) as response:
                if response.status != 200:
                    raise PipelineError(
                        f"the MLflow tracking server at {shown} answered {response.status} to {health}."
                    )
        except urllib.error.HTTPError as error:
            # Something answers there, but not an MLflow server's health check: a wrong port or path.
            raise PipelineError(
                f"{shown} does not look like an MLflow tracking server: {health} answered HTTP {error.code} "
                f"({error.reason}). {TRACKING_FIX_HINT} Nothing was trained."
            ) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PipelineError(
                f"the MLflow tracking server at {shown} cannot be reached ({reason}) within {timeout:g} s. "
                f"{TRACKING_FIX_HINT} Nothing was trained."
            ) from None
    elif (database := sqlite_path(uri)) is not None and not database.parent.is_dir():
        raise PipelineError(f"the MLflow SQLite store {shown} is in {database.parent}, which does not exist.")


@contextlib.contextmanager
def store_init_lock(uri: str, timeout: float = SQLITE_INIT_LOCK_SECONDS) -> Iterator[None]:
    """Hold an exclusive lock beside an SQLite store while this process first opens it.

    MLflow creates and migrates the schema on first use without guarding against a second process
    doing the same: two trainings of a queue started with -j 2 on a fresh project then fail with
    "duplicate column name" or alembic errors (the same race, under Hydra's multirun, is
    https://github.com/daizutabi/hydraflow/issues/245). The lock file ``mlflow.db-lock`` matches the
    ``mlflow.db-*`` pattern that git ignores. Other stores (a server, PostgreSQL) handle concurrency
    themselves.
    """
    database = sqlite_path(uri)
    if database is None:
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
                        f"MLflow store {redact(uri)}; if none is running, delete that file."
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_existing(uri: str) -> None:
    """Fail when ``uri`` is an SQLite store whose file does not exist: MLflow would create an empty one.

    For tools that only read the store (the metric gate, mnist-predict), an empty store would
    answer "not found" to everything, hiding the real mistake: the wrong directory or URI.
    """
    if (database := sqlite_path(uri)) is not None and not database.exists():
        raise PipelineError(f"the MLflow store {redact(uri)} does not exist yet; run the pipeline first (dvc repro).")


def short(message: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (server errors can carry whole HTML pages), secrets masked.

    MLflow's and SQLAlchemy's errors often quote the URI they failed on, credentials included.
    """
    flat = " ".join(redact(message).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def resolve(settings: TrackingSettings) -> tuple[str, str | None]:
    """The tracking URI and artifact location the stage will use, checked to be usable.

    Cheap (no MLflow import), so a wrong URI or a dead server is reported before any work. Also gives
    MLflow the project's HTTP retries and timeout where the environment sets none.
    """
    root = store_root()
    uri = tracking_uri(settings.uri, root)
    check_reachable(uri)
    location = artifact_location(uri, root)
    check_artifact_folder(location)
    for key, value in settings.http_environment().items():
        os.environ.setdefault(key, value)
    quiet_links(uri)
    return uri, location


def quiet_links(uri: str) -> None:
    """Stop MLflow printing its "View run … at <server URL>" links when the URL holds credentials.

    MLflow prints the tracking URI as it was given, password included, to stdout when a run ends.
    """
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def open_store(uri: str, experiment: str, location: str | None) -> tuple[MlflowClient, str]:
    """Open (creating if new) the store at ``uri``; return the client and the id of ``experiment``.

    Also points MLflow's own global tracking URI at the store, for the calls that use it.
    """
    import mlflow
    import sqlalchemy.exc

    mlflow.set_tracking_uri(uri)
    try:
        # Creating the client opens the store, which for a new SQLite file creates its schema.
        with store_init_lock(uri):
            client = mlflow.MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                if EXPERIMENT_KIND_TAG not in found.tags:
                    client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return client, found.experiment_id
            try:
                return client, client.create_experiment(
                    experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except mlflow.exceptions.MlflowException:
                # Two runs against a server may race to create it; the loser uses the winner's.
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                return client, found.experiment_id
    except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError) as error:
        # A server that passed the health check but cannot serve the API (its database is down, a
        # proxy in front of it rejects the call), or an SQLite file that is not a database, is
        # reported here, still before any training. SQLAlchemy's messages end with a link to its
        # error catalogue, which says nothing about this store.
        reason = short(str(getattr(error, "orig", None) or getattr(error, "message", error)))
        raise PipelineError(
            f"the MLflow tracking store {redact(uri)} failed: {reason}. {fix_hint(uri)} Nothing was trained."
        ) from None
