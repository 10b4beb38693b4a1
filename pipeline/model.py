"""The seed's softmax and the rest of Martin Gorner's "TensorFlow without a PhD" series (each as its mnist_*.py
builds and optimises it), trained on the seed's summed cross-entropy, a chunk of steps per compiled loop."""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS, PERCENTILES, PIXEL_SCALE, scale_pixels
from pipeline.params import MODEL_THREADS


@keras.saving.register_keras_serializable(package="pipeline")
class PhiloxDropout(layers.Dropout):
    """Keras' Dropout with its mask drawn by Philox, TensorFlow's generator on CPU: in an XLA-compiled loop the
    default ("auto_select") made a step of the dense dropout model 16 times slower (13.2 ms against 0.85)."""

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1), tf.int32)  # As Keras casts it.
        return tf.nn.experimental.stateless_dropout(inputs, self.rate, seed, rng_alg="philox")


def _weights(seed: int, layer: int) -> keras.initializers.Initializer:
    """The scripts' ``tf.truncated_normal(shape, stddev=0.1)``, a stream of its own for every layer."""
    return keras.initializers.TruncatedNormal(stddev=0.1, seed=seed + layer)


def _dense(seed: int, name: str, units=(), activation="relu", bias=0.1, dropout=0.0) -> keras.Model:
    """The seed and scripts 2.0-2.2: hidden layers of ``units`` (dropout after each), 10 softmax neurons."""
    stack: list = [keras.Input(shape=(NUM_PIXELS,), name="pixels")]
    for layer, width in enumerate(units):
        initial_kernel, initial_bias = _weights(seed, layer), keras.initializers.Constant(bias)
        stack.append(layers.Dense(width, activation, kernel_initializer=initial_kernel, bias_initializer=initial_bias))
        if dropout:
            stack.append(PhiloxDropout(dropout, seed=seed + layer))
    stack.append(layers.Dense(NUM_CLASSES, "softmax", kernel_initializer=_weights(seed, len(units)), name="softmax"))
    return keras.Sequential(stack, name=name)


def _convolutional(seed: int, name: str, filters, patches, dropout=0.0, batch_norm=False) -> keras.Model:
    """Scripts 3.0-4.2: relu convolutions (strides 1, 2, 2), dense relu 200, 10 softmax; 4.2's unscaled batch norm."""
    bias = keras.initializers.Constant(0.1)

    def relu(layer: Callable, number: int) -> list:
        if not batch_norm:
            return [layer(activation="relu", kernel_initializer=_weights(seed, number), bias_initializer=bias)]
        normalise = layers.BatchNormalization(momentum=0.999, epsilon=1e-5, scale=False, beta_initializer=bias)
        return [layer(use_bias=False, kernel_initializer=_weights(seed, number)), normalise, layers.ReLU()]

    stack: list = [keras.Input(shape=(NUM_PIXELS,), name="pixels"), layers.Reshape((*IMAGE_SHAPE, 1))]
    for number, (depth, patch, stride) in enumerate(zip(filters, patches, (1, 2, 2))):
        stack += relu(partial(layers.Conv2D, depth, patch, strides=stride, padding="same"), number)
    stack += [layers.Flatten(), *relu(partial(layers.Dense, 200), 3)]
    if dropout:
        stack.append(PhiloxDropout(dropout, seed=seed))
    stack.append(layers.Dense(NUM_CLASSES, "softmax", kernel_initializer=_weights(seed, 4), bias_initializer=bias))
    return keras.Sequential(stack, name=name)


class DecayToFloor(keras.optimizers.schedules.LearningRateSchedule):
    """The scripts' ``0.0001 + tf.train.exponential_decay(initial, step, decay_steps, 1/e)``, first update step 0.
    Never saved: the model files hold no optimiser."""

    def __init__(self, initial: float, decay_steps: int, floor: float) -> None:
        self.floor = floor
        self.decay = keras.optimizers.schedules.ExponentialDecay(initial, decay_steps, 1 / math.e)

    def __call__(self, step):
        return self.floor + self.decay(step)


def _adam(initial: float = 0.003, decay_steps: int | None = 2000) -> Callable[[float], keras.optimizers.Optimizer]:
    """Adam at the script's rate, decaying to 0.0001; epsilon 1e-8 as TensorFlow 1's (Keras' is 1e-7)."""
    rate = initial if decay_steps is None else DecayToFloor(initial, decay_steps, 0.0001)
    return lambda _: keras.optimizers.Adam(learning_rate=rate, epsilon=1e-8)


@dataclass(frozen=True)
class Series:
    """A model of the series: its script, its builder (seed, name), its optimiser given train.learning_rate."""

    script: str
    description: str
    build: Callable[[int, str], keras.Model]
    optimizer: Callable[[float], keras.optimizers.Optimizer] = _adam()
    optimizer_description: str = "Adam, rate 0.0001 + 0.003 exp(-step/2000)"
    # Test images per model call (the convolutions' activations for all 10,000 would take gigabytes).
    test_batch_size: int | None = None
    # XLA made script 3.0's convolutions 1.7x slower per step on this CPU than TensorFlow's kernels.
    jit_compile: bool = True
    threads: int = 1  # TensorFlow's threads: params.MODEL_THREADS, set in SERIES below


_FIVE = (200, 100, 60, 30)
_CONSTANT_ADAM = partial(Series, optimizer=_adam(decay_steps=None), optimizer_description="Adam, rate 0.003")
_CONVOLUTIONAL = partial(Series, test_batch_size=1000, jit_compile=False)
_SERIES = {
    "softmax": Series(
        "mnist_1.0_softmax.py (the seed notebook's variant)",
        "Dense(10, softmax) on 784 pixels",
        _dense,
        lambda rate: keras.optimizers.SGD(learning_rate=rate),
        "SGD, rate train.learning_rate",
    ),
    "five_layers_sigmoid": _CONSTANT_ADAM(
        "mnist_2.0_five_layers_sigmoid.py",
        "Dense 200-100-60-30 sigmoid, Dense(10, softmax)",
        partial(_dense, units=_FIVE, activation="sigmoid", bias=0.0),
    ),
    "five_layers_relu": _CONSTANT_ADAM(
        "mnist_2.0_five_layers_sigmoid.py with relu (results listed in its comments)",
        "Dense 200-100-60-30 relu, Dense(10, softmax)",
        partial(_dense, units=_FIVE),
    ),
    "five_layers_relu_lrdecay": Series(
        "mnist_2.1_five_layers_relu_lrdecay.py",
        "Dense 200-100-60-30 relu, Dense(10, softmax)",
        partial(_dense, units=_FIVE),
    ),
    "five_layers_relu_lrdecay_dropout": Series(
        "mnist_2.2_five_layers_relu_lrdecay_dropout.py",
        "Dense 200-100-60-30 relu, each with dropout 0.25, Dense(10, softmax)",
        partial(_dense, units=_FIVE, dropout=0.25),
    ),
    "conv": _CONVOLUTIONAL(
        "mnist_3.0_convolutional.py",
        "Conv 4 (5x5/1), 8 (5x5/2), 12 (4x4/2) relu, Dense 200 relu, Dense(10, softmax)",
        partial(_convolutional, filters=(4, 8, 12), patches=(5, 5, 4)),
    ),
    "conv_bigger_dropout": _CONVOLUTIONAL(
        "mnist_3.1_convolutional_bigger_dropout.py",
        "Conv 6 (6x6/1), 12 (5x5/2), 24 (4x4/2) relu, Dense 200 relu + dropout 0.25, Dense(10, softmax)",
        partial(_convolutional, filters=(6, 12, 24), patches=(6, 5, 4), dropout=0.25),
    ),
    "conv_batchnorm": _CONVOLUTIONAL(
        "mnist_4.2_batchnorm_convolutional.py",
        "Conv 24 (6x6/1), 48 (5x5/2), 64 (4x4/2) + batch norm + relu, Dense 200 + batch norm + relu + dropout 0.25, "
        "Dense(10, softmax)",
        partial(_convolutional, filters=(24, 48, 64), patches=(6, 5, 4), dropout=0.25, batch_norm=True),
        _adam(0.02, 1600),
        "Adam, rate 0.0001 + 0.02 exp(-step/1600)",
    ),
}
# params.MODEL_THREADS, which validates train.model and sizes a sweep's trials without TensorFlow, is the one list of
# names and threads.
SERIES = {name: replace(_SERIES[name], threads=threads) for name, threads in MODEL_THREADS.items()}


def build_model(seed: int, name: str = "softmax") -> keras.Model:
    return SERIES[name].build(seed, f"mnist_{name}")


def raw_pixel_model(model: keras.Model) -> keras.Model:
    """``model`` behind a layer scaling raw uint8 pixels as scale_pixels does: the same probabilities, bit for bit."""
    pixels = keras.Input(shape=(NUM_PIXELS,), dtype="uint8", name="raw_pixels")
    scaling = layers.Rescaling(float(PIXEL_SCALE), name="scale_pixels")
    return keras.Sequential([pixels, scaling, model], name="mnist_softmax_raw_pixels")


def save_model(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` archive without Keras' save times and its shared-object ids numbered by memory address."""
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    numbers: dict[str, int] = {}
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "date_saved"}).encode()
            elif info.filename == "config.json":
                renumber = lambda m: f"{m[1]}{numbers.setdefault(m[2], len(numbers) + 1)}"  # noqa: E731
                data = re.sub(r'("shared_object_id": )(\d+)', renumber, data.decode()).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
            archive.writestr(entry, data)


def parameter_groups(model: keras.Model) -> tuple[list, list]:
    """The weights (trainable variables of two or more dimensions) and the biases: dense and convolution biases, and
    batch norm's offsets, which take their place in script 4.2."""
    variables = model.trainable_variables
    return [v for v in variables if len(v.shape) >= 2], [v for v in variables if v.name in ("bias", "beta")]


def percentiles_graph(variables: list) -> tf.Tensor:
    """PERCENTILES of all ``variables``' values, interpolated as numpy.percentile does."""
    values = tf.sort(tf.concat([tf.reshape(tf.cast(variable, tf.float32), [-1]) for variable in variables], 0))
    # The positions are known when the loop is traced, so only two gathers run in it.
    positions = np.array(PERCENTILES) / 100 * (sum(int(np.prod(v.shape)) for v in variables) - 1)
    lower, upper = np.floor(positions).astype(np.int32), np.ceil(positions).astype(np.int32)
    below, above = tf.gather(values, lower), tf.gather(values, upper)
    return below + (above - below) * tf.constant(positions - lower, tf.float32)


def weight_maps(model: keras.Model) -> np.ndarray:
    """Each class's weight for every pixel, as ten 28×28 maps, for a linear classifier; (0, 28, 28) otherwise."""
    weights, _ = parameter_groups(model)
    if len(weights) != 1 or tuple(weights[0].shape) != (NUM_PIXELS, NUM_CLASSES):
        return np.zeros((0, *IMAGE_SHAPE), np.float32)
    return np.asarray(weights[0].numpy(), np.float32).T.reshape(NUM_CLASSES, *IMAGE_SHAPE)


class SgdTrainer:
    """Chunks of steps, test evaluations included, in one compiled loop."""

    def __init__(
        self, model, optimizer, train_images, train_labels, test_images, test_labels, test_batch_size=None, xla=True
    ) -> None:
        self.model, self.test_batch_size, self.optimizer = model, test_batch_size, optimizer
        self.optimizer.build(model.trainable_variables)
        self.loss = keras.losses.CategoricalCrossentropy(reduction="sum")  # From the logits: stable.
        # The training set stays uint8 in memory; each batch is gathered and scaled on the fly.
        self.train_images, self.train_labels = tf.constant(train_images), tf.constant(train_labels)
        self.test_images = tf.constant(scale_pixels(test_images))
        self.test_labels = tf.constant(test_labels.astype(np.float32))
        signature = [tf.TensorSpec([None, None], tf.int32), *[tf.TensorSpec([], tf.int32)] * 3]
        self._train_steps = tf.function(self._loop, jit_compile=xla, input_signature=signature)

    def _measure(self, labels, probabilities):
        correct = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(labels, axis=1))
        return tf.reduce_mean(tf.cast(correct, tf.float32)), self.loss(labels, probabilities)

    def _test_predictions(self):
        if self.test_batch_size is None:
            return self.model(self.test_images)
        starts = range(0, int(self.test_images.shape[0]), self.test_batch_size)
        return tf.concat([self.model(self.test_images[start : start + self.test_batch_size]) for start in starts], 0)

    def _loop(self, batch_indices, steps, first_step, eval_interval):
        rows, width = tf.shape(batch_indices)[0], len(PERCENTILES)
        shapes: list[list[int]] = [[]] * 4 + [[width]] * 2
        results = [tf.TensorArray(tf.float32, size=rows, element_shape=shape) for shape in shapes]
        variables, (weights, biases) = self.model.trainable_variables, parameter_groups(self.model)
        nan = tf.constant(np.nan, tf.float32)
        not_measured = (nan, nan, tf.fill([width], nan), tf.fill([width], nan))

        def measure():
            measured = self._measure(self.test_labels, self._test_predictions())
            return (*measured, percentiles_graph(weights), percentiles_graph(biases))

        # XLA needs the loop's bound when it compiles, so the loop counts rows and stops at ``steps``.
        for step in tf.range(rows):
            if step == steps:
                break
            images = tf.cast(tf.gather(self.train_images, batch_indices[step]), tf.float32) * PIXEL_SCALE
            labels = tf.cast(tf.gather(self.train_labels, batch_indices[step]), tf.float32)
            with tf.GradientTape() as tape:
                loss = self.loss(labels, self.model(images, training=True))
            self.optimizer.apply(tape.gradient(loss, variables), variables)
            # The seed measures the batch again after the update; the test set every eval_interval steps.
            due = (first_step + step) % eval_interval == 0  # params.py holds eval_interval >= 1.
            values = (*self._measure(labels, self.model(images)), *tf.cond(due, measure, lambda: not_measured))
            results = [result.write(step, value) for result, value in zip(results, values)]
        return tuple(result.stack() for result in results)

    def train_steps(self, batch_indices: np.ndarray, first_step: int, eval_interval: int, rows: int = 0):
        """A step per row (padded to ``rows``): batch and test accuracy and cross-entropy, parameters' PERCENTILES."""
        steps = len(batch_indices)
        padded = np.zeros((max(rows, steps), batch_indices.shape[1]), np.int32)
        padded[:steps] = batch_indices
        numbers = (tf.constant(value, tf.int32) for value in (steps, first_step, eval_interval))
        return tuple(result.numpy()[:steps] for result in self._train_steps(tf.constant(padded), *numbers))

    def test_probabilities(self) -> np.ndarray:
        return self._test_predictions().numpy()
