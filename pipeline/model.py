"""The seed's model and its training step, in Keras 3 on TensorFlow.

One ``Dense(10, softmax)`` layer on 784 pixels, weights from a truncated normal with stddev 0.1 and
zero biases, trained by plain SGD on the cross-entropy *summed* over the batch. After every update
the batch's accuracy and cross-entropy are measured again with the new weights, as the seed does.

What costs time here is not arithmetic (a step is ~3 MFLOP) but per-step overhead, so a whole run of
steps, test evaluations included, is one XLA-compiled TensorFlow loop: Python is entered once per
chunk of steps, not per step or per evaluation.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS, PERCENTILES, PIXEL_SCALE, scale_pixels

# TensorFlow's C++ start-up chatter says nothing our users can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402 - after the setting above, which TensorFlow reads when it loads.
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

# A fixed time for every entry of a saved archive (zip's earliest), so that equal models give equal bytes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
SHARED_OBJECT_ID = re.compile(r'("shared_object_id": )(\d+)')


def _renumber():
    """A re.sub replacement that numbers distinct shared-object ids 1, 2, 3… in order of appearance."""
    numbers: dict[str, int] = {}

    def replace(match: re.Match) -> str:
        return f"{match.group(1)}{numbers.setdefault(match.group(2), len(numbers) + 1)}"

    return replace


def build_model(seed: int) -> keras.Model:
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
    """Runs chunks of SGD steps, test evaluations included, inside a single compiled TensorFlow loop."""

    def __init__(
        self,
        model: keras.Model,
        learning_rate: float,
        train_images: np.ndarray,
        train_labels: np.ndarray,
        test_images: np.ndarray,
        test_labels: np.ndarray,
    ) -> None:
        self.model = model
        self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
        self.optimizer.build(model.trainable_variables)
        # Keras computes this from the softmax's logits, so it is numerically stable.
        self.loss = keras.losses.CategoricalCrossentropy(reduction="sum")
        # The training set stays uint8 in memory; each batch is gathered and scaled on the fly.
        self.train_images = tf.constant(train_images)
        self.train_labels = tf.constant(train_labels)
        self.test_images = tf.constant(scale_pixels(test_images))
        self.test_labels = tf.constant(test_labels.astype(np.float32))
        self._train_steps = tf.function(
            self._train_steps_graph,
            jit_compile=True,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    def _measure(self, labels, probabilities):
        correct = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(labels, axis=1))
        return tf.reduce_mean(tf.cast(correct, tf.float32)), self.loss(labels, probabilities)

    def _train_steps_graph(self, batch_indices, first_step, eval_interval):
        steps = tf.shape(batch_indices)[0]
        accuracies = tf.TensorArray(tf.float32, size=steps)
        cross_entropies = tf.TensorArray(tf.float32, size=steps)
        test_accuracies = tf.TensorArray(tf.float32, size=steps)
        test_cross_entropies = tf.TensorArray(tf.float32, size=steps)
        weight_percentiles = tf.TensorArray(tf.float32, size=steps, element_shape=[len(PERCENTILES)])
        bias_percentiles = tf.TensorArray(tf.float32, size=steps, element_shape=[len(PERCENTILES)])
        variables = self.model.trainable_variables
        weights, biases = parameter_groups(self.model)
        nan, nans = tf.constant(np.nan, tf.float32), tf.fill([len(PERCENTILES)], tf.constant(np.nan, tf.float32))
        not_measured = (nan, nan, nans, nans)

        def measure_test_set_and_parameters():
            return (
                *self._measure(self.test_labels, self.model(self.test_images)),
                percentiles_graph(weights),
                percentiles_graph(biases),
            )

        for step in tf.range(steps):
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

    def trace(self) -> None:
        """Build the step loop's TensorFlow graph now; XLA compiles it on the first train_steps call.

        Tracing runs Python code; compiling and running the loop run native code that releases the
        interpreter lock. Tracing first lets a background thread (train's MLflow import) use the
        lock while the loop compiles and runs, instead of slowing the tracing down.
        """
        self._train_steps.get_concrete_function()

    def train_steps(self, batch_indices: np.ndarray, first_step: int = 1, eval_interval: int = 0):
        """Run one SGD step per row of batch indices, the first being step number ``first_step``.

        Returns six arrays with one row per step: the batch's accuracy and cross-entropy after the
        update; the test set's, and the PERCENTILES of the weights and of the biases (see
        parameter_groups), measured after every step whose number is a multiple of
        ``eval_interval`` (0: never) and NaN after the others.
        """
        results = self._train_steps(
            tf.constant(batch_indices, dtype=tf.int32),
            tf.constant(first_step, tf.int32),
            tf.constant(eval_interval, tf.int32),
        )
        return tuple(result.numpy() for result in results)

    def test_probabilities(self) -> np.ndarray:
        """The test set's class probabilities (one call of the model: not worth compiling)."""
        return self.model(self.test_images).numpy()
