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

from pipeline.data import NUM_CLASSES, NUM_PIXELS, PIXEL_SCALE, scale_pixels

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
        variables = self.model.trainable_variables
        not_measured = (tf.constant(np.nan, tf.float32), tf.constant(np.nan, tf.float32))
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
            # And the test set every eval_interval steps (step numbers count from 1).
            due = (eval_interval > 0) & ((first_step + step) % tf.maximum(eval_interval, 1) == 0)
            test_accuracy, test_cross_entropy = tf.cond(
                due, lambda: self._measure(self.test_labels, self.model(self.test_images)), lambda: not_measured
            )
            test_accuracies = test_accuracies.write(step, test_accuracy)
            test_cross_entropies = test_cross_entropies.write(step, test_cross_entropy)
        return accuracies.stack(), cross_entropies.stack(), test_accuracies.stack(), test_cross_entropies.stack()

    def trace(self) -> None:
        """Build the step loop's TensorFlow graph now; XLA compiles it on the first train_steps call.

        Tracing runs Python code; compiling and running the loop run native code that releases the
        interpreter lock. Tracing first lets a background thread (train's MLflow import) use the
        lock while the loop compiles and runs, instead of slowing the tracing down.
        """
        self._train_steps.get_concrete_function()

    def train_steps(self, batch_indices: np.ndarray, first_step: int = 1, eval_interval: int = 0):
        """Run one SGD step per row of batch indices, the first being step number ``first_step``.

        Returns four arrays with one value per step: the batch's accuracy and cross-entropy after
        the update, and the test set's, measured after every step whose number is a multiple of
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
