"""The NumPy reference computes what SgdTrainer computes, and the benchmark runs end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, stage_env, write_params
from idx_fixtures import write_idx
from test_model import small_data

from benchmarks.numpy_reference import train_numpy
from pipeline.data import RAW_PAIRS
from pipeline.train import BatchOrder, train

pytestmark = pytest.mark.slow

LEARNING_RATE = 0.003
STEPS, BATCH, EVAL_INTERVAL = 300, 20, 50


def test_tensorflow_and_numpy_compute_the_same_steps():
    """The same steps from the same initial weights, once in TensorFlow and once in NumPy."""
    import keras
    import tensorflow as tf

    from pipeline.model import SgdTrainer, build_model

    data = small_data()  # 400 training and 100 test images
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = build_model(0)
    initial_weights, initial_biases = model.get_weights()
    order = BatchOrder(400, BATCH, STEPS, seed=0)[:STEPS]
    history = train(SgdTrainer(model, keras.optimizers.SGD(learning_rate=LEARNING_RATE), *data), order, EVAL_INTERVAL)
    reference = train_numpy(*data, initial_weights, initial_biases, order, LEARNING_RATE, EVAL_INTERVAL)
    # train_numpy leaves its inputs alone.
    assert np.array_equal(initial_weights, build_model(0).get_weights()[0]) and not initial_biases.any()
    assert reference["test_probabilities"].shape == (100, 10)
    accuracy, cross_entropy = history.train_series()
    assert reference["train_cross_entropy"].dtype == np.float32
    np.testing.assert_allclose(reference["train_cross_entropy"], cross_entropy, rtol=1e-4, atol=1e-3)
    # The run must actually move: a comparison of two constant series would prove nothing.
    assert abs(float(cross_entropy[-50:].mean() - cross_entropy[:50].mean())) > 1.0
    # XLA divides by multiplying with 1/n, NumPy divides; the count of correct images is what must agree.
    np.testing.assert_array_equal(np.rint(reference["train_accuracy"] * BATCH), np.rint(accuracy * BATCH))
    np.testing.assert_allclose(reference["train_accuracy"], accuracy, rtol=0, atol=1e-6)
    assert reference["test_steps"].tolist() == history.test_steps == [50, 100, 150, 200, 250, 300]
    np.testing.assert_array_equal(
        np.rint(reference["test_accuracy"] * 100), np.rint(np.array(history.test_accuracy) * 100)
    )
    np.testing.assert_allclose(reference["test_cross_entropy"], history.test_cross_entropy, rtol=1e-4, atol=1e-3)
    weights, biases = model.get_weights()
    assert not np.allclose(weights, initial_weights, rtol=0, atol=1e-4)
    np.testing.assert_allclose(reference["weights"], weights, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reference["biases"], biases, rtol=1e-4, atol=1e-5)


@pytest.fixture
def tiny_mirror(tmp_path):
    """A learnable mirror (a block of pixels per label over noise): on random pixels the summed loss explodes."""
    rng = np.random.default_rng(0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for (images_name, labels_name), count in zip(RAW_PAIRS.values(), (5600, 300)):
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        images = rng.integers(0, 30, size=(count, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels):
            image[2 * label : 2 * label + 6, 4:24] = 200
        write_idx(mirror / f"{images_name}.gz", images, gz=True)
        write_idx(mirror / f"{labels_name}.gz", labels, gz=True)
    return mirror


def run_python(*arguments: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, *arguments]
    return subprocess.run(command, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=timeout)


def test_reference_process_runs_without_tensorflow(tmp_path, tiny_mirror):
    write_params(tmp_path, train={"iterations": 30, "eval_interval": 10})
    code = (
        "import sys, runpy; sys.argv = ['numpy_reference'] + sys.argv[1:]; "
        "runpy.run_module('benchmarks.numpy_reference', run_name='__main__'); "
        "assert not any(m.split('.')[0] in ('tensorflow', 'keras', 'mlflow') for m in sys.modules), 'heavy import'"
    )
    paths = ["--mirror", str(tiny_mirror), "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]
    result = run_python("-c", code, "--no-verify", *paths, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= summary["test_accuracy"] <= 1 and summary["train_seconds"] > 0
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 31 and history[9].startswith("9,") and history[9].endswith(",,")
    step, *values = history[10].split(",")
    assert step == "10" and len(values) == 4 and all(float(value) >= 0 for value in values)


def test_benchmark_runs_end_to_end(tmp_path, tiny_mirror):
    arguments = ["--repeat", "1", "--only", "train-loop", "--iterations", "200", "--mirror", str(tiny_mirror)]
    result = run_python("-m", "benchmarks.run", *arguments, "--json", str(tmp_path / "bench.json"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| measure | ours (median) | reference (median) | ratio | target |" in result.stdout
    assert "| train loop, 200 steps: TensorFlow vs NumPy" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["rows"]) == 3  # The loop, the loop after its compiled first step, the loop without percentiles.
    for row in report["rows"]:
        assert len(row["ours"]) == len(row["reference"]) == 1 and min(row["ours"] + row["reference"]) > 0
    # Same data, same initial weights, same batches: the two implementations end in the same place.
    found = re.findall(r"([\w-]+) ([\d.]+) / ([\d.]+)", report["notes"][0])
    finals = {kind: (float(accuracy), float(cross_entropy)) for kind, accuracy, cross_entropy in found}
    assert set(finals) == {"tensorflow", "numpy", "no-percentiles"}
    assert finals["tensorflow"][0] == pytest.approx(finals["numpy"][0], abs=0.01)
    assert finals["tensorflow"][1] == pytest.approx(finals["numpy"][1], rel=1e-3)
