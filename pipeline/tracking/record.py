"""How a run is recorded, and how the report stage finds the run that produced its inputs.

One pipeline run is one MLflow run. Train opens it with MLflow's own ``start_run`` (which ends it
FINISHED, or FAILED when the stage raises or is interrupted), has a background thread write the
per-step history while the training loop runs, then logs the model and the final metrics. It tags
the run with the SHA-256 of the test-set probabilities it hands to report.

Report finds the run by that tag, not by an id stored in a DVC output: the same inputs give the
same probabilities, so DVC's outputs stay free of run ids, and a train stage restored from DVC's run
cache points report to the run that first produced those outputs. Report logs into the run only
what it has not logged there before, and never changes the run's status or times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from pipeline.cli import PipelineError, redact
from pipeline.tracking import store, tags

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

logger = logging.getLogger(__name__)

# The per-step histories are logged under this prefix and the history files' column names
# (history/train_accuracy…). MLflow's UI draws each prefix as a section of charts of its own, above
# the unprefixed metrics, so the training curves come first rather than below twenty one-point bar
# charts of final figures.
HISTORY_PREFIX = "history/"
# MLflow accepts at most 1,000 metric values per log_batch call.
METRICS_PER_BATCH = 1000
# At most this many history values wait to be written; training waits for the oldest beyond it, so
# memory stays bounded whatever the number of steps and however slow the store. It is about 0.7 s
# of writing to the local SQLite store (14,000 values/s measured) and a few MB, and five 1,000-step
# chunks of the seed, enough to keep the store busy while training runs.
MAX_PENDING_VALUES = 10_000
# How long a stage that stops (Ctrl-C, SIGTERM, an error) gives the values still waiting before it
# drops them and ends the run: long enough for the local store to write MAX_PENDING_VALUES.
STOP_GRACE_SECONDS = 2.0
# Tags that link the stages' files to the run: train sets the first, report the second.
TEST_PROBABILITIES_TAG = "pipeline.test_probabilities_sha256"
REPORT_TAG = "pipeline.report_sha256"
# The run's artifact folder for the report's files (metrics.json among them, which the metric gate
# reads as the champion's baseline).
REPORT_ARTIFACTS = "report"
# The process recording a run ("<host>:<pid>"), so that a run left RUNNING by a train process that
# died without closing it (killed outright, its machine restarted) is recognised and closed as
# FAILED the next time train opens the store, with the reason in CLOSED_TAG.
PROCESS_TAG = "pipeline.process"
CLOSED_TAG = "pipeline.closed_because"
# Extra tags for the run, as a JSON object, from whatever launched the stage: a sweep sets
# MLflow's own "mlflow.parentRunId" there, which nests the run under the sweep's run in the UI.
EXTRA_TAGS_VARIABLE = "PIPELINE_RUN_TAGS"

# {metric name: (steps, values)}
Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metric_points(series: Series, started: float, ended: float) -> list[Metric]:
    """MLflow metric points for one chunk of training that ran from ``started`` to ``ended`` (seconds).

    The steps of a chunk run inside one compiled TensorFlow loop, so their own times are not known;
    each point gets a time interpolated linearly by step across the chunk, which is what MLflow's
    "relative time" axis needs to draw the curve over the time training really took.
    """
    from mlflow.entities import Metric

    points = []
    for key, (steps, values) in series.items():
        first, last = min(steps, default=0), max(steps, default=0)
        for step, value in zip(steps, values):
            share = (step - first + 1) / (last - first + 1)
            timestamp_ms = int(1000 * (started + share * (ended - started)))
            points.append(Metric(key, float(value), timestamp_ms, int(step)))
    return points


class TrainingRun:
    """The run train records into: per-step history written by a background thread, everything else at once.

    MLflow's own asynchronous logging would do the writing, but its queue has no bound and is
    always written out in full before the process exits, so a stopped stage would wait for it.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        # One thread writes the batches in the order they were queued: (batch's future, its values).
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        self.pending: deque[tuple[Future, int]] = deque()

    def pending_values(self) -> int:
        return sum(count for _, count in self.pending)

    def log_history(self, series: Series, started: float, ended: float) -> None:
        """Queue one chunk's history for writing; first wait for the oldest while MAX_PENDING_VALUES wait."""
        while self.pending and (self.pending[0][0].done() or self.pending_values() > MAX_PENDING_VALUES):
            self._result(self.pending.popleft()[0])
        points = metric_points(series, started, ended)
        for start in range(0, len(points), METRICS_PER_BATCH):
            batch = points[start : start + METRICS_PER_BATCH]
            future = self.writer.submit(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)
            self.pending.append((future, len(batch)))

    def wait(self) -> None:
        """Wait until every queued value is in the store; raise if any could not be logged."""
        while self.pending:
            self._result(self.pending.popleft()[0])

    def abandon(self, grace: float) -> int:
        """Give the queued values ``grace`` seconds, then drop the rest; return how many were not written.

        A batch being written when the grace ends is counted too, although it may still arrive.
        """
        # A second Ctrl-C or SIGTERM only cuts the grace short.
        with contextlib.suppress(KeyboardInterrupt):
            wait([future for future, _ in self.pending], timeout=grace)
        self.writer.shutdown(wait=False, cancel_futures=True)
        return sum(
            count
            for future, count in self.pending
            if not future.done() or future.cancelled() or future.exception() is not None
        )

    @staticmethod
    def _result(future: Future) -> None:
        import mlflow

        try:
            future.result()
        except mlflow.exceptions.MlflowException as error:
            raise PipelineError(
                f"logging the training history to MLflow failed: {store.short(error.message)}"
            ) from None


def extra_tags() -> dict[str, str]:
    """The tags in $PIPELINE_RUN_TAGS (a JSON object of strings), checked before any training."""
    text = os.environ.get(EXTRA_TAGS_VARIABLE, "")
    if not text:
        return {}
    try:
        found = json.loads(text)
    except json.JSONDecodeError as error:
        raise PipelineError(f"${EXTRA_TAGS_VARIABLE} is not valid JSON ({error}): {text[:200]!r}") from None
    if not isinstance(found, dict) or not all(isinstance(value, str) for value in found.values()):
        raise PipelineError(f"${EXTRA_TAGS_VARIABLE} must be a JSON object of strings, not {text[:200]!r}.")
    return found


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # It exists, as another user's process.
    return True


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs whose train process, on this machine, no longer exists.

    Runs recorded from other machines (a shared server) are left alone: only their own machine can
    tell whether their process still runs.
    """
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, CLOSED_TAG, f"its train process ({owner}) ended without closing the run")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def training_run(
    uri: str,
    location: str | None,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    data: Mapping[str, str] | None = None,
) -> Iterator[TrainingRun]:
    """Open the store, start a new run with the project's tags and ``params``, and end it on exit.

    ``data``: the md5 of each data file the run trains on, by path (tagged ``data.<path>``).
    """
    import mlflow

    client, experiment_id = store.open_store(uri, experiment, location)
    run_tags = {
        **extra_tags(),
        **tags.run_tags(store.project_root(), data),
        PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}",
    }
    try:
        for run_id in close_abandoned_runs(client, experiment_id):
            logger.warning("closed MLflow run %s as FAILED: the train process recording it had ended", run_id)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags)
        mlflow.log_params({key: str(value) for key, value in params.items()})
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(
            f"starting a run in the MLflow tracking store {redact(uri)} failed: {store.short(error.message)} "
            f"{store.fix_hint(uri)} Nothing was trained."
        ) from None
    # The run ends FINISHED, or FAILED if the block raises (Ctrl-C and SIGTERM included: the stage
    # turns both into KeyboardInterrupt), as start_run's own context would end it; but a store that
    # cannot take the FAILED status does not hide the error that stopped the block. A stopping
    # stage does not wait for the store to write everything still queued, only STOP_GRACE_SECONDS.
    run = TrainingRun(client, active.info.run_id)
    try:
        yield run
    except BaseException as error:
        lost = run.abandon(STOP_GRACE_SECONDS)
        outcome = "was marked FAILED"
        try:
            mlflow.end_run("FAILED")
        except mlflow.exceptions.MlflowException as failure:
            logger.warning("MLflow run %s could not be marked FAILED: %s", run.run_id, store.short(failure.message))
            outcome = "could not be marked FAILED"
        lost_note = f"; {lost} values of its training history were not written" if lost else ""
        # Interruptions are reported by pipeline.cli.run, which says this too.
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(f"MLflow run {run.run_id} {outcome}{lost_note}") from None
        if lost:
            logger.warning("MLflow run %s %s%s.", run.run_id, outcome, lost_note)
        raise
    # Values still queued are sent before the run ends.
    run.wait()
    try:
        mlflow.end_run("FINISHED")
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(
            f"ending MLflow run {run.run_id} failed: {store.short(error.message)} The stage wrote no output."
        ) from None


def find_training_run(client: MlflowClient, experiment_id: str, probabilities_sha256: str, uri: str) -> Run:
    """The newest finished run whose training wrote test probabilities with this digest."""
    import mlflow

    try:
        runs = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{TEST_PROBABILITIES_TAG}` = '{probabilities_sha256}' and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
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


def timestamp_ms() -> int:
    return int(time.time() * 1000)
