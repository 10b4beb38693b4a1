"""The train stage: the seed's batching and measurements, determinism, its run, and failures that stay clean."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
from conftest import run_module, stage_env, write_params

from benchmarks import numpy_reference
from pipeline.data import PERCENTILE_COLUMNS
from pipeline.params import TrainParams
from pipeline.score import flat, score
from pipeline.tracking.record import CLOSED_TAG
from pipeline.tracking.registry import RUN_VERSION_TAG
from pipeline.train import (
    MAX_CHUNK_INDICES,
    BatchOrder,
    History,
    final_metrics,
    longest_chunk,
    next_chunk_steps,
    progress_line,
    run_name,
)


@pytest.mark.parametrize(("num_examples", "batch_size", "iterations"), [(7, 3, 10), (10, 5, 9), (55_000, 100, 1200)])
def test_batch_order_is_the_seeds_next_batch_drawn_chunk_by_chunk_in_order(num_examples, batch_size, iterations):
    # The seed's next_batch, as the NumPy reference states it: shuffled epochs end to end, a batch across two.
    expected = numpy_reference.batch_order(num_examples, batch_size, iterations, 4)
    chunked = BatchOrder(num_examples, batch_size, iterations, seed=4)
    assert np.array_equal(np.concatenate([chunked[0:7], chunked[7:8], chunked[8:iterations]]), expected)
    with pytest.raises(ValueError, match="in order"):
        chunked[5:6]
    # Another seed draws other batches.
    assert not np.array_equal(BatchOrder(num_examples, batch_size, iterations, seed=5)[:iterations], expected)


def test_chunks_grow_to_what_the_pace_fits_in_half_a_second_and_stay_bounded():
    # At most twice the last plan, however fast the steps ran: the first chunk's time includes compiling.
    assert next_chunk_steps(1, 1, 1e-6, 1000) == 2 and next_chunk_steps(512, 489, 1e-3, 1000) == 1000
    # A slow pace (conv_batchnorm's 30 steps a second) shrinks the next chunk; never below one step.
    assert next_chunk_steps(64, 64, 2.0, 1000) == 16 and next_chunk_steps(4, 1, 100.0, 1000) == 1
    # Large batches give shorter chunks, of bounded size.
    assert longest_chunk(10_000, 100) == 1000 and longest_chunk(250, 100) == 250 and longest_chunk(10, 10**8) == 1
    assert longest_chunk(10_000, 55_000) * 55_000 <= MAX_CHUNK_INDICES < (longest_chunk(10_000, 55_000) + 1) * 55_000


def test_history_files_final_metrics_and_run_names():
    history = History()
    nan, percentiles = np.full(8, np.nan, np.float32), np.arange(8, dtype=np.float32)
    weights, biases = np.stack([nan, percentiles, percentiles]), np.stack([nan, percentiles / 10, percentiles])
    # Batch accuracy and cross-entropy at steps 1-3, and the test set's, measured at steps 2 and 3.
    measured = np.float32([[0.5, 0.75, 0.8], [20, 10, 7], [np.nan, 0.95, 0.93], [np.nan, 300, 250]])
    series = history.add(np.array([1, 2, 3]), *measured, weights, biases)
    assert series["test_accuracy"] == ([2, 3], [np.float32(0.95), np.float32(0.93)])
    train_csv, test_csv, percentiles_csv = [list(csv.DictReader(io.StringIO(text))) for text in history.csv_files()]
    assert [row["step"] for row in train_csv] == ["1", "2", "3"] and train_csv[1]["train_cross_entropy_sum"] == "10.0"
    # float64, whose shortest repr reads back as the very float32 measured.
    accuracy = repr(float(np.float32(0.95)))
    assert test_csv[0] == {"step": "2", "test_accuracy": accuracy, "test_cross_entropy_sum": "300.0"}
    assert list(percentiles_csv[0]) == PERCENTILE_COLUMNS
    assert float(percentiles_csv[0]["biases_p14"]) == pytest.approx(0.1)
    metrics = final_metrics(history)
    assert metrics["max_test_accuracy"] == pytest.approx(0.95) and metrics["max_test_accuracy_step"] == 2
    # The final test figures are report's (metrics.json) and test_history.csv's last row, not train.json's.
    names = ["final_train_accuracy", "final_train_cross_entropy_sum", "max_test_accuracy", "max_test_accuracy_step"]
    assert list(metrics) == names
    # 3 of 10 steps in 1.5 s: 2 steps a second, 3.5 s left; the test set as measured last.
    line = progress_line(history, 3, 10, 1.5)
    assert line == "step 3 of 10 (2 steps/s, 00:03 left): test accuracy 0.9300, test cross-entropy 250.00"
    settings = {"seed": 0, "learning_rate": 0.01, "batch_size": 100, "iterations": 10000, "eval_interval": 100}
    # The other models do not train at train.learning_rate, so their name replaces it (the softmax's: test_pipeline.py).
    assert run_name(TrainParams(model="conv", **settings)) == "conv bs=100 it=10000 seed=0"


# ---------------------------------------------------------------------------------------------
# The stage as DVC runs it, on a tiny processed data set.

OUTPUTS = {
    "model": "models/model.keras",
    "test-probabilities": "models/p.npy",
    "weight-maps": "models/maps.npy",
    "train-history": "metrics/train_history.csv",
    "test-history": "metrics/test_history.csv",
    "parameter-percentiles": "metrics/percentiles.csv",
    "metrics": "metrics/train.json",
}
TRAIN_ARGS = ["--data", "processed", *(part for flag, path in OUTPUTS.items() for part in (f"--{flag}", path))]
TINY = {"batch_size": 10, "iterations": 60, "eval_interval": 20}  # As processed_project writes them.


def tracking_env(project, **extra):
    return stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", **extra)


def start_training(project, env=None, **params) -> subprocess.Popen:
    write_params(project, preprocess={"validation_size": 50}, train={**TINY, **params})
    command = [sys.executable, "-m", "pipeline.train", *TRAIN_ARGS]
    return subprocess.Popen(command, cwd=project, env=env or tracking_env(project), stderr=subprocess.PIPE, text=True)


def runs(store):
    """The client of ``store`` (a tracking URI, or a project's default SQLite store) and its runs, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store if isinstance(store, str) else f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-softmax")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


# Seconds from SIGTERM to the end of a stopped train stage: a chunk (half a second), the logging
# backlog's grace (2 s) and the interpreter's exit (1-2 s on a loaded machine), with a margin.
STOP_SECONDS = 10


def test_stage_stops_promptly_closes_a_killed_run_writes_outputs_and_a_run_and_reruns_to_the_same_bytes(
    processed_project,
):
    # Stopped by SIGTERM while its history is being logged: promptly, the run FAILED, the earlier outputs kept.
    (processed_project / "metrics").mkdir()
    (processed_project / "metrics/train_history.csv").write_text("an earlier history\n")
    process = start_training(processed_project, iterations=2_000_000, eval_interval=1000)
    progress = next(line for line in process.stderr if "step 1000 of 2000000 (" in line)
    assert "steps/s" in progress and " left): " in progress, progress
    client, (stopped_run,) = runs(processed_project)
    deadline = time.monotonic() + 120
    while not client.get_metric_history(stopped_run.info.run_id, "history/train_accuracy"):
        assert time.monotonic() < deadline, "no history was logged"
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    stderr = process.communicate(timeout=60)[1]
    took, message = time.monotonic() - stopped, " ".join(stderr.split())
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert took < STOP_SECONDS, f"the stage took {took:.1f} s to stop"
    assert "interrupted; stopped, and no partial output was left behind" in message and "was marked FAILED" in message
    assert (processed_project / "metrics/train_history.csv").read_text() == "an earlier history\n"
    left = [path.name for path in processed_project.rglob("*") if path.name.startswith(".") and ".tmp" in path.name]
    assert left == [] and not (processed_project / "metrics/test_history.csv").exists()
    # SIGKILL leaves no chance to end the run; the next train on the same store marks it FAILED.
    process = start_training(processed_project, iterations=2_000_000, eval_interval=1000)
    next(line for line in process.stderr if "step 1000 of 2000000 (" in line)
    process.kill()
    process.communicate(timeout=60)
    client, (stopped_run, killed) = runs(processed_project)
    assert (stopped_run.info.status, killed.info.status) == ("FAILED", "RUNNING")
    write_params(processed_project, preprocess={"validation_size": 50}, train=TINY)
    # A rerun writes the same bytes; exiting normally, TensorFlow removes its temp files (AutoGraph's too).
    temp = processed_project / "tmp"
    temp.mkdir()
    results, outputs = [], []
    for attempt in range(2):
        env = tracking_env(processed_project, TMPDIR=str(temp))
        results.append(run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=env))
        assert results[-1].returncode == 0, results[-1].stderr
        assert list(temp.iterdir()) == [], f"run {attempt + 1} left files in the temp folder"
        outputs.append({path: (processed_project / path).read_bytes() for path in OUTPUTS.values()})
    assert outputs[0] == outputs[1] and f"closed MLflow run {killed.info.run_id} as FAILED" in results[0].stderr
    assert "linked, not registered again" in results[1].stderr
    closed = client.get_run(killed.info.run_id)
    assert closed.info.status == "FAILED" and "ended without closing the run" in closed.data.tags[CLOSED_TAG]
    final = json.loads((processed_project / "metrics/train.json").read_text())
    probabilities = np.load(processed_project / "models/p.npy")
    assert probabilities.shape == (50, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    _, (_, _, run, rerun) = runs(processed_project)
    assert run.info.status == rerun.info.status == "FINISHED"
    # Its end links its page, as `mlflow ui` serves the local store.
    page = f"at: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType="
    assert page in results[0].stdout
    # The run carries the environment (its history metrics: test_pipeline.py; its digest: test_experiments.py).
    environment = dict(final["environment"])  # [name, value] pairs, which `dvc exp show` leaves out.
    assert environment["keras"] == run.data.tags["env.keras"] and run.data.params["train.batch_size"] == "10"
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"train_history.csv", "test_history.csv", "percentiles.csv"} <= logged
    # The gate's metrics, logged by train itself so that no registry version lacks them whatever DVC
    # restores of report from its cache; the run names its version.
    labels = np.load(processed_project / "processed/test_labels.npy").argmax(axis=1)
    for name, value in flat(score(labels, probabilities)).items():
        assert run.data.metrics[name] == value, name
    (version,) = client.search_model_versions("name = 'mnist-softmax'")
    assert version.run_id == run.info.run_id
    assert run.data.tags[RUN_VERSION_TAG] == rerun.data.tags[RUN_VERSION_TAG] == "models:/mnist-softmax/1"
    # The data tags are the md5 of the files train read (DVC's hash of a file), not dvc.lock's claims.
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        md5 = hashlib.md5((processed_project / f"processed/{split}.npy").read_bytes()).hexdigest()
        assert run.data.tags[f"data.processed/{split}.npy"] == md5 == version.tags[f"data.processed/{split}.npy"]


# Missing or damaged processed data: test_preprocess.py (load_processed, which train calls first).
BAD_INPUT = {
    "batch too large": (
        partial(write_params, preprocess={"validation_size": 50}, train={"batch_size": 251}),
        ["train.batch_size (251) is larger than the training set (250 images)"],
    ),
    "diverging": (
        partial(write_params, preprocess={"validation_size": 50}, train={**TINY, "learning_rate": 1.0e38}),
        ["training diverged", "at step", "smaller train.learning_rate"],
    ),
    "artifact folder is a file": (
        lambda project: (project / "mlartifacts").write_text("not a folder"),
        ["mlartifacts is a file, not a folder", "Nothing was trained"],
    ),
    "damaged store": (
        lambda project: (project / "mlflow.db").write_bytes(b"this is not an SQLite database" * 100),
        ["mlflow.db is damaged, move it aside", "Nothing was trained"],
    ),
}


@pytest.mark.parametrize(("spoil", "phrases"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_stops_the_stage_with_one_paragraph_and_writes_nothing(processed_project, spoil, phrases):
    spoil(processed_project)
    # The default store (mlflow.db with mlartifacts beside it, at the project root).
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=stage_env())
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(phrase in message for phrase in phrases), message
    assert [*processed_project.glob("models/*"), *processed_project.glob("metrics/*")] == []
    if "training diverged" not in message:
        assert "step " not in message, "training ran before the input was found unusable"
    else:
        assert [run.info.status for run in runs(processed_project)[1]] == ["FAILED"]
