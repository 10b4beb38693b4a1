"""The series of models: each built as the author's script builds it, each trainable by the seed's loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.params import MODEL_NAMES

# Trainable parameters of each script's variables (W1, B1, ... W5, B5), counted from their shapes.
FIVE_LAYERS = 784 * 200 + 200 + 200 * 100 + 100 + 100 * 60 + 60 + 60 * 30 + 30 + 30 * 10 + 10
SCRIPT_PARAMETERS = {
    "softmax": 784 * 10 + 10,
    **{name: FIVE_LAYERS for name in MODEL_NAMES if name.startswith("five_layers")},
    # 3.0: 5x5x1=>4, 5x5x4=>8, 4x4x8=>12, 7*7*12=>200, 200=>10.
    "conv": 5 * 5 * 4 + 4 + 5 * 5 * 4 * 8 + 8 + 4 * 4 * 8 * 12 + 12 + 7 * 7 * 12 * 200 + 200 + 200 * 10 + 10,
    # 3.1: 6x6x1=>6, 5x5x6=>12, 4x4x12=>24, 7*7*24=>200, 200=>10.
    "conv_bigger_dropout": 6 * 6 * 6 + 6 + 5 * 5 * 6 * 12 + 12 + 4 * 4 * 12 * 24 + 24 + 7 * 7 * 24 * 200 + 200 + 2010,
    # 4.2: 6x6x1=>24, 5x5x24=>48, 4x4x48=>64, 7*7*64=>200 with no biases but batch-norm offsets
    # of the same sizes, 200=>10.
    "conv_batchnorm": 6 * 6 * 24 + 24 + 5 * 5 * 24 * 48 + 48 + 4 * 4 * 48 * 64 + 64 + 7 * 7 * 64 * 200 + 200 + 2010,
}


# Sigmoids start their biases at 0, relus at 0.1 but for the last layer (script 2.x's comments); the
# convolutional scripts start every bias (and 4.2 every batch-norm offset) at 0.1.
RELU_BIASES = [0.1, 0.1, 0.1, 0.1, 0]
SERIES_WITH_DROPOUT_OR_BATCH_NORM = ("five_layers_relu_lrdecay_dropout", "conv_bigger_dropout", "conv_batchnorm")
INITIAL_BIASES = {"softmax": [0], "five_layers_sigmoid": [0] * 5, "conv": [0.1] * 5}
INITIAL_BIASES |= {"conv_bigger_dropout": [0.1] * 5, "conv_batchnorm": [0.1] * 5}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_have_the_scripts_shapes_parameter_counts_initial_values_and_parameter_groups(name):
    from pipeline.model import build_model, parameter_groups, weight_maps

    model = build_model(0, name)
    assert sum(int(np.prod(variable.shape)) for variable in model.trainable_variables) == SCRIPT_PARAMETERS[name]
    assert tuple(model.input_shape) == (None, 784) and tuple(model.output_shape) == (None, 10)
    images = np.random.default_rng(0).random((3, 784), np.float32)
    assert np.allclose(model(images).numpy().sum(axis=1), 1, atol=1e-5)
    kernels = [v.numpy() for v in model.trainable_variables if len(v.shape) > 1]
    offsets = [v.numpy() for v in model.trainable_variables if len(v.shape) == 1]
    biases = INITIAL_BIASES.get(name, RELU_BIASES)
    assert [float(np.unique(offset).item()) for offset in offsets] == pytest.approx(biases)
    for kernel in kernels:
        # tf.truncated_normal(stddev=0.1): never beyond two standard deviations.
        assert np.abs(kernel).max() <= 0.2 and 0.05 < kernel.std() < 0.1
    # Each layer draws its own weights; the seed's model is the one its notebook names.
    assert len(kernels) == 1 or not np.array_equal(kernels[0].ravel()[:30], kernels[1].ravel()[:30])
    assert name != "softmax" or (model.name, [layer.name for layer in model.layers]) == ("mnist_softmax", ["softmax"])
    # Batch norm's offsets count as biases; only a linear model has weight maps.
    weights, biases = parameter_groups(model)
    assert len(weights) == len(kernels) and len(biases) == len(offsets)
    maps = weight_maps(model)
    if name == "softmax":
        # Map d, pixel (row, column) is the weight from pixel 28 * row + column to class d.
        assert maps.shape == (10, 28, 28) and maps[3, 2, 5] == kernels[0][28 * 2 + 5, 3]
    else:
        assert maps.shape == (0, 28, 28)
    # Dropout and batch norm act in training only: a prediction neither drops nor moves batch norm's averages.
    averages = [variable for variable in model.non_trainable_variables if variable.name.startswith("moving_")]
    moving = [variable.numpy().copy() for variable in averages]
    assert np.array_equal(model(images).numpy(), model(images).numpy())
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(moving, averages))
    in_training = model(images, training=True).numpy()
    assert np.array_equal(in_training, model(images).numpy()) == (name not in SERIES_WITH_DROPOUT_OR_BATCH_NORM)
    assert not any(np.array_equal(a, v.numpy()) for a, v in zip(moving, averages))
    assert bool(averages) == (name == "conv_batchnorm")


def test_decaying_rate_is_the_scripts_formula():
    from pipeline.model import DecayToFloor

    schedule = DecayToFloor(0.003, 2000, 0.0001)
    for step in (0, 1, 2000, 10_000):
        expected = 0.0001 + 0.003 * math.exp(-step / 2000)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def small_data():
    rng = np.random.default_rng(0)
    # Labels that depend on the pixels, so that the model can learn something.
    train_images, test_images = rng.integers(0, 256, (400, 784), np.uint8), rng.integers(0, 256, (100, 784), np.uint8)
    eye = np.eye(10, dtype=np.uint8)
    return train_images, eye[train_images[:, :10].argmax(1)], test_images, eye[test_images[:, :10].argmax(1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_trains_in_the_compiled_loop_and_repeats_exactly_whatever_the_chunks(name, tmp_path):
    """One step per chunk, or chunks doubling up to each printed line: the same numbers, bit for bit."""
    import keras

    from pipeline.data import PERCENTILES, scale_pixels
    from pipeline.model import SERIES, SgdTrainer, build_model, parameter_groups, raw_pixel_model, save_model
    from pipeline.train import BatchOrder, train

    initial = build_model(0, name).get_weights()
    assert not np.array_equal(build_model(1, name).get_weights()[0], initial[0]), "a different seed starts elsewhere"
    # The seed's softmax runs past its first printed line; a test batch size that does not divide the test set.
    iterations = 1100 if name == "softmax" else 100
    series, test_batch_size = SERIES[name], None if SERIES[name].test_batch_size is None else 30
    runs = []
    for chunk_seconds in (1e-9, 1e9):
        keras.utils.set_random_seed(0)
        model = build_model(0, name)
        trainer = SgdTrainer(model, series.optimizer(0.003), *small_data(), test_batch_size, series.jit_compile)
        chunks: list[tuple] = []
        options = {"chunk_seconds": chunk_seconds, "on_chunk": lambda *chunk, chunks=chunks: chunks.append(chunk)}
        history = train(trainer, BatchOrder(400, 20, iterations, seed=0), 50, **options)
        runs.append(([measured["train_accuracy"][0][-1] for measured, *_ in chunks], history, model, trainer))
    (one_step_ends, first, model, trainer), (ends, second, second_model, _) = runs
    assert one_step_ends == list(range(1, iterations + 1))
    doubling = [1, 3, 7, 15, 31, 63, 127, 255, 511, 1000, 1100] if name == "softmax" else [1, 3, 7, 15, 31, 63, 100]
    assert ends == doubling
    assert first.test_steps == list(range(50, iterations + 1, 50)) and np.all(np.isfinite(first.train_series()[1]))
    # Every variable moved: gradients reach every layer, batch norm's moving averages are updated.
    assert not any(np.array_equal(before, after) for before, after in zip(initial, model.get_weights()))
    # The percentiles recorded in the loop are numpy's of all the weights and of all the biases then.
    for group, recorded in zip(parameter_groups(model), (first.weight_percentiles, first.bias_percentiles)):
        values = np.concatenate([variable.numpy().ravel() for variable in group])
        np.testing.assert_allclose(recorded[-1], np.percentile(values, PERCENTILES), atol=1e-6)
        assert len(recorded) == len(first.test_steps) and not np.array_equal(recorded[0], recorded[1])
    # The test probabilities, measured in chunks or not, are one row per test image.
    probabilities = trainer.test_probabilities()
    assert probabilities.shape == (100, 10)
    accuracy = float(np.mean(probabilities.argmax(1) == small_data()[3].argmax(1)))
    assert accuracy == pytest.approx(first.test_accuracy[-1])
    # The user's model takes raw uint8 pixels: the same float32 inputs reach the trained layers, not a bit differs.
    users, test_images = raw_pixel_model(model), small_data()[2]
    assert np.array_equal(users(test_images).numpy(), model(scale_pixels(test_images)).numpy())
    assert test_batch_size is not None or np.array_equal(users(test_images).numpy(), probabilities)
    # Saved as train saves it: byte-deterministic, and loaded back as a model of uint8 pixels.
    save_model(users, tmp_path / "first.keras")
    save_model(raw_pixel_model(model), tmp_path / "second.keras")
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
    loaded = keras.saving.load_model(tmp_path / "first.keras")
    assert loaded.inputs[0].dtype == "uint8" and np.array_equal(loaded(test_images).numpy(), users(test_images).numpy())
    assert all(np.array_equal(a, b) for a, b in zip(first.train_series(), second.train_series()))
    assert first.test_accuracy == second.test_accuracy and first.test_cross_entropy == second.test_cross_entropy
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), second_model.get_weights()))
