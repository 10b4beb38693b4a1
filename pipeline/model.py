"""The seed's model and its training step, in Keras 3 on TensorFlow.

One ``Dense(10, softmax)`` layer on 784 pixels, weights from a truncated normal with stddev 0.1 and
zero biases, trained by plain SGD on the cross-entropy *summed* over the batch. After every update
the batch's accuracy and cross-entropy are measured again with the new weights, as the seed does.

What costs time here is not arithmetic (a step is ~3 MFLOP) but per-step overhead, so a whole run of
steps is one XLA-compiled TensorFlow loop: Python is entered once per chunk of steps, not per step.
"""

from __future__ import annotations

import os

# TensorFlow's C++ start-up chatter says nothing our users can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

NUM_PIXELS = 784
NUM_CLASSES = 10
# read_data_sets() scaled pixels by multiplying with 1/255 in float32; doing the same keeps every
# number identical to the seed's inputs.
PIXEL_SCALE = np.float32(1.0 / 255.0)


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1], exactly as the seed's inputs were."""
    return images.astype(np.float32) * PIXEL_SCALE


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


class SgdTrainer:
    """Runs chunks of SGD steps on one model inside a single compiled TensorFlow loop."""

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
            input_signature=[tf.TensorSpec([None, None], tf.int32)],
        )
        self._evaluate = tf.function(self._evaluate_graph, jit_compile=True)

    def _measure(self, labels, probabilities):
        correct = tf.equal(tf.argmax(probabilities, axis=1), tf.argmax(labels, axis=1))
        return tf.reduce_mean(tf.cast(correct, tf.float32)), self.loss(labels, probabilities)

    def _train_steps_graph(self, batch_indices):
        steps = tf.shape(batch_indices)[0]
        accuracies = tf.TensorArray(tf.float32, size=steps)
        cross_entropies = tf.TensorArray(tf.float32, size=steps)
        variables = self.model.trainable_variables
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
        return accuracies.stack(), cross_entropies.stack()

    def _evaluate_graph(self):
        probabilities = self.model(self.test_images)
        return (probabilities, *self._measure(self.test_labels, probabilities))

    def train_steps(self, batch_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one SGD step per row of batch indices; return each step's batch accuracy and cross-entropy."""
        accuracies, cross_entropies = self._train_steps(tf.constant(batch_indices, dtype=tf.int32))
        return accuracies.numpy(), cross_entropies.numpy()

    def evaluate(self) -> tuple[float, float]:
        """Accuracy and summed cross-entropy on the full test set."""
        _, accuracy, cross_entropy = self._evaluate()
        return float(accuracy), float(cross_entropy)

    def test_probabilities(self) -> np.ndarray:
        """The test set's class probabilities, from the same compiled graph as evaluate()."""
        return self._evaluate()[0].numpy()
