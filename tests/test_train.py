"""The train stage: the seed's batching, its measurements, determinism, and failures that stay clean."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_module, stage_env, write_params
from idx_fixtures import write_mnist

from pipeline.data import PERCENTILE_COLUMNS, PERCENTILES
from pipeline.score import flat, score
from pipeline.tracking.registry import RUN_VERSION_TAG
from pipeline.train import (
    MAX_CHUNK_INDICES,
    BatchOrder,
    History,
    batch_order,
    longest_chunk,
    next_chunk_steps,
    percentiles_csv,
    run_name,
    train,
    train_history_csv,
)
from pipeline.train import (
    test_history_csv as evaluation_history_csv,
)


class NextBatch:
    """A literal port of TensorFlow's old DataSet.next_batch, the seed's batching, for comparison."""

    def __init__(self, num_examples: int, rng: np.random.Generator) -> None:
        self.num_examples, self.rng = num_examples, rng
        self.permutation = None
        self.index_in_epoch = 0

    def next(self, batch_size: int) -> np.ndarray:
        if self.permutation is None:
            self.permutation = self.rng.permutation(self.num_examples)
        start = self.index_in_epoch
        if start + batch_size > self.num_examples:
            rest = self.permutation[start:]
            self.permutation = self.rng.permutation(self.num_examples)
            self.index_in_epoch = batch_size - len(rest)
            return np.concatenate([rest, self.permutation[: self.index_in_epoch]])
        self.index_in_epoch += batch_size
        return self.permutation[start : self.index_in_epoch]


@pytest.mark.parametrize(("num_examples", "batch_size", "iterations"), [(7, 3, 10), (10, 5, 9), (55_000, 100, 1200)])
def test_batch_order_matches_next_batch(num_examples, batch_size, iterations):
    reference = NextBatch(num_examples, np.random.default_rng(4))
    expected = np.stack([reference.next(batch_size) for _ in range(iterations)])
    assert np.array_equal(batch_order(num_examples, batch_size, iterations, seed=4), expected)


def test_batch_order_covers_each_epoch_once_and_depends_on_the_seed():
    order = batch_order(55_000, 100, 550, seed=0)
    assert sorted(order.ravel().tolist()) == list(range(55_000))
    assert not np.array_equal(order, batch_order(55_000, 100, 550, seed=1))


def test_batch_order_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 11, 1, 0)
    with pytest.raises(ValueError, match="iterations"):
        batch_order(10, 5, 0, 0)


def test_batch_order_drawn_chunk_by_chunk_is_the_same_order():
    whole = batch_order(1000, 300, 50, seed=3)
    order = BatchOrder(1000, 300, 50, seed=3)
    assert np.array_equal(np.concatenate([order[0:7], order[7:8], order[8:50]]), whole)


def test_batch_order_refuses_steps_out_of_order():
    order = BatchOrder(1000, 300, 50, seed=3)
    order[0:5]
    with pytest.raises(ValueError, match="in order"):
        order[0:5]


def test_chunks_grow_from_one_step_to_what_the_pace_fits_in_half_a_second():
    # At most twice the last plan, however fast the steps ran: the first chunk's time includes compiling.
    assert next_chunk_steps(1, 1, 1e-6, 1000) == 2
    assert next_chunk_steps(512, 489, 1e-3, 1000) == 1000
    # A slow pace (conv_batchnorm's 30 steps a second) shrinks the next chunk to half a second's worth.
    assert next_chunk_steps(64, 64, 2.0, 1000) == 16
    # Never fewer than one step, however long one took.
    assert next_chunk_steps(4, 1, 100.0, 1000) == 1


def test_large_batches_give_shorter_chunks_of_bounded_size():
    assert longest_chunk(10_000, 100) == 1000 and longest_chunk(250, 100) == 250
    assert longest_chunk(10_000, 55_000) * 55_000 <= MAX_CHUNK_INDICES < (longest_chunk(10_000, 55_000) + 1) * 55_000
    assert longest_chunk(10, 20_000_000) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("name", "iterations"), [("softmax", 1100), ("conv_batchnorm", 30)])
def test_chunks_depend_on_the_pace_but_the_numbers_do_not(name, iterations):
    """One step per chunk, or chunks doubling up to each printed line: the same numbers, bit for bit,
    with XLA (softmax) and without (conv_batchnorm, with dropout and batch normalisation)."""
    import keras

    from pipeline.model import SERIES, SgdTrainer, build_model

    runs = []
    for chunk_seconds in (1e-9, 1e9):
        keras.utils.set_random_seed(0)
        model = build_model(0, name)
        series = SERIES[name]
        trainer = SgdTrainer(model, series.optimizer(0.003), *small_data(), jit_compile=series.jit_compile)
        ends: list[int] = []
        record_end = lambda first, last, *_, ends=ends: ends.append(last)  # noqa: E731
        history = train(trainer, BatchOrder(400, 20, iterations, 0), 10, record_end, chunk_seconds)
        runs.append((ends, history, model.get_weights()))
    (one_step_ends, one_step, one_step_weights), (ends, grown, weights) = runs
    assert one_step_ends == list(range(1, iterations + 1))
    if iterations > 1000:
        assert ends == [1, 3, 7, 15, 31, 63, 127, 255, 511, 1000, iterations]
    for first, second in zip(one_step.train_series(), grown.train_series()):
        assert np.array_equal(first, second)
    assert one_step.test_steps == grown.test_steps == list(range(10, iterations + 1, 10))
    assert one_step.test_cross_entropy == grown.test_cross_entropy
    assert all(np.array_equal(a, b) for a, b in zip(one_step_weights, weights))


def test_run_name_says_what_differs():
    from pipeline.params import TrainParams

    settings = {"seed": 0, "learning_rate": 0.01, "batch_size": 100, "iterations": 10000, "eval_interval": 100}
    assert run_name(TrainParams(model="softmax", **settings)) == "lr=0.01 bs=100 it=10000 seed=0"
    # The other models do not train at train.learning_rate, so their name replaces it.
    assert run_name(TrainParams(model="conv", **settings)) == "conv bs=100 it=10000 seed=0"


def test_final_metrics_hold_the_best_test_accuracy_and_its_step():
    from pipeline.train import final_metrics

    history = History([np.array([0.5, 0.75, 0.8], np.float32)], [np.array([9.0, 8.0, 7.0], np.float32)],
                      [1, 2, 3], [0.9, 0.95, 0.93], [30.0, 20.0, 25.0])  # fmt: skip
    metrics = final_metrics(history)
    assert metrics["max_test_accuracy"] == 0.95 and metrics["max_test_accuracy_step"] == 2
    assert metrics["final_test_accuracy"] == 0.93


def test_each_history_file_has_its_own_steps_and_no_empty_cell():
    history = History(
        [np.array([0.5, 0.75], np.float32)],
        [np.array([20.0, 10.0], np.float32)],
        [2],
        [0.8],
        [300.0],
        [np.arange(8, dtype=np.float32)],
        [np.arange(8, dtype=np.float32) / 10],
    )
    train_rows = list(csv.DictReader(io.StringIO(train_history_csv(history))))
    assert [row["step"] for row in train_rows] == ["1", "2"]
    assert float(train_rows[1]["train_cross_entropy_sum"]) == 10.0
    test_rows = list(csv.DictReader(io.StringIO(evaluation_history_csv(history))))
    assert test_rows == [{"step": "2", "test_accuracy": repr(0.8), "test_cross_entropy_sum": "300.0"}]
    (percentile_row,) = csv.DictReader(io.StringIO(percentiles_csv(history)))
    assert list(percentile_row) == PERCENTILE_COLUMNS
    assert percentile_row["step"] == "2" and float(percentile_row["weights_p100"]) == 7.0
    assert float(percentile_row["biases_p14"]) == pytest.approx(0.1)
    assert all(value != "" for row in [*train_rows, *test_rows, percentile_row] for value in row.values())


def test_percentiles_recorded_in_the_loop_are_numpys_of_the_weights_and_biases_then():
    """At each evaluation the loop records the percentiles of every weight and every bias as they are
    after that step; the last ones are numpy.percentile of the final variables."""
    history, weights = train_once(iterations=100)
    final_kernel, final_bias = weights
    np.testing.assert_allclose(history.weight_percentiles[-1], np.percentile(final_kernel, PERCENTILES), atol=1e-6)
    np.testing.assert_allclose(history.bias_percentiles[-1], np.percentile(final_bias, PERCENTILES), atol=1e-6)
    assert len(history.weight_percentiles) == len(history.test_steps) == 2
    # The weights moved between the two evaluations, and so did their spread.
    assert not np.array_equal(history.weight_percentiles[0], history.weight_percentiles[1])


def test_parameter_groups_and_weight_maps_of_the_softmax_and_of_a_deeper_model():
    import keras

    from pipeline.model import build_model, parameter_groups, weight_maps

    model = build_model(0)
    weights, biases = parameter_groups(model)
    assert [tuple(variable.shape) for variable in weights] == [(784, 10)]
    assert [tuple(variable.shape) for variable in biases] == [(10,)]
    maps = weight_maps(model)
    kernel = model.get_weights()[0]
    # Map d, pixel (row, column) is the weight from pixel 28 * row + column to class d.
    assert maps.shape == (10, 28, 28) and maps[3, 2, 5] == kernel[28 * 2 + 5, 3]

    deeper = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 5), keras.layers.BatchNormalization(),
         keras.layers.Flatten(), keras.layers.Dense(10)]
    )  # fmt: skip
    weights, biases = parameter_groups(deeper)
    assert [tuple(variable.shape) for variable in weights] == [(5, 5, 1, 4), (2304, 10)]
    assert sorted(variable.name for variable in biases) == ["beta", "bias", "bias"]
    assert weight_maps(deeper).shape == (0, 28, 28)


def small_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    # Labels that depend on the pixels, so that the model can learn something.
    train_images = rng.integers(0, 256, size=(400, 784), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(100, 784), dtype=np.uint8)
    label = lambda images: images[:, :10].astype(int).argmax(axis=1)  # noqa: E731
    eye = np.eye(10, dtype=np.uint8)
    return train_images, eye[label(train_images)], test_images, eye[label(test_images)]


def train_once(seed: int = 0, iterations: int = 120):
    import keras

    from pipeline.model import SgdTrainer, build_model

    keras.utils.set_random_seed(seed)
    model = build_model(seed)
    trainer = SgdTrainer(model, 0.003, *small_data())
    history = train(trainer, BatchOrder(400, 20, iterations, seed), eval_interval=50)
    return history, model.get_weights()


@pytest.mark.slow
def test_same_params_give_identical_history_and_weights():
    first_history, first_weights = train_once()
    second_history, second_weights = train_once()
    for first, second in zip(first_history.train_series(), second_history.train_series()):
        assert np.array_equal(first, second)
    assert first_history.test_accuracy == second_history.test_accuracy
    assert first_history.test_cross_entropy == second_history.test_cross_entropy
    assert all(np.array_equal(a, b) for a, b in zip(first_weights, second_weights))
    assert first_history.test_steps == [50, 100]
    # A different seed starts elsewhere, so the numbers differ.
    _, other_weights = train_once(seed=1)
    assert not np.array_equal(first_weights[0], other_weights[0])


@pytest.mark.slow
def test_the_users_model_takes_raw_pixels_and_gives_the_trained_probabilities_bit_for_bit(tmp_path):
    import keras

    from pipeline.data import scale_pixels
    from pipeline.model import SgdTrainer, build_model, raw_pixel_model, save_model

    keras.utils.set_random_seed(0)
    model = build_model(0)
    train_images, train_labels, test_images, test_labels = small_data()
    trainer = SgdTrainer(model, 0.003, train_images, train_labels, test_images, test_labels)
    train(trainer, batch_order(400, 20, 60, 0), eval_interval=50)

    users = raw_pixel_model(model)
    # The same float32 inputs reach the trained layer, so not a bit differs.
    assert np.array_equal(users(test_images).numpy(), model(scale_pixels(test_images)).numpy())
    assert np.array_equal(users(test_images).numpy(), trainer.test_probabilities())
    # Saved as train saves it: byte-deterministic, and loaded back as a model of uint8 pixels.
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    save_model(users, first)
    save_model(raw_pixel_model(model), second)
    assert first.read_bytes() == second.read_bytes()
    loaded = keras.saving.load_model(first)
    assert loaded.inputs[0].dtype == "uint8"
    assert np.array_equal(loaded(test_images).numpy(), trainer.test_probabilities())


def test_initial_weights_follow_the_seed():
    from pipeline.model import build_model

    weights, biases = build_model(0).get_weights()
    assert weights.shape == (784, 10) and biases.shape == (10,)
    assert np.all(biases == 0)
    # A truncated normal with stddev 0.1 never strays beyond two standard deviations.
    assert np.abs(weights).max() <= 0.2 and 0.07 < weights.std() < 0.1


@pytest.mark.slow
def test_training_lowers_the_loss():
    history, _ = train_once(iterations=200)
    _, cross_entropy = history.train_series()
    assert cross_entropy[-20:].mean() < cross_entropy[:20].mean()


TRAIN_ARGS = [
    "--data",
    "processed",
    "--model",
    "models/model.keras",
    "--test-probabilities",
    "models/p.npy",
    "--weight-maps",
    "models/maps.npy",
    "--train-history",
    "metrics/train_history.csv",
    "--test-history",
    "metrics/test_history.csv",
    "--parameter-percentiles",
    "metrics/percentiles.csv",
    "--metrics",
    "metrics/train.json",
]


@pytest.fixture
def processed_project(tmp_path):
    write_mnist(tmp_path / "raw", train_count=300, test_count=50, gz=False)
    write_params(
        tmp_path, preprocess={"validation_size": 50}, train={"batch_size": 10, "iterations": 60, "eval_interval": 20}
    )
    assert run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path).returncode == 0
    return tmp_path


def tracking_env(project):
    return stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")


def test_missing_processed_data_is_a_clear_error(tmp_path):
    write_params(tmp_path)
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=tmp_path, env=tracking_env(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train_images.npy does not exist; run the preprocess stage first" in " ".join(result.stderr.split())
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_labels_that_are_not_one_hot_stop_training_before_it_starts(tmp_path):
    """Labels rewritten in place (which DVC need not notice) are refused, not trained on."""
    write_params(tmp_path)
    (tmp_path / "processed").mkdir()
    labels = np.eye(10, dtype=np.uint8)[np.arange(30) % 10]
    labels[4] = 0
    for split, count in (("train", 30), ("test", 10)):
        np.save(tmp_path / f"processed/{split}_images.npy", np.zeros((count, 784), np.uint8))
        np.save(tmp_path / f"processed/{split}_labels.npy", labels[:count])
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=tmp_path, env=tracking_env(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert (
        "processed/train_labels.npy holds labels that are not one-hot (a single 1 among 0s) in 1 of its 30 rows, "
        in message
    )
    assert "the first row 4: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]" in message and "dvc repro -f preprocess" in message
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


def test_batch_larger_than_the_real_training_set_is_a_clear_error(processed_project):
    write_params(processed_project, preprocess={"validation_size": 50}, train={"batch_size": 251})
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=tracking_env(processed_project))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train.batch_size (251) is larger than the training set (250 images)" in " ".join(result.stderr.split())


def test_stage_writes_outputs_and_one_finished_run(processed_project):
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=tracking_env(processed_project))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((processed_project / "metrics/train_history.csv").open()))
    assert [row["step"] for row in rows] == [str(step) for step in range(1, 61)]
    tests = list(csv.DictReader((processed_project / "metrics/test_history.csv").open()))
    assert [row["step"] for row in tests] == ["20", "40", "60"]
    percentiles = list(csv.DictReader((processed_project / "metrics/percentiles.csv").open()))
    assert [row["step"] for row in percentiles] == ["20", "40", "60"]
    final = json.loads((processed_project / "metrics/train.json").read_text())
    assert final["final_test_accuracy"] == pytest.approx(float(tests[-1]["test_accuracy"]))
    assert final["final_test_cross_entropy_sum"] == pytest.approx(float(tests[-1]["test_cross_entropy_sum"]))
    assert np.load(processed_project / "models/maps.npy").shape == (10, 28, 28)
    probabilities = np.load(processed_project / "models/p.npy")
    assert probabilities.shape == (50, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.record import TEST_PROBABILITIES_TAG, sha256

    client = MlflowClient(f"sqlite:///{processed_project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mnist-softmax").experiment_id])
    assert run.info.status == "FINISHED"
    # The run is found again by its test probabilities' digest, and carries the environment.
    assert run.data.tags[TEST_PROBABILITIES_TAG] == sha256((processed_project / "models/p.npy").read_bytes())
    assert final["environment"]["keras"] == run.data.tags["env.keras"]
    assert run.data.params["train.batch_size"] == "10"
    history = client.get_metric_history(run.info.run_id, "history/train_cross_entropy_sum")
    assert sorted(metric.step for metric in history) == list(range(1, 61))
    assert client.get_run(run.info.run_id).data.metrics["final_test_cross_entropy_sum"] == pytest.approx(
        final["final_test_cross_entropy_sum"]
    )
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"train_history.csv", "test_history.csv", "percentiles.csv"} <= logged
    # The metrics the gate compares, logged by train itself, so that no registry version lacks them
    # whatever DVC restores of report from its cache; the run names its version.
    labels = np.load(processed_project / "processed/test_labels.npy").argmax(axis=1)
    for name, value in flat(score(labels, probabilities)).items():
        assert run.data.metrics[name] == value, name
    (version,) = client.search_model_versions("name = 'mnist-softmax'")
    assert version.run_id == run.info.run_id and run.data.tags[RUN_VERSION_TAG] == "models:/mnist-softmax/1"
    # The data tags are the md5 of the files train read (DVC's hash of a file), not dvc.lock's claims.
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        md5 = hashlib.md5((processed_project / f"processed/{split}.npy").read_bytes()).hexdigest()
        assert run.data.tags[f"data.processed/{split}.npy"] == md5 == version.tags[f"data.processed/{split}.npy"]


# Seconds from SIGTERM to the end of a stopped train stage: a chunk (half a second), the logging
# backlog's grace (2 s) and the interpreter's exit (1-2 s on a loaded machine), with a margin.
STOP_SECONDS = 10


def wait_for_training(process: subprocess.Popen, store: str, timeout: float = 120) -> list[str]:
    """Wait until the stage's MLflow run holds some of the per-step history; return its stderr so far."""
    from mlflow.tracking import MlflowClient

    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if "MLflow run " in line:
            break
    run_id = "".join(seen).rpartition("MLflow run ")[2].split()[0]
    client, deadline = MlflowClient(store), time.monotonic() + timeout
    while not client.get_metric_history(run_id, "history/train_accuracy") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_metric_history(run_id, "history/train_accuracy"), "".join(seen)
    return seen


@pytest.mark.parametrize(("model", "batch_size"), [("softmax", 10), ("conv_batchnorm", 250)])
def test_stopping_a_long_training_is_prompt_leaves_no_partial_output_and_marks_the_run_failed(
    processed_project, model, batch_size
):
    """2,000,000 steps: a stop comes within seconds whatever the model, the step count, or what
    waits to be logged. (A step of conv_batchnorm on 250 images takes ~0.1 s: 1,000 steps were once
    one uninterruptible chunk.)"""
    settings = {"model": model, "batch_size": batch_size, "iterations": 2_000_000, "eval_interval": 1000}
    write_params(processed_project, preprocess={"validation_size": 50}, train=settings)
    (processed_project / "metrics").mkdir()
    (processed_project / "metrics/train_history.csv").write_text("an earlier history\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *TRAIN_ARGS],
        cwd=processed_project,
        env=tracking_env(processed_project),
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = wait_for_training(process, f"sqlite:///{processed_project / 'mlflow.db'}")
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    stderr = process.communicate(timeout=60)[1]
    took = time.monotonic() - stopped
    message = " ".join("".join([*seen, stderr]).split())
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert took < STOP_SECONDS, f"the stage took {took:.1f} s to stop"
    assert "interrupted; stopped, and no partial output was left behind" in message, message
    assert "was marked FAILED" in message, message
    assert (processed_project / "metrics/train_history.csv").read_text() == "an earlier history\n"
    assert not (processed_project / "metrics/test_history.csv").exists()
    leftovers = [
        path.name for path in processed_project.rglob("*") if path.name.startswith(".") and ".tmp" in path.name
    ]
    assert leftovers == []
    assert not (processed_project / "models/model.keras").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{processed_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-softmax")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_stage_leaves_the_temp_folder_as_it_found_it_and_reruns_give_the_same_bytes(processed_project):
    """The stage exits normally, so TensorFlow cleans up its temporary files (autograph's included),
    and its outputs depend on its inputs alone: a second run writes byte-identical files."""
    temp = processed_project / "tmp"
    temp.mkdir()
    env = {**tracking_env(processed_project), "TMPDIR": str(temp)}
    outputs = {}
    for attempt in range(2):
        result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=env)
        assert result.returncode == 0, result.stderr
        assert sorted(path.name for path in temp.iterdir()) == [], f"run {attempt + 1} left files in the temp folder"
        outputs[attempt] = {
            name: (processed_project / name).read_bytes()
            for name in (
                "models/model.keras",
                "models/p.npy",
                "models/maps.npy",
                "metrics/train_history.csv",
                "metrics/test_history.csv",
                "metrics/percentiles.csv",
                "metrics/train.json",
            )  # fmt: skip
        }
    assert outputs[0] == outputs[1]
    # The same model, with the same metrics, is no second registry version: the rerun's run links to
    # the first one's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{processed_project / 'mlflow.db'}")
    (version,) = client.search_model_versions("name = 'mnist-softmax'")
    runs = client.search_runs([client.get_experiment_by_name("mnist-softmax").experiment_id])
    assert len(runs) == 2 and {run.data.tags[RUN_VERSION_TAG] for run in runs} == {"models:/mnist-softmax/1"}
    assert version.run_id == runs[-1].info.run_id and "linked, not registered again" in result.stderr


def test_diverging_training_stops_naming_the_step_and_writes_nothing(processed_project):
    """A rate float32 can hold but training cannot survive: NaN losses stop the stage, no NaN in any file."""
    write_params(processed_project, preprocess={"validation_size": 50},
                 train={"batch_size": 10, "iterations": 60, "eval_interval": 20, "learning_rate": 1.0e38})  # fmt: skip
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=tracking_env(processed_project))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "training diverged" in message and "at step" in message and "smaller train.learning_rate" in message
    assert [*processed_project.glob("models/*"), *processed_project.glob("metrics/*")] == []

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{processed_project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mnist-softmax").experiment_id])
    assert run.info.status == "FAILED"


def test_a_run_whose_process_was_killed_outright_is_closed_by_the_next_training(processed_project):
    """SIGKILL leaves no chance to end the run; the next train on the same store marks it FAILED."""
    write_params(processed_project, preprocess={"validation_size": 50},
                 train={"batch_size": 10, "iterations": 2_000_000, "eval_interval": 1000})  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train", *TRAIN_ARGS], cwd=processed_project,
                               env=tracking_env(processed_project), stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in process.stderr:
        if "step 1000:" in line:
            break
    process.kill()
    process.communicate(timeout=60)

    from mlflow.tracking import MlflowClient

    from pipeline.tracking.record import CLOSED_TAG

    client = MlflowClient(f"sqlite:///{processed_project / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("mnist-softmax").experiment_id
    (killed,) = client.search_runs([experiment_id])
    assert killed.info.status == "RUNNING"

    write_params(processed_project, preprocess={"validation_size": 50},
                 train={"batch_size": 10, "iterations": 20, "eval_interval": 10})  # fmt: skip
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=tracking_env(processed_project))
    assert result.returncode == 0, result.stderr
    assert f"closed MLflow run {killed.info.run_id} as FAILED" in result.stderr
    closed = client.get_run(killed.info.run_id)
    assert closed.info.status == "FAILED" and "ended without closing the run" in closed.data.tags[CLOSED_TAG]
    statuses = sorted(run.info.status for run in client.search_runs([experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]


def test_an_artifact_folder_that_is_a_file_stops_the_stage_before_training(processed_project):
    (processed_project / "mlartifacts").write_text("not a folder")
    env = stage_env()  # The default store: mlflow.db with mlartifacts beside it, at the project root.
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=env)
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mlartifacts is a file, not a folder" in message and "Nothing was trained" in message, message
    assert "MLflow run" not in result.stderr
    assert not (processed_project / "models").exists() and not (processed_project / "metrics").exists()


def test_a_damaged_sqlite_store_is_named_with_what_to_do(processed_project):
    database = processed_project / "mlflow.db"
    database.write_bytes(b"this is not an SQLite database" * 100)
    result = run_module("pipeline.train", *TRAIN_ARGS, cwd=processed_project, env=tracking_env(processed_project))
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"If {database} is damaged, move it aside" in message and "Nothing was trained" in message, message
    assert "server" not in message.split("Nothing was trained")[0].split("failed:")[0]
    assert "step " not in result.stderr, "training ran before the store was found unusable"
    assert [
        path for path in processed_project.rglob("*") if path.is_file() and path.parent.name in ("models", "metrics")
    ] == []
