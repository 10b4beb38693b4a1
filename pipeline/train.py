"""Stage ``train``: fit the seed's softmax network and record every step.

Reads the processed arrays from ``--data`` and the ``train`` and ``tracking`` sections of
params.yaml. Writes the Keras model (``--model``), the test set's predicted probabilities for the
report stage (``--test-probabilities``, so that report needs no TensorFlow), the per-step history
(``--history``: step, train_accuracy, train_cross_entropy, test_accuracy, test_cross_entropy), the
final training metrics (``--metrics``) and the MLflow run's id (``--run-info``) so that report logs
into the same run.

Measurements follow the seed exactly: after every update, the batch's accuracy and cross-entropy
summed over its images; every ``eval_interval`` steps, the same on the full test set (so the test
cross-entropy is summed over all 10,000 test images).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import files, tracking
from pipeline.cli import PipelineError, run
from pipeline.params import TrainParams, load_params
from pipeline.data import load_processed, scale_pixels

logger = logging.getLogger(__name__)

# The seed prints a line every 1,000 steps.
PRINT_INTERVAL = 1000
HISTORY_COLUMNS = ["step", "train_accuracy", "train_cross_entropy", "test_accuracy", "test_cross_entropy"]


def batch_order(num_examples: int, batch_size: int, iterations: int, seed: int) -> np.ndarray:
    """The example indices of every step's batch, drawn as the seed's ``next_batch`` drew them.

    ``next_batch`` walks through a shuffled permutation and reshuffles at each epoch's end; a batch
    that crosses the end takes the rest of the old permutation and the start of the new one. Laying
    the epochs' permutations end to end and cutting consecutive batches gives exactly that.
    """
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}], got {batch_size}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    rng = np.random.default_rng(seed)
    epochs = -(-iterations * batch_size // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[: iterations * batch_size].reshape(iterations, batch_size).astype(np.int32)


def chunk_ends(iterations: int) -> list[int]:
    """Steps at which Python regains control: every printed line (every PRINT_INTERVAL steps) and the last step.

    Test evaluations happen inside the compiled chunks, so they need no boundary of their own.
    """
    return sorted({*range(PRINT_INTERVAL, iterations + 1, PRINT_INTERVAL), iterations})


@dataclass
class History:
    train_accuracy: list[np.ndarray] = field(default_factory=list)
    train_cross_entropy: list[np.ndarray] = field(default_factory=list)
    test_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_cross_entropy: list[float] = field(default_factory=list)

    def train_series(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.train_accuracy), np.concatenate(self.train_cross_entropy)


# Called after each chunk with (first step, last step, chunk's train accuracies, chunk's train
# cross-entropies, and the chunk's test measurements as (step, accuracy, cross-entropy) tuples).
ChunkCallback = Callable[[int, int, np.ndarray, np.ndarray, list[tuple[int, float, float]]], None]


def train(trainer, order: np.ndarray, eval_interval: int, on_chunk: ChunkCallback | None = None) -> History:
    """Run every step in ``order`` on ``trainer`` and return the seed's measurements."""
    history = History()
    iterations = len(order)
    start = 0
    with tqdm(total=iterations, unit="step", desc="train", disable=None, mininterval=0.5) as progress:
        for end in chunk_ends(iterations):
            accuracy, cross_entropy, test_accuracy, test_cross_entropy = trainer.train_steps(
                order[start:end], start + 1, eval_interval)
            history.train_accuracy.append(accuracy)
            history.train_cross_entropy.append(cross_entropy)
            measured = np.flatnonzero(~np.isnan(test_accuracy))
            tests = [(start + 1 + int(index), float(test_accuracy[index]), float(test_cross_entropy[index]))
                     for index in measured]
            for step, test_accuracy_value, test_cross_entropy_value in tests:
                history.test_steps.append(step)
                history.test_accuracy.append(test_accuracy_value)
                history.test_cross_entropy.append(test_cross_entropy_value)
            # Like the seed's print(i, a, c): the latest test measurement when there is one.
            if history.test_steps:
                logger.info(
                    "step %d: test accuracy %.4f, test cross-entropy %.2f (as of step %d)",
                    end, history.test_accuracy[-1], history.test_cross_entropy[-1], history.test_steps[-1],
                )
            else:
                logger.info("step %d: batch accuracy %.4f, batch cross-entropy %.2f", end, accuracy[-1], cross_entropy[-1])
            if on_chunk is not None:
                on_chunk(start + 1, end, accuracy, cross_entropy, tests)
            progress.update(end - start)
            start = end
    return history


def history_csv(history: History) -> str:
    """The history as CSV: one row per step, the test columns filled only at evaluation steps."""
    train_accuracy, train_cross_entropy = history.train_series()
    tests = dict(zip(history.test_steps, zip(history.test_accuracy, history.test_cross_entropy)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for step, (accuracy, cross_entropy) in enumerate(zip(train_accuracy, train_cross_entropy), start=1):
        test_accuracy, test_cross_entropy = tests.get(step, ("", ""))
        writer.writerow([step, repr(float(accuracy)), repr(float(cross_entropy)),
                         test_accuracy if test_accuracy == "" else repr(test_accuracy),
                         test_cross_entropy if test_cross_entropy == "" else repr(test_cross_entropy)])
    return buffer.getvalue()


def final_metrics(history: History) -> dict[str, float]:
    train_accuracy, train_cross_entropy = history.train_series()
    metrics = {
        "final_train_accuracy": float(train_accuracy[-1]),
        "final_train_cross_entropy": float(train_cross_entropy[-1]),
    }
    if history.test_steps:
        metrics["final_test_accuracy"] = history.test_accuracy[-1]
        metrics["final_test_cross_entropy"] = history.test_cross_entropy[-1]
    return metrics


def run_name(params: TrainParams) -> str:
    return f"lr={params.learning_rate:g} bs={params.batch_size} it={params.iterations} seed={params.seed}"


def chunk_series(first_step: int, last_step: int, accuracy: np.ndarray, cross_entropy: np.ndarray,
                 tests: list[tuple[int, float, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """A chunk's measurements as MLflow metric histories: {key: (steps, values)}."""
    steps = list(range(first_step, last_step + 1))
    series = {"train_accuracy": (steps, accuracy.tolist()), "train_cross_entropy": (steps, cross_entropy.tolist())}
    if tests:
        series["test_accuracy"] = ([step for step, _, _ in tests], [value for _, value, _ in tests])
        series["test_cross_entropy"] = ([step for step, _, _ in tests], [value for _, _, value in tests])
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--test-probabilities", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    config, tracking_params = params.train, params.tracking

    data = load_processed(args.data, splits=("train", "test"))
    num_train = len(data["train_images"])
    if config.batch_size > num_train:
        raise PipelineError(f"train.batch_size ({config.batch_size}) is larger than the training set ({num_train} images).")

    # MLflow works in a helper process from here on, so that opening (or creating) the store
    # overlaps TensorFlow's import below and logging the history overlaps the training loop.
    recorder = tracking.RunRecorder(
        tracking_params.uri, tracking_params.experiment, run_name=run_name(config), tags=tracking.run_tags(),
        params={
            **{f"train.{key}": value for key, value in vars(config).items()},
            "tracking.experiment": tracking_params.experiment,
            "data.train_examples": num_train,
            "data.test_examples": len(data["test_images"]),
            "model": "Dense(10, softmax) on 784 pixels",
            "loss": "cross-entropy summed over the batch",
            "optimizer": "SGD",
        },
    )
    with recorder:
        # pipeline.model quietens TensorFlow's start-up logging, so it is imported first.
        from pipeline.model import SgdTrainer, build_model

        import keras
        import tensorflow as tf

        # Keras' per-call progress bars would interleave with ours when MLflow checks the model;
        # without them Keras reports through absl's logger, which only needs to speak up about problems.
        keras.config.disable_interactive_logging()
        logging.getLogger("absl").setLevel(logging.WARNING)

        # Seeds fix the initial weights; op determinism makes reductions repeat bit for bit.
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
        # A step is far too small to gain from splitting across cores (one thread is ~30% faster per
        # step, with identical numbers), and it leaves the other core to MLflow's helper process.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        model = build_model(config.seed)
        trainer = SgdTrainer(model, config.learning_rate, data["train_images"], data["train_labels"],
                             data["test_images"], data["test_labels"])
        order = batch_order(num_train, config.batch_size, config.iterations, config.seed)

        # Logging the model needs MLflow in this process too. Its import overlaps the training loop,
        # which after tracing runs native code that leaves the interpreter lock free.
        trainer.trace()
        client = tracking.open_client_in_background(recorder)

        def record(*chunk) -> None:
            recorder.log_series(chunk_series(*chunk))

        started = time.perf_counter()
        history = train(trainer, order, config.eval_interval, on_chunk=record)
        train_seconds = time.perf_counter() - started
        run_info = recorder.wait_ready()
        logger.info("MLflow run %s (%s) in experiment %r", run_info["run_id"], run_name(config), tracking_params.experiment)

        metrics = final_metrics(history)
        logger.info("trained %d steps in %.1f s: %s", config.iterations, train_seconds, metrics)
        with files.atomic_path(args.model) as temp_model:
            model.save(temp_model)
        with files.atomic_path(args.test_probabilities) as temp_probabilities:
            np.save(temp_probabilities, trainer.test_probabilities(), allow_pickle=False)
        files.write_text(args.history, history_csv(history))
        files.write_json(args.metrics, metrics)

        recorder.log_artifact(args.history)
        tracking.log_keras_model(
            client.result(),
            run_info["run_id"],
            run_info["experiment_id"],
            model,
            scale_pixels(data["test_images"][:5]),
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
            metrics={**metrics, "train_seconds": train_seconds},
        )
    # The run is complete (the recorder waited for every value to be logged) before report may use it.
    tracking.write_run_info(args.run_info, run_info["run_id"], run_info["experiment_id"], run_info["tracking_uri"])


if __name__ == "__main__":
    run(main)
