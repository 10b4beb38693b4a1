"""How train records its MLflow run, and how report finds it again: by the SHA-256 of the test probabilities,
which DVC's run cache restores with the outputs of the run that first produced them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import PipelineError, redact
from pipeline.tracking import store, tags

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

HISTORY_PREFIX = "history/"  # MLflow's UI charts it as a section of its own, above the final figures.
RUN_OWN_PREFIXES = (HISTORY_PREFIX, "system/")  # A run's curves, which a run restored from it does not repeat.
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call.
MAX_PENDING_VALUES = 10_000  # ~0.7 s of SQLite writing; training waits beyond it.
STOP_GRACE_SECONDS = 2.0  # What a stopping stage gives the waiting values before it drops them.
SYSTEM_METRICS_SECONDS = 2  # MLflow's default, 10 s, leaves the seed's training (~10 s) without a sample.
TEST_PROBABILITIES_TAG = "pipeline.test_probabilities_sha256"
REPORT_TAG = "pipeline.report_sha256"
REPORT_ARTIFACTS = "report"
# "<host>:<pid>" of the train process: a RUNNING run whose process is gone is closed by the next training.
PROCESS_TAG = "pipeline.process"
CLOSED_TAG = "pipeline.closed_because"
# Extra run tags as a JSON object; a sweep sets "mlflow.parentRunId" there to nest its trials.
EXTRA_TAGS_VARIABLE = "PIPELINE_RUN_TAGS"

Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]  # {metric: (steps, values)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def timestamp_ms() -> int:
    return int(time.time() * 1000)


def dataset(folder: Path):
    """``folder`` as an MLflow dataset (the runs table's Dataset column): its path the source, DVC's hash the digest."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from mlflow.data import sources
    from mlflow.data.meta_dataset import MetaDataset

    # DVC's hash as dvc.lock records it; a dry run only hashes, leaving the object store it is given untouched.
    local = LocalFileSystem()
    _, _, tree = build(HashFileDB(local, folder.as_posix()), folder.as_posix(), local, "md5", dry_run=True)
    # MLflow defines its artifact sources at import time and leaves MetaDataset's profile abstract (None is its own).
    source = sources.LocalArtifactDatasetSource(folder.as_posix())  # type: ignore[attr-defined]
    return MetaDataset(source, name=folder.as_posix(), digest=str(tree.hash_info.value))  # type: ignore[abstract]


class TrainingRun:
    """The run train records into; one thread writes the per-step history meanwhile (why: ARCHITECTURE.md)."""

    def __init__(self, client: MlflowClient, run_id: str, check: Callable[[], None]) -> None:
        self.client, self.run_id, self.check = client, run_id, check
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        self.pending: deque[tuple[Future, int]] = deque()  # (a batch's future, its number of values)

    def pending_values(self) -> int:
        return sum(count for _, count in self.pending)

    def log_history(self, series: Series, started: float, ended: float) -> None:
        """Queue a chunk's history (step times interpolated), first waiting while over MAX_PENDING_VALUES wait."""
        from mlflow.entities import Metric

        self.check()
        self.wait(backlog=MAX_PENDING_VALUES)
        points = []
        for key, (steps, values) in series.items():
            first, last = min(steps, default=0), max(steps, default=0)
            for step, value in zip(steps, values):
                time_ms = int(1000 * (started + (step - first + 1) / (last - first + 1) * (ended - started)))
                points.append(Metric(HISTORY_PREFIX + key, float(value), time_ms, int(step)))
        for start in range(0, len(points), METRICS_PER_BATCH):
            batch = points[start : start + METRICS_PER_BATCH]
            self.pending.append(
                (self.writer.submit(self.client.log_batch, self.run_id, batch, synchronous=True), len(batch))
            )

    def wait(self, backlog: int = 0) -> None:
        while self.pending and (self.pending[0][0].done() or self.pending_values() > backlog):
            self._result(self.pending.popleft()[0])

    def abandon(self, grace: float) -> int:
        """Give the queued values ``grace`` seconds, drop the rest; how many were not written (in flight included)."""
        deadline = time.monotonic() + grace
        with contextlib.suppress(KeyboardInterrupt):  # A second Ctrl-C only cuts the grace short.
            for future, _ in self.pending:
                with contextlib.suppress(Exception):
                    future.exception(timeout=max(0.0, deadline - time.monotonic()))
        self.writer.shutdown(wait=False, cancel_futures=True)
        return sum(
            count for future, count in self.pending if future.cancelled() or not future.done() or future.exception()
        )

    def _result(self, future: Future) -> None:
        """Wait for a batch, checking on the server meanwhile (not futures.wait, which Ctrl-C can leave locked)."""
        import mlflow

        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                self.check()
            except mlflow.exceptions.MlflowException as error:
                raise store.failed("logging the training history to MLflow", error) from None


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> None:
    """Mark FAILED each RUNNING run whose train process, on this machine, is gone (other hosts cannot tell)."""
    import psutil  # installed with DVC

    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG, "")
        host, _, pid = owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_tag(run.info.run_id, CLOSED_TAG, f"its train process ({owner}) ended without closing the run")
            client.set_terminated(run.info.run_id, "FAILED")
            logger.warning("closed MLflow run %s as FAILED: the train process recording it had ended", run.info.run_id)


@contextlib.contextmanager
def training_run(
    uri: str,
    location: str | None,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    data: Mapping[str, str] | None = None,
    check: Callable[[], None] = lambda: None,
    data_folder: Path | None = None,
) -> Iterator[TrainingRun]:
    """A run with the project's tags (``data``: the md5 of each file read), ``params``, system metrics and
    ``data_folder`` as its training dataset; FAILED if it raises."""
    import mlflow

    extra = os.environ.get(EXTRA_TAGS_VARIABLE) or "{}"
    try:
        run_tags = {key: str(value) for key, value in json.loads(extra).items()}
    except (ValueError, AttributeError):
        raise PipelineError(
            f"${EXTRA_TAGS_VARIABLE} is not a JSON object of run tags: {store.short(extra, 100)}. Nothing was trained."
        ) from None
    client, experiment_id = store.open_store(uri, experiment, location)
    run_tags |= tags.run_tags(store.project_root(), data)
    try:
        close_abandoned_runs(client, experiment_id)
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_SECONDS)
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={**run_tags, PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"},
            log_system_metrics=True,
        )
        mlflow.log_params({key: str(value) for key, value in params.items()})
        if data_folder is not None:
            training_data = dataset(data_folder)
            try:
                mlflow.log_input(training_data, context="training")
            except mlflow.exceptions.MlflowException:
                # Two runs logging a new dataset at once (a sweep's trials) race to insert it on a server's database,
                # and the loser hits its unique key; on a second try it finds the dataset and links it.
                mlflow.log_input(training_data, context="training")
    except mlflow.exceptions.MlflowException as error:
        action = f"starting a run in the MLflow tracking store {redact(uri)}"
        raise store.failed(action, error, f"{store.fix_hint(uri)} Nothing was trained.") from None
    run = TrainingRun(client, active.info.run_id, check)
    try:
        yield run
        run.wait()
    except BaseException as error:
        lost = run.abandon(STOP_GRACE_SECONDS)
        outcome = "was marked FAILED"
        try:
            mlflow.end_run("FAILED")
        except mlflow.exceptions.MlflowException as failure:
            logger.warning("MLflow run %s could not be marked FAILED: %s", run.run_id, store.short(failure.message))
            outcome = "could not be marked FAILED"
        outcome += f"; {lost} values of its training history were not written" if lost else ""
        if isinstance(error, KeyboardInterrupt):  # pipeline.cli.run reports it, with this.
            raise KeyboardInterrupt(f"MLflow run {run.run_id} {outcome}") from None
        logger.warning("MLflow run %s %s.", run.run_id, outcome)
        raise
    try:
        mlflow.end_run("FINISHED")
    except mlflow.exceptions.MlflowException as error:
        raise store.failed(f"ending MLflow run {run.run_id}", error) from None


def find_training_run(client: MlflowClient, experiment_id: str, probabilities_sha256: str, uri: str) -> Run:
    """The newest finished run whose training wrote test probabilities with this digest."""
    import mlflow

    query = f"tags.`{TEST_PROBABILITIES_TAG}` = '{probabilities_sha256}' and attributes.status = 'FINISHED'"
    try:
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(
            f"searching the MLflow tracking store {redact(uri)} failed: {store.short(error.message)}"
        ) from None
    if not runs:
        raise PipelineError(
            f"no finished MLflow run in {redact(uri)} recorded the training that wrote these test probabilities "
            f"(SHA-256 {probabilities_sha256[:12]}…), so the report has no run to log into. This happens when "
            "the outputs came from another tracking store; rerun the train stage here (dvc repro -f train)."
        )
    return runs[0]
