"""Where the MLflow store is (``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` and ``mlartifacts`` at ``$DVC_ROOT``
or the project root), how it is checked and opened, and how a server is watched."""

from __future__ import annotations

import contextlib
import os
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

# SQLite's own 5 s wait for a concurrent writer is short when two trainings share two cores.
SQLITE_BUSY_SECONDS = 60
SQLITE_INIT_LOCK_SECONDS = 120
# MLflow 3's UI shows experiments with this tag as model training (runs, charts) rather than GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def project_root(start: Path | None = None) -> Path:
    """The nearest ancestor of ``start`` (or cwd) with dvc.yaml or .dvc; unlike store_root, never $DVC_ROOT."""
    here = (start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / "dvc.yaml").exists() or (d / ".dvc").is_dir()), here)


def store_root(start: Path | None = None) -> Path:
    return Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else project_root(start)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI, or None for other stores and in-memory databases."""
    if urlparse(uri).scheme != "sqlite" or ":///" not in uri:
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def tracking_uri(uri: str, root: Path) -> str:
    """``uri``, or the SQLite store at ``root``; an SQLite URI waits SQLITE_BUSY_SECONDS for a busy database."""
    uri = uri or f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    if sqlite_path(uri) is None or "timeout" in parse_qs(urlparse(uri).query):
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_SECONDS}"


def artifact_location(uri: str, root: Path) -> str | None:
    """A local store's artifacts live beside it at the root; a server decides for itself."""
    return None if urlparse(uri).scheme in ("http", "https", "databricks") else (root / "mlartifacts").as_uri()


def server_problem(uri: str, timeout: float) -> tuple[str, str] | None:
    """Ask a server's /health once, without credentials: None if it answered, else ("hung"|"refused"|"down", why)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    health = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except urllib.error.HTTPError as error:
        return "refused", f"{health} answered HTTP {error.code} ({error.reason})"
    except OSError as error:
        if isinstance(reason := getattr(error, "reason", error), TimeoutError):
            return "hung", f"it took the request but sent no answer within {timeout:g} s"
        return "down", str(reason)
    return None


class ServerWatch:
    """Asks a server's health while a stage logs to it; :meth:`check`, between chunks, stops the stage on a fault."""

    def __init__(self, uri: str, settings: TrackingSettings) -> None:
        self.uri, self.settings = uri, settings
        self.problem: str | None = None
        self._stop = threading.Event()

    def _watch(self) -> None:
        down_since = None
        while self.problem is None and not self._stop.wait(2.0):
            found = server_problem(self.uri, self.settings.request_timeout)
            if found is None:
                down_since = None
            elif found[0] == "hung":
                self.problem = f"the MLflow tracking server at {redact(self.uri)} stopped answering: {found[1]}"
            elif time.monotonic() - (down_since := down_since or time.monotonic()) > self.settings.retry_seconds:
                self.problem = (
                    f"the MLflow tracking server at {redact(self.uri)} has failed its health check for over "
                    f"{self.settings.retry_seconds} s, the time MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
                    f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR retry for ({found[1]})"
                )

    def check(self) -> None:
        if self.problem is not None:
            raise PipelineError(
                f"{self.problem}. The stage stopped and wrote no output. A run the server could not mark FAILED "
                f"is marked so by the next training against it. {fix_hint(self.uri)}"
            )

    @contextlib.contextmanager
    def running(self) -> Iterator[ServerWatch]:
        """Watch the server while the block runs; an error in the block while it is unwell becomes :meth:`check`'s."""
        if urlparse(self.uri).scheme in ("http", "https"):
            threading.Thread(target=self._watch, name="tracking-server-watch", daemon=True).start()
        try:
            yield self
        except Exception:
            self.check()
            raise
        finally:
            self._stop.set()


def fix_hint(uri: str) -> str:
    if (database := sqlite_path(uri)) is None:
        return "Start or repair the server, fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."
    return (
        f"If {database} is damaged, move it aside (with its mlartifacts folder) to start a new store there, or "
        "restore it from a backup; or point MLFLOW_TRACKING_URI at another store."
    )


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server or a local store's folder cannot be used."""
    if (found := server_problem(uri, timeout)) is not None:
        kind, why = found
        what = "does not look like an MLflow tracking server:" if kind == "refused" else "cannot be reached:"
        raise PipelineError(
            f"the MLflow tracking server at {redact(uri)} {what} {why}. {fix_hint(uri)} Nothing was trained."
        )
    if (database := sqlite_path(uri)) is not None and not database.parent.is_dir():
        raise PipelineError(f"the MLflow SQLite store {redact(uri)} is in {database.parent}, which does not exist.")


def require_existing(uri: str) -> None:
    """For tools that only read the store: an SQLite file MLflow would create empty is the wrong directory or URI."""
    if (database := sqlite_path(uri)) is not None and not database.exists():
        raise PipelineError(f"the MLflow store {redact(uri)} does not exist yet; run the pipeline first (dvc repro).")


def short(message: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (servers answer whole HTML pages), credentials masked."""
    flat = " ".join(redact(message).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def failed(action: str, error: BaseException, outcome: str = "The stage wrote no output.") -> PipelineError:
    return PipelineError(f"{action} failed: {short(str(error))} {outcome}")


def quiet_links(uri: str) -> None:
    """MLflow prints "View run … at <URI>" with the URI's password; not when the URI holds one."""
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def resolve(settings: TrackingSettings) -> tuple[str, str | None]:
    """The tracking URI and artifact location, checked before MLflow is imported; MLflow's HTTP settings set."""
    root = store_root()
    uri = tracking_uri(settings.uri, root)
    check_reachable(uri)
    if (location := artifact_location(uri, root)) is not None:
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
                "Make it writable. Nothing was trained."
            )
    for key, value in settings.http_environment().items():
        os.environ.setdefault(key, value)
    quiet_links(uri)
    return uri, location


def open_store(uri: str, experiment: str, location: str | None) -> tuple[MlflowClient, str]:
    """Open (creating if new) the store at ``uri`` as MLflow's global store; the client and ``experiment``'s id."""
    import filelock
    import mlflow
    import sqlalchemy.exc

    mlflow.set_tracking_uri(uri)
    # MLflow creates a new SQLite store's schema unguarded: two trainings of a `dvc queue start -j 2`
    # would both create it and fail (the same race under Hydra: daizutabi/hydraflow#245).
    database = sqlite_path(uri)
    lock = filelock.FileLock(f"{database}-lock", timeout=SQLITE_INIT_LOCK_SECONDS) if database else None
    try:
        with lock or contextlib.nullcontext():
            client = mlflow.MlflowClient(uri)
            if (found := client.get_experiment_by_name(experiment)) is None:
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # Another run may create it first.
                    client.create_experiment(experiment, location, {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                found = client.get_experiment_by_name(experiment)
            if found is None:
                raise mlflow.exceptions.MlflowException(f"the experiment {experiment!r} could not be created")
            return client, found.experiment_id
    except filelock.Timeout:
        raise PipelineError(
            f"another process has held {database}-lock for over {SQLITE_INIT_LOCK_SECONDS} s while opening the "
            f"MLflow store {redact(uri)}; if none is running, delete that file."
        ) from None
    except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError) as error:
        # A server that passed the health check but cannot serve the API, or a file that is no database.
        reason = short(str(getattr(error, "orig", None) or getattr(error, "message", error)))
        raise PipelineError(
            f"the MLflow tracking store {redact(uri)} failed: {reason}. {fix_hint(uri)} Nothing was trained."
        ) from None
