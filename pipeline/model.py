"""The seed's model, the rest of Martin Gorner's "TensorFlow without a PhD" series, and their training step.

The seed's model (``softmax``): one ``Dense(10, softmax)`` layer on 784 pixels, weights from a
truncated normal with stddev 0.1 and zero biases, trained by plain SGD on the cross-entropy *summed*
over the batch. The other models (:data:`SERIES`) are built as in the author's scripts
(GoogleCloudPlatform/tensorflow-without-a-phd, ``tensorflow-mnist-tutorial/mnist_*.py``): the same
layers, activations, initial values, optimiser and learning-rate schedule. His scripts' loss,
``reduce_mean(cross-entropy) * 100`` on batches of 100, is the seed's sum over the batch, so every
model trains on the same loss. After every update the batch's accuracy and cross-entropy are
measured again with the new weights, as the seed does.

What costs the seed's model time is not arithmetic (a step is ~3 MFLOP) but per-step overhead, so a
whole run of steps, test evaluations included, is one XLA-compiled TensorFlow loop: Python is entered once per
chunk of steps, not per step or per evaluation.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS, PERCENTILES, PIXEL_SCALE, scale_pixels

# A fixed time for every entry of a saved archive (zip's earliest), so that equal models give equal bytes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
SHARED_OBJECT_ID = re.compile(r'("shared_object_id": )(\d+)')


def _renumber():
    """A re.sub replacement that numbers distinct shared-object ids 1, 2, 3… in order of appearance."""
    numbers: dict[str, int] = {}

    def replace(match: re.Match) -> str:
        return f"{match.group(1)}{numbers.setdefault(match.group(2), len(numbers) + 1)}"

    return replace


def _softmax(seed: int) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(NUM_PIXELS,), name="pixels"),
            layers.Dense(
                NUM_CLASSES,
                activation="softmax",
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.1, seed=seed),
                bias_initializer="zeros",
                name="softmax",
            ),
        ],
        name="mnist_softmax",
    )
    return model


def raw_pixel_model(model: keras.Model) -> keras.Model:
    """``model`` behind a layer that scales raw pixels (uint8, 0-255) as training did.

    This is the model users get (``models/model.keras``, the logged and served MLflow model): it
    takes pixels as the IDX files and image files hold them, so nobody has to know the scaling.
    Rescaling computes ``float32(pixels) * float32(1/255) + 0``, which gives the trained model the
    very float32 inputs :func:`pipeline.data.scale_pixels` gave it, so the probabilities are
    bit-identical to the trained model's on scaled pixels.
    """
    return keras.Sequential(
        [
            keras.Input(shape=(NUM_PIXELS,), dtype="uint8", name="raw_pixels"),
            layers.Rescaling(float(PIXEL_SCALE), name="scale_pixels"),
            model,
        ],
        name="mnist_softmax_raw_pixels",
    )


def _weights(seed: int, layer: int) -> keras.initializers.Initializer:
    """The author's ``tf.truncated_normal(shape, stddev=0.1)``, a different stream for every layer."""
    return keras.initializers.TruncatedNormal(stddev=0.1, seed=seed + layer)


def _five_layers(seed: int, activation: str, bias: float, dropout: float, name: str) -> keras.Model:
    """Scripts 2.0-2.2: dense layers of 200, 100, 60 and 30 neurons, then 10 softmax neurons.

    The author initialises the biases at 0 for sigmoids and at 0.1 for relus (so that they start in
    their active range), the last layer's at 0 in both cases; dropout follows each hidden layer.
    """
    stack: list = [keras.Input(shape=(NUM_PIXELS,), name="pixels")]
    for layer, units in enumerate((200, 100, 60, 30)):
        stack.append(
            layers.Dense(
                units,
                activation=activation,
                kernel_initializer=_weights(seed, layer),
                bias_initializer=keras.initializers.Constant(bias),
            )
        )
        if dropout:
            stack.append(layers.Dropout(dropout, seed=seed + layer))
    stack.append(
        layers.Dense(NUM_CLASSES, activation="softmax", kernel_initializer=_weights(seed, 4), bias_initializer="zeros")
    )
    return keras.Sequential(stack, name=name)


def _convolutional(
    seed: int, filters: tuple[int, int, int], patches: tuple[int, int, int], dropout: float, name: str
) -> keras.Model:
    """Scripts 3.0 and 3.1: three relu convolutions (strides 1, 2, 2, so 28x28 -> 14x14 -> 7x7), a
    dense relu layer of 200 neurons (dropout after it) and 10 softmax neurons; every bias starts at 0.1.
    """
    bias = keras.initializers.Constant(0.1)
    stack: list = [keras.Input(shape=(NUM_PIXELS,), name="pixels"), layers.Reshape((*IMAGE_SHAPE, 1))]
    for layer, (depth, patch, stride) in enumerate(zip(filters, patches, (1, 2, 2))):
        stack.append(
            layers.Conv2D(
                depth,
                patch,
                strides=stride,
                padding="same",
                activation="relu",
                kernel_initializer=_weights(seed, layer),
                bias_initializer=bias,
            )
        )
    stack += [
        layers.Flatten(),
        layers.Dense(200, activation="relu", kernel_initializer=_weights(seed, 3), bias_initializer=bias),
    ]
    if dropout:
        stack.append(layers.Dropout(dropout, seed=seed))
    stack.append(
        layers.Dense(NUM_CLASSES, activation="softmax", kernel_initializer=_weights(seed, 4), bias_initializer=bias)
    )
    return keras.Sequential(stack, name=name)


def _batch_norm() -> layers.BatchNormalization:
    """Script 4.2's ``batchnorm()``: moving averages with decay 0.999, epsilon 1e-5, no scale (useless
    before a relu), and the layer's bias as the normalisation's offset (0.1 at first).

    His moving averages also warm up (TensorFlow 1's ``ExponentialMovingAverage(0.999, iteration)``
    uses the decay min(0.999, (1 + step) / (10 + step))); Keras' fixed momentum has no such warm-up,
    which only makes the first evaluations' statistics lag the weights.
    """
    return layers.BatchNormalization(
        momentum=0.999, epsilon=1e-5, scale=False, beta_initializer=keras.initializers.Constant(0.1)
    )


def _convolutional_batch_norm(seed: int) -> keras.Model:
    """Script 4.2: convolutions of 24, 48 and 64 channels (6x6, 5x5, 4x4 patches), each batch-normalised
    before its relu, then a batch-normalised dense relu layer of 200 neurons with dropout (keep 0.75;
    the script keeps every convolutional activation) and 10 softmax neurons with biases at 0.1.
    """
    stack: list = [keras.Input(shape=(NUM_PIXELS,), name="pixels"), layers.Reshape((*IMAGE_SHAPE, 1))]
    for layer, (depth, patch, stride) in enumerate(zip((24, 48, 64), (6, 5, 4), (1, 2, 2))):
        stack += [
            layers.Conv2D(
                depth, patch, strides=stride, padding="same", use_bias=False, kernel_initializer=_weights(seed, layer)
            ),
            _batch_norm(),
            layers.ReLU(),
        ]
    stack += [
        layers.Flatten(),
        layers.Dense(200, use_bias=False, kernel_initializer=_weights(seed, 3)),
        _batch_norm(),
        layers.ReLU(),
        layers.Dropout(0.25, seed=seed),
        layers.Dense(
            NUM_CLASSES,
            activation="softmax",
            kernel_initializer=_weights(seed, 4),
            bias_initializer=keras.initializers.Constant(0.1),
        ),
    ]
    return keras.Sequential(stack, name="mnist_conv_batchnorm")


@keras.saving.register_keras_serializable(package="pipeline")
class DecayToFloor(keras.optimizers.schedules.LearningRateSchedule):
    """The author's decaying rate: ``floor + initial * exp(-step / decay_steps)``, the first update being step 0.

    His scripts write it ``0.0001 + tf.train.exponential_decay(initial, step, decay_steps, 1/e)``.
    """

    def __init__(self, initial: float, decay_steps: int, floor: float) -> None:
        self.initial, self.decay_steps, self.floor = initial, decay_steps, floor
        self.decay = keras.optimizers.schedules.ExponentialDecay(initial, decay_steps, 1 / math.e)

    def __call__(self, step):
        return self.floor + self.decay(step)

    def get_config(self) -> dict:
        return {"initial": self.initial, "decay_steps": self.decay_steps, "floor": self.floor}


def _adam(learning_rate) -> keras.optimizers.Optimizer:
    # TensorFlow 1's AdamOptimizer, which the scripts use, has epsilon 1e-8 (Keras' default is 1e-7).
    return keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-8)


@dataclass(frozen=True)
class Series:
    """One model of the series: the author's script, how to build it and the optimiser it trains with."""

    script: str
    description: str
    build: Callable[[int], keras.Model]
    # Given train.learning_rate, which only the seed's SGD model uses (the others keep their script's).
    optimizer: Callable[[float], keras.optimizers.Optimizer]
    optimizer_description: str
    # Test images per model call when the test set is measured: the convolutional nets' activations
    # for all 10,000 images at once would take gigabytes. None: all in one call, as the seed does.
    test_batch_size: int | None = None
    # Whether XLA compiles the step loop. Not for the convolutional nets: on this CPU, XLA's
    # convolutions made script 3.0's net 1.7x slower per step and 5x slower per test evaluation than
    # TensorFlow's own kernels (measured on the real data, one thread each).
    jit_compile: bool = True


# 0.003 decaying to 0.0001 with a time constant of 2,000 steps (scripts 2.1 to 3.1).
_DECAY = (0.003, 2000, 0.0001)

SERIES: dict[str, Series] = {
    "softmax": Series(
        "mnist_1.0_softmax.py (the seed notebook's variant)",
        "Dense(10, softmax) on 784 pixels",
        _softmax,
        lambda learning_rate: keras.optimizers.SGD(learning_rate=learning_rate),
        "SGD, rate train.learning_rate",
    ),
    "five_layers_sigmoid": Series(
        "mnist_2.0_five_layers_sigmoid.py",
        "Dense 200-100-60-30 sigmoid, Dense(10, softmax)",
        lambda seed: _five_layers(seed, "sigmoid", 0.0, 0.0, "mnist_five_layers_sigmoid"),
        lambda _: _adam(0.003),
        "Adam, rate 0.003",
    ),
    "five_layers_relu": Series(
        "mnist_2.0_five_layers_sigmoid.py with relu (results listed in its comments)",
        "Dense 200-100-60-30 relu, Dense(10, softmax)",
        lambda seed: _five_layers(seed, "relu", 0.1, 0.0, "mnist_five_layers_relu"),
        lambda _: _adam(0.003),
        "Adam, rate 0.003",
    ),
    "five_layers_relu_lrdecay": Series(
        "mnist_2.1_five_layers_relu_lrdecay.py",
        "Dense 200-100-60-30 relu, Dense(10, softmax)",
        lambda seed: _five_layers(seed, "relu", 0.1, 0.0, "mnist_five_layers_relu_lrdecay"),
        lambda _: _adam(DecayToFloor(*_DECAY)),
        "Adam, rate 0.0001 + 0.003 exp(-step/2000)",
    ),
    "five_layers_relu_lrdecay_dropout": Series(
        "mnist_2.2_five_layers_relu_lrdecay_dropout.py",
        "Dense 200-100-60-30 relu, each with dropout 0.25, Dense(10, softmax)",
        lambda seed: _five_layers(seed, "relu", 0.1, 0.25, "mnist_five_layers_relu_lrdecay_dropout"),
        lambda _: _adam(DecayToFloor(*_DECAY)),
        "Adam, rate 0.0001 + 0.003 exp(-step/2000)",
    ),
    "conv": Series(
        "mnist_3.0_convolutional.py",
        "Conv 4 (5x5/1), 8 (5x5/2), 12 (4x4/2) relu, Dense 200 relu, Dense(10, softmax)",
        lambda seed: _convolutional(seed, (4, 8, 12), (5, 5, 4), 0.0, "mnist_conv"),
        lambda _: _adam(DecayToFloor(*_DECAY)),
        "Adam, rate 0.0001 + 0.003 exp(-step/2000)",
        test_batch_size=1000,
        jit_compile=False,
    ),
    "conv_bigger_dropout": Series(
        "mnist_3.1_convolutional_bigger_dropout.py",
        "Conv 6 (6x6/1), 12 (5x5/2), 24 (4x4/2) relu, Dense 200 relu + dropout 0.25, Dense(10, softmax)",
        lambda seed: _convolutional(seed, (6, 12, 24), (6, 5, 4), 0.25, "mnist_conv_bigger_dropout"),
        lambda _: _adam(DecayToFloor(*_DECAY)),
        "Adam, rate 0.0001 + 0.003 exp(-step/2000)",
        test_batch_size=1000,
        jit_compile=False,
    ),
    "conv_batchnorm": Series(
        "mnist_4.2_batchnorm_convolutional.py",
        "Conv 24 (6x6/1), 48 (5x5/2), 64 (4x4/2) + batch norm + relu, "
        "Dense 200 + batch norm + relu + dropout 0.25, Dense(10, softmax)",
        _convolutional_batch_norm,
        lambda _: _adam(DecayToFloor(0.02, 1600, 0.0001)),
        "Adam, rate 0.0001 + 0.02 exp(-step/1600)",
        test_batch_size=1000,
        jit_compile=False,
    ),
}


def build_model(seed: int, name: str = "softmax") -> keras.Model:
    """The model ``name`` of the series (the seed's by default), its initial weights drawn from ``seed``."""
    return SERIES[name].build(seed)


def save_model(model: keras.Model, path: Path) -> None:
    """Save ``model`` as a ``.keras`` archive whose bytes depend on the model alone.

    Keras stamps the save time into the archive (``date_saved`` in metadata.json, and the weights
    file's zip entry time) and names objects that several layers share by their memory address
    (``shared_object_id`` in config.json), so the same model would differ byte for byte from one run
    to the next and DVC would record a new output every time. The archive is rewritten without the
    times and with the shared objects numbered in order of appearance; Keras reads no time when it
    loads a model, and needs shared ids only to match each other.
    """
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = SHARED_OBJECT_ID.sub(_renumber(), data.decode()).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
            archive.writestr(entry, data)


# The variables counted as biases in the percentile bands: dense and convolution biases, and batch
# normalisation's offsets (which take the biases' place in the author's batch-normalised models).
BIAS_NAMES = ("bias", "beta")


def parameter_groups(model: keras.Model) -> tuple[list, list]:
    """The model's weights (every trainable variable of two or more dimensions: dense and convolution
    kernels) and its biases (the trainable variables named in BIAS_NAMES), as the author's
    visualisation groups them. Other variables (batch normalisation's scales) belong to neither.
    """
    variables = model.trainable_variables
    weights = [variable for variable in variables if len(variable.shape) >= 2]
    biases = [variable for variable in variables if variable.name in BIAS_NAMES]
    return weights, biases


def percentiles_graph(variables: list) -> tf.Tensor:
    """PERCENTILES of every value of ``variables`` taken together, interpolated linearly as
    numpy.percentile does; NaN when there are none. Traced into the training loop.
    """
    if not variables:
        return tf.fill([len(PERCENTILES)], tf.constant(np.nan, tf.float32))
    values = tf.sort(tf.concat([tf.reshape(tf.cast(variable, tf.float32), [-1]) for variable in variables], 0))
    count = sum(int(np.prod(variable.shape)) for variable in variables)
    # The positions are known when the loop is traced, so only two gathers run in it.
    positions = np.array(PERCENTILES) / 100 * (count - 1)
    lower, upper = np.floor(positions).astype(np.int32), np.ceil(positions).astype(np.int32)
    fraction = tf.constant(positions - lower, tf.float32)
    below, above = tf.gather(values, lower), tf.gather(values, upper)
    return below + (above - below) * fraction


def weight_maps(model: keras.Model) -> np.ndarray:
    """The ten 28×28 weight maps of a linear classifier (one dense layer from the pixels to the ten
    classes, like the seed's): each class's weight for every pixel. Other models have no such
    picture, so for them the array is empty (shape (0, 28, 28)).
    """
    weights, _ = parameter_groups(model)
    if len(weights) != 1 or tuple(weights[0].shape) != (NUM_PIXELS, NUM_CLASSES):
        return np.zeros((0, *IMAGE_SHAPE), np.float32)
    return np.asarray(weights[0].numpy(), np.float32).T.reshape(NUM_CLASSES, *IMAGE_SHAPE)


class SgdTrainer:
    """Runs chunks of gradient-descent steps, test evaluations included, inside a single compiled TensorFlow loop.

    ``optimizer`` is a Keras optimiser, or a learning rate for the seed's plain SGD. Dropout layers
    draw their masks from Keras' seeded generators (the loop calls the model with training=True) and
    batch normalisation updates its moving averages in that same call, so both run inside the loop.
    ``test_batch_size`` splits the test set's evaluation into model calls of that many images (None:
    one call for all, as the seed's model does); ``jit_compile=False`` runs the loop as a TensorFlow
    graph without XLA.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer | float,
        train_images: np.ndarray,
        train_labels: np.ndarray,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        test_batch_size: int | None = None,
        jit_compile: bool = True,
    ) -> None:
        self.model = model
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            optimizer = keras.optimizers.SGD(learning_rate=optimizer)
        self.optimizer = optimizer
        self.optimizer.build(model.trainable_variables)
        self.test_batch_size = test_batch_size
        # Keras computes this from the softmax's logits, so it is numerically stable.
        self.loss = keras.losses.CategoricalCrossentropy(reduction="sum")
        # The training set stays uint8 in memory; each batch is gathered and scaled on the fly.
        self.train_images = tf.constant(train_images)
        self.train_labels = tf.constant(train_labels)
        self.test_images = tf.constant(scale_pixels(test_images))
        self.test_labels = tf.constant(test_labels.astype(np.float32))
        self._train_steps = tf.function(
            self._train_steps_graph,
            jit_compile=jit_compile,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    def _measure(self, labels, probabilities):
        correct = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(labels, axis=1))
        return tf.reduce_mean(tf.cast(correct, tf.float32)), self.loss(labels, probabilities)

    def _train_steps_graph(self, batch_indices, steps, first_step, eval_interval):
        rows = tf.shape(batch_indices)[0]
        accuracies = tf.TensorArray(tf.float32, size=rows, element_shape=[])
        cross_entropies = tf.TensorArray(tf.float32, size=rows, element_shape=[])
        test_accuracies = tf.TensorArray(tf.float32, size=rows, element_shape=[])
        test_cross_entropies = tf.TensorArray(tf.float32, size=rows, element_shape=[])
        weight_percentiles = tf.TensorArray(tf.float32, size=rows, element_shape=[len(PERCENTILES)])
        bias_percentiles = tf.TensorArray(tf.float32, size=rows, element_shape=[len(PERCENTILES)])
        variables = self.model.trainable_variables
        weights, biases = parameter_groups(self.model)
        nan, nans = tf.constant(np.nan, tf.float32), tf.fill([len(PERCENTILES)], tf.constant(np.nan, tf.float32))
        not_measured = (nan, nan, nans, nans)

        def measure_test_set_and_parameters():
            return (
                *self._measure(self.test_labels, self._test_predictions()),
                percentiles_graph(weights),
                percentiles_graph(biases),
            )

        # XLA needs the loop's bound when it compiles, so the loop counts rows and stops at ``steps``.
        for step in tf.range(rows):
            if step == steps:
                break
            images = tf.cast(tf.gather(self.train_images, batch_indices[step]), tf.float32) * PIXEL_SCALE
            labels = tf.cast(tf.gather(self.train_labels, batch_indices[step]), tf.float32)
            with tf.GradientTape() as tape:
                loss = self.loss(labels, self.model(images, training=True))
            self.optimizer.apply(tape.gradient(loss, variables), variables)
            # The seed measures the batch again after the update.
            accuracy, cross_entropy = self._measure(labels, self.model(images))
            accuracies = accuracies.write(step, accuracy)
            cross_entropies = cross_entropies.write(step, cross_entropy)
            # And the test set, and the distribution of the weights and biases, every eval_interval
            # steps (step numbers count from 1).
            due = (eval_interval > 0) & ((first_step + step) % tf.maximum(eval_interval, 1) == 0)
            test_accuracy, test_cross_entropy, weight_percentile, bias_percentile = tf.cond(
                due, measure_test_set_and_parameters, lambda: not_measured
            )
            test_accuracies = test_accuracies.write(step, test_accuracy)
            test_cross_entropies = test_cross_entropies.write(step, test_cross_entropy)
            weight_percentiles = weight_percentiles.write(step, weight_percentile)
            bias_percentiles = bias_percentiles.write(step, bias_percentile)
        return (
            accuracies.stack(),
            cross_entropies.stack(),
            test_accuracies.stack(),
            test_cross_entropies.stack(),
            weight_percentiles.stack(),
            bias_percentiles.stack(),
        )

    def _test_predictions(self):
        if self.test_batch_size is None:
            return self.model(self.test_images)
        chunks = range(0, int(self.test_images.shape[0]), self.test_batch_size)
        return tf.concat([self.model(self.test_images[start : start + self.test_batch_size]) for start in chunks], 0)

    def trace(self) -> None:
        """Build the step loop's TensorFlow graph now; XLA compiles it on the first train_steps call.

        Tracing runs Python code; compiling and running the loop run native code that releases the
        interpreter lock. Tracing first lets a background thread (train's MLflow import) use the
        lock while the loop compiles and runs, instead of slowing the tracing down.
        """
        self._train_steps.get_concrete_function()

    def train_steps(self, batch_indices: np.ndarray, first_step: int = 1, eval_interval: int = 0, rows: int = 0):
        """Run one SGD step per row of batch indices, the first being step number ``first_step``.

        Returns six arrays with one row per step: the batch's accuracy and cross-entropy after the
        update; the test set's, and the PERCENTILES of the weights and of the biases (see
        parameter_groups), measured after every step whose number is a multiple of
        ``eval_interval`` (0: never) and NaN after the others.

        XLA compiles the loop once per shape of its input (about half a second each), so chunks of
        different lengths are padded to ``rows`` rows (unused: the loop runs one step per given row)
        and share one compiled loop.
        """
        steps = len(batch_indices)
        padded = np.zeros((max(rows, steps), batch_indices.shape[1]), np.int32)
        padded[:steps] = batch_indices
        results = self._train_steps(
            tf.constant(padded),
            tf.constant(steps, tf.int32),
            tf.constant(first_step, tf.int32),
            tf.constant(eval_interval, tf.int32),
        )
        return tuple(result.numpy()[:steps] for result in results)

    def test_probabilities(self) -> np.ndarray:
        """The test set's class probabilities (once per run: not worth compiling)."""
        return self._test_predictions().numpy()
