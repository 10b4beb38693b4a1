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
    "five_layers_sigmoid": FIVE_LAYERS,
    "five_layers_relu": FIVE_LAYERS,
    "five_layers_relu_lrdecay": FIVE_LAYERS,
    "five_layers_relu_lrdecay_dropout": FIVE_LAYERS,
    # 3.0: 5x5x1=>4, 5x5x4=>8, 4x4x8=>12, 7*7*12=>200, 200=>10.
    "conv": 5 * 5 * 4 + 4 + 5 * 5 * 4 * 8 + 8 + 4 * 4 * 8 * 12 + 12 + 7 * 7 * 12 * 200 + 200 + 200 * 10 + 10,
    # 3.1: 6x6x1=>6, 5x5x6=>12, 4x4x12=>24, 7*7*24=>200, 200=>10.
    "conv_bigger_dropout": 6 * 6 * 6 + 6 + 5 * 5 * 6 * 12 + 12 + 4 * 4 * 12 * 24 + 24 + 7 * 7 * 24 * 200 + 200 + 2010,
    # 4.2: 6x6x1=>24, 5x5x24=>48, 4x4x48=>64, 7*7*64=>200 with no biases but batch-norm offsets
    # of the same sizes, 200=>10.
    "conv_batchnorm": 6 * 6 * 24 + 24 + 5 * 5 * 24 * 48 + 48 + 4 * 4 * 48 * 64 + 64 + 7 * 7 * 64 * 200 + 200 + 2010,
}


def trainable_count(model) -> int:
    return sum(int(np.prod(variable.shape)) for variable in model.trainable_variables)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_have_the_scripts_shapes_and_parameter_counts(name):
    from pipeline.model import build_model

    model = build_model(0, name)
    assert trainable_count(model) == SCRIPT_PARAMETERS[name]
    assert tuple(model.input_shape) == (None, 784) and tuple(model.output_shape) == (None, 10)
    probabilities = model(np.random.default_rng(0).random((3, 784), np.float32)).numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "biases"),
    [
        ("softmax", [0]),
        # Sigmoids start at 0, relus at 0.1 but for the last layer (script 2.x's comments); the
        # convolutional scripts start every bias (and 4.2 every batch-norm offset) at 0.1.
        ("five_layers_sigmoid", [0, 0, 0, 0, 0]),
        ("five_layers_relu", [0.1, 0.1, 0.1, 0.1, 0]),
        ("conv", [0.1] * 5),
        ("conv_bigger_dropout", [0.1] * 5),
        ("conv_batchnorm", [0.1] * 5),
    ],
)
def test_initial_values_follow_the_scripts(name, biases):
    from pipeline.model import build_model

    model = build_model(0, name)
    kernels = [v.numpy() for v in model.trainable_variables if len(v.shape) > 1]
    offsets = [v.numpy() for v in model.trainable_variables if len(v.shape) == 1]
    assert [float(np.unique(offset).item()) for offset in offsets] == pytest.approx(biases)
    for kernel in kernels:
        # tf.truncated_normal(stddev=0.1): never beyond two standard deviations.
        assert np.abs(kernel).max() <= 0.2 and 0.05 < kernel.std() < 0.1
    # Each layer draws its own weights; the seed's model is the one its notebook names.
    assert len(kernels) == 1 or not np.array_equal(kernels[0].ravel()[:30], kernels[1].ravel()[:30])
    assert name != "softmax" or (model.name, [layer.name for layer in model.layers]) == ("mnist_softmax", ["softmax"])


def test_decaying_rate_is_the_scripts_formula():
    from pipeline.model import DecayToFloor

    schedule = DecayToFloor(0.003, 2000, 0.0001)
    for step in (0, 1, 2000, 10_000):
        expected = 0.0001 + 0.003 * math.exp(-step / 2000)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_dropout_and_batch_norm_only_act_in_training():
    from pipeline.model import build_model

    images = np.random.default_rng(1).random((8, 784), np.float32)
    dropout = build_model(0, "five_layers_relu_lrdecay_dropout")
    assert np.array_equal(dropout(images).numpy(), dropout(images).numpy())
    assert not np.array_equal(dropout(images, training=True).numpy(), dropout(images).numpy())
    batch_norm = build_model(0, "conv_batchnorm")
    moving = [v.numpy().copy() for v in batch_norm.non_trainable_variables]
    batch_norm(images)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(moving, batch_norm.non_trainable_variables))
    batch_norm(images, training=True)
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(moving, batch_norm.non_trainable_variables))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_trains_in_the_compiled_loop_and_repeats_exactly(name):
    from test_train import small_data, train_once

    from pipeline.model import SERIES, build_model

    initial = build_model(0, name).get_weights()
    # A test batch size that does not divide the test set, so the last call is a short one.
    test_batch_size = None if SERIES[name].test_batch_size is None else 30
    first, model, trainer = train_once(name, test_batch_size=test_batch_size)
    assert first.test_steps == [50, 100] and np.all(np.isfinite(first.train_series()[1]))
    # Every variable moved: gradients reach every layer, batch norm's moving averages are updated.
    assert not any(np.array_equal(before, after) for before, after in zip(initial, model.get_weights()))
    # The test probabilities, measured in chunks or not, are one row per test image.
    probabilities = trainer.test_probabilities()
    assert probabilities.shape == (100, 10)
    accuracy = float(np.mean(probabilities.argmax(1) == small_data()[3].argmax(1)))
    assert accuracy == pytest.approx(first.test_accuracy[-1])
    second, second_model, _ = train_once(name, test_batch_size=test_batch_size)
    assert np.array_equal(first.train_series()[1], second.train_series()[1])
    assert first.test_accuracy == second.test_accuracy
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), second_model.get_weights()))
