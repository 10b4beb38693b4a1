"""The MLflow plumbing (pipeline.tracking): store, tags and run recording, against real SQLite stores."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, with_credentials
from pipeline_project import MlflowServer

from pipeline.cli import MASK, PipelineError
from pipeline.params import tracking_settings
from pipeline.tracking import record, store, tags

pytestmark = pytest.mark.slow

EXPERIMENT = "recorder-tests"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project directory as the working directory, with its own default SQLite store."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    for key in [key for key in os.environ if key.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(key)
    return tmp_path


def resolve(uri: str = ""):
    return store.resolve(tracking_settings({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}))


def open_run(run_name: str = "first", params: dict | None = None):
    return record.training_run(*resolve(), EXPERIMENT, run_name, params or {"train.seed": 0})


def client_for(project):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def history(steps: range) -> dict:
    return {"train_accuracy": (steps, [0.5] * len(steps)), "train_cross_entropy_sum": (steps, [9.0] * len(steps))}


def lock_store(project) -> sqlite3.Connection:
    """Hold the SQLite store's write lock, as a busy writer in another process would: MLflow's writes wait."""
    connection = sqlite3.connect(project / "mlflow.db", check_same_thread=False, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def test_a_run_records_params_tags_and_every_history_value_with_its_own_time(project):
    steps = list(range(1, 2501))
    values = [step / 10_000 for step in steps]
    with open_run(params={"train.seed": 3, "train.learning_rate": 0.003}) as run:
        run.log_history({"train_accuracy": (steps[:1500], values[:1500])}, 100.0, 115.0)
        second = {"train_accuracy": (steps[1500:], values[1500:]), "test_accuracy": ([2000, 2500], [0.5, 0.6])}
        run.log_history(second, 115.0, 125.0)
    client = client_for(project)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "first"
    assert logged.data.params == {"train.seed": "3", "train.learning_rate": "0.003"}
    points = sorted(client.get_metric_history(run.run_id, "history/train_accuracy"), key=lambda metric: metric.step)
    assert [metric.step for metric in points] == steps
    assert [metric.value for metric in points] == values
    # Each step's time is spread over its chunk: 2,500 points, not two shared timestamps.
    assert len({metric.timestamp for metric in points}) > 2000
    assert points[0].timestamp > 100_000 and points[1499].timestamp == 115_000 and points[-1].timestamp == 125_000
    assert [metric.step for metric in client.get_metric_history(run.run_id, "history/test_accuracy")] == [2000, 2500]
    assert logged.data.tags["env.python"].count(".") == 2 and logged.data.tags["git.commit"] == "unknown"


def test_the_readmes_mlflow_ui_link_opens_the_training_runs_with_their_dataset(project, browser):
    readme = (ROOT / "README.md").read_text()
    link = re.search(r"^uv run mlflow ui .*http://127\.0\.0\.1:5000(\S*)$", readme, re.MULTILINE)
    assert link is not None, "the README's first `mlflow ui` line names no page"
    (project / "data" / "processed").mkdir(parents=True)
    (project / "data" / "processed" / "images.npy").write_bytes(b"pixels")
    with record.training_run(*resolve(), EXPERIMENT, "first", {}, data_folder=Path("data/processed")) as run:
        pass
    logged = client_for(project).get_run(run.run_id)
    (dataset_input,) = logged.inputs.dataset_inputs  # test_pipeline checks its digest against dvc.lock's.
    with MlflowServer(project).running() as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url + link[1])
        # Its row in the runs table of the model-training view (GenAI's shows no runs table), with its dataset.
        page.get_by_text("first", exact=True).first.wait_for(timeout=120_000)
        page.get_by_text(f"data/processed ({dataset_input.dataset.digest})", exact=True).first.wait_for(timeout=60_000)
        assert page.get_by_text("Model registry", exact=True).count() == 1
        assert page.get_by_text("Evaluation runs", exact=True).count() == 0
        assert re.search(f"/experiments/{logged.info.experiment_id}/runs", page.url)


def test_a_store_that_takes_no_values_holds_training_back_at_the_bound_and_the_machine_is_sampled(project):
    """Memory stays bounded however slow the store: beyond MAX_PENDING_VALUES, logging waits."""
    client = client_for(project)
    with open_run("held back") as run:
        lock, queued = lock_store(project), []

        def train() -> None:
            for start in range(0, 15_000, 500):  # 30 chunks of 1,000 values
                run.log_history(history(range(start + 1, start + 501)), time.time(), time.time())
                queued.append(run.pending_values())

        trainer = threading.Thread(target=train)
        trainer.start()
        trainer.join(timeout=3)
        assert trainer.is_alive(), "logging did not wait for a store that took nothing"
        assert 0 < max(queued) <= record.MAX_PENDING_VALUES + 1000
        lock.rollback()
        trainer.join(timeout=60)
        assert max(queued) <= record.MAX_PENDING_VALUES + 1000
        for _ in range(600):  # MLflow's monitor samples every SYSTEM_METRICS_SECONDS; this waits a minute at most.
            if sampled := [key for key in client.get_run(run.run_id).data.metrics if key.startswith("system/")]:
                break
            time.sleep(0.1)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(sampled)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run.run_id, "history/train_accuracy")) == 15_000


def test_a_stop_gives_the_backlog_a_short_grace_then_counts_what_was_not_written(project):
    with pytest.raises(KeyboardInterrupt) as stopped, open_run("stopped") as run:
        lock = lock_store(project)
        run.log_history(history(range(1, 1501)), time.time(), time.time())
        # The store takes writes again after the grace, so that the run can be marked FAILED.
        threading.Timer(record.STOP_GRACE_SECONDS + 1, lock.rollback).start()
        interrupted = time.monotonic()
        raise KeyboardInterrupt
    took = time.monotonic() - interrupted
    expected = f"MLflow run {run.run_id} was marked FAILED; 3000 values of its training history were not written"
    assert str(stopped.value) == expected
    # The grace, then ending the run once the store answers; not the time to write a backlog.
    assert record.STOP_GRACE_SECONDS <= took < record.STOP_GRACE_SECONDS + 5
    assert client_for(project).get_run(run.run_id).info.status == "FAILED"


def test_an_error_marks_the_run_failed_after_logging_what_was_queued_and_the_report_skips_it(project):
    import mlflow

    for name in ("older", "newer"):
        with open_run(name):
            mlflow.set_tag(record.TEST_PROBABILITIES_TAG, "abc")
    with pytest.raises(RuntimeError), open_run("doomed") as run:
        mlflow.set_tag(record.TEST_PROBABILITIES_TAG, "abc")
        run.log_history({"train_accuracy": ([1, 2], [0.1, 0.2])}, time.time(), time.time())
        raise RuntimeError("training blew up")
    client, experiment_id = store.open_store(f"sqlite:///{project / 'mlflow.db'}", EXPERIMENT, None)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert len(client.get_metric_history(run.run_id, "history/train_accuracy")) == 2
    # The newest finished run with those probabilities, not the failed one.
    assert record.find_training_run(client, experiment_id, "abc", "here").info.run_name == "newer"


def test_unusable_stores_and_malformed_run_tags_stop_with_one_line_before_any_run(project, monkeypatch):
    with pytest.raises(PipelineError, match="which does not exist"):
        resolve(f"sqlite:///{project}/nowhere/mlflow.db")
    password = secrets.token_hex(8)
    with pytest.raises(PipelineError) as caught:
        resolve(with_credentials("http://127.0.0.1:9/", "admin", password))
    # The health check reached for 127.0.0.1 (not for a host named "admin:<password>@127.0.0.1").
    refused = "cannot be reached: [Errno 111] Connection refused"
    assert f"{with_credentials('http://127.0.0.1:9/', 'admin', MASK)} {refused}" in str(caught.value)
    assert password not in str(caught.value)
    for value in ("{not json", '["a list"]'):
        monkeypatch.setenv(record.EXTRA_TAGS_VARIABLE, value)
        with pytest.raises(PipelineError, match=r"^\$PIPELINE_RUN_TAGS is not a JSON object of run tags: "), open_run():
            pass
    assert not (project / "mlflow.db").exists()


def test_the_environment_and_the_models_requirements_name_the_locked_versions(project):
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package["name"]: package["version"] for package in lock["package"]}
    environment = tags.environment(ROOT)
    for label in ("keras", "numpy", "scikit-learn", "dvc", "mlflow"):
        assert environment[label] == locked[label], label
    assert environment["tensorflow"] in (locked.get("tensorflow-cpu"), locked.get("tensorflow"))
    assert environment["uv_lock_sha256"] == hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()
    assert tags.environment(project)["uv_lock_sha256"] == "none"
    requirements = dict(line.split("==") for line in tags.model_requirements())
    assert requirements.keys() & {"tensorflow", "tensorflow-cpu"}, requirements
    assert all(locked[name] == version for name, version in requirements.items()), requirements
