"""Stage ``train``: fit the model ``train.model`` names (the seed's softmax by default), recording every step.

Reads the processed arrays from ``--data``, the ``train`` section of params.yaml and the tracking
settings (pipeline.params.tracking_settings). Writes the Keras model (``--model``: the trained
network behind a layer that scales raw 0-255 pixels, see pipeline.model.raw_pixel_model), and for
the report stage, which needs no TensorFlow, the test set's predicted probabilities
(``--test-probabilities``) and the model's weight maps (``--weight-maps``: ten 28×28 maps for a
linear classifier, none for other models). Writes the histories (columns in pipeline.data): every
step's (``--train-history``), every evaluation's (``--test-history``) and the weights' and biases'
percentiles at every evaluation (``--parameter-percentiles``); and the final training metrics with
the environment that produced them (``--metrics``). Records one MLflow run (see
pipeline.tracking.record): params, tags (the data's from the files read), the per-step history,
the model (as pipeline.serving serves it), the history files, the final metrics and the test metrics
the gate compares (pipeline.score), and registers the model as a new version of the registered model
``$MNIST_REGISTERED_MODEL`` names, or links the run to the version that already holds the same model
and metrics (see pipeline.tracking.registry). The outputs are replaced only after the run is recorded.

Measurements follow the seed exactly: after every update, the batch's accuracy and cross-entropy
summed over its images; every ``eval_interval`` steps, the same on the full test set (so the test
cross-entropy is summed over all 10,000 test images). Names ending in ``_sum`` say so.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import files, score
from pipeline.cli import PipelineError, native_stderr_silenced, path_arguments, run
from pipeline.data import (
    PERCENTILE_COLUMNS,
    TEST_HISTORY_COLUMNS,
    TRAIN_HISTORY_COLUMNS,
    load_processed,
)
from pipeline.params import TrainParams, load_params, tracking_settings
from pipeline.tracking import record, registry, store, tags

logger = logging.getLogger(__name__)

# The seed prints a line every 1,000 steps.
PRINT_INTERVAL = 1000
# Python regains control between chunks of steps run as one compiled loop: to stop on Ctrl-C or
# SIGTERM and to hand the history to MLflow. Each chunk runs as many steps as the previous chunk's
# pace fits in about this many seconds, whatever the model (a step of conv_batchnorm takes some
# 300 times as long as one of the seed's softmax); chunks also end at every printed line.
CHUNK_SECONDS = 0.5
# A chunk's batch indices reach the compiled loop as one int32 tensor; this many indices at most
# (40 MB), so that a large batch size gives shorter chunks instead of a tensor of gigabytes.
MAX_CHUNK_INDICES = 10_000_000


class BatchOrder:
    """The example indices of every step's batch, drawn as the seed's ``next_batch`` drew them.

    ``next_batch`` walks through a shuffled permutation and reshuffles at each epoch's end; a batch
    that crosses the end takes the rest of the old permutation and the start of the new one. Laying
    the epochs' permutations end to end and cutting consecutive batches gives exactly that. The
    permutations are drawn as the steps are asked for, in order (``order[start:end]``), so memory
    holds one chunk's batches, not the whole run's: 10,000 steps of a 55,000-image batch would be
    2.2 GB of indices.
    """

    def __init__(self, num_examples: int, batch_size: int, iterations: int, seed: int) -> None:
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(f"batch_size must be in [1, {num_examples}], got {batch_size}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        self.num_examples, self.batch_size, self.iterations = num_examples, batch_size, iterations
        self.rng = np.random.default_rng(seed)
        self.next_step = 0
        self.drawn = np.empty(0, np.int32)  # Indices drawn but not yet handed out.

    def __len__(self) -> int:
        return self.iterations

    @property
    def shape(self) -> tuple[int, int]:
        """(steps, batch size), as the whole order's array would have."""
        return self.iterations, self.batch_size

    def __getitem__(self, steps: slice) -> np.ndarray:
        start, stop, stride = steps.indices(self.iterations)
        if start != self.next_step or stride != 1:
            raise ValueError(f"steps must be asked for in order: expected a slice from {self.next_step}, got {steps}")
        needed = (stop - start) * self.batch_size
        parts = [self.drawn]
        available = len(self.drawn)
        while available < needed:
            parts.append(self.rng.permutation(self.num_examples).astype(np.int32))
            available += self.num_examples
        indices = np.concatenate(parts)
        self.drawn, self.next_step = indices[needed:], stop
        return indices[:needed].reshape(stop - start, self.batch_size)


def batch_order(num_examples: int, batch_size: int, iterations: int, seed: int) -> np.ndarray:
    """Every step's batch at once, as one (iterations, batch_size) array (for comparisons and benchmarks)."""
    return BatchOrder(num_examples, batch_size, iterations, seed)[:iterations]


def longest_chunk(iterations: int, batch_size: int) -> int:
    """The most steps a chunk runs: no more than the steps between printed lines, the run's steps, or
    MAX_CHUNK_INDICES batch indices. Every chunk is padded to it, so that XLA compiles the loop once."""
    return min(PRINT_INTERVAL, iterations, max(1, MAX_CHUNK_INDICES // batch_size))


def next_chunk_steps(planned: int, ran: int, seconds: float, longest: int, chunk_seconds: float = CHUNK_SECONDS) -> int:
    """How many steps the next chunk plans, after one that planned ``planned`` and ran ``ran`` in ``seconds``.

    As many as the measured pace fits in ``chunk_seconds``, but at most twice the last plan (the
    first chunk, one step, also compiles the loop: the pace is learnt, not guessed) and ``longest``.
    """
    return max(1, min(2 * planned, longest, int(ran * chunk_seconds / max(seconds, 1e-9))))


@dataclass
class History:
    """The seed's measurements (cross-entropies summed over the images measured), and the weights'
    and biases' percentiles at every test evaluation (one row of len(PERCENTILES) each)."""

    train_accuracy: list[np.ndarray] = field(default_factory=list)
    train_cross_entropy: list[np.ndarray] = field(default_factory=list)
    test_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_cross_entropy: list[float] = field(default_factory=list)
    weight_percentiles: list[np.ndarray] = field(default_factory=list)
    bias_percentiles: list[np.ndarray] = field(default_factory=list)

    def train_series(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.train_accuracy), np.concatenate(self.train_cross_entropy)


# Called after each chunk with (first step, last step, chunk's train accuracies, chunk's train
# cross-entropies, the chunk's test measurements as (step, accuracy, cross-entropy) tuples, and the
# wall-clock times, in seconds, at which the chunk started and ended).
ChunkCallback = Callable[[int, int, np.ndarray, np.ndarray, list[tuple[int, float, float]], float, float], None]


def train(
    trainer,
    order: BatchOrder | np.ndarray,
    eval_interval: int,
    on_chunk: ChunkCallback | None = None,
    chunk_seconds: float = CHUNK_SECONDS,
) -> History:
    """Run every step in ``order`` on ``trainer`` and return the seed's measurements.

    The chunks' lengths depend on the machine's pace, the results do not: every step runs the same
    compiled code, wherever its chunk starts.
    """
    history = History()
    iterations, batch_size = order.shape
    longest = longest_chunk(iterations, batch_size)
    start, planned = 0, 1
    with tqdm(total=iterations, unit="step", desc="train", disable=None, mininterval=0.5) as progress:
        while start < iterations:
            end = min(start + planned, (start // PRINT_INTERVAL + 1) * PRINT_INTERVAL, iterations)
            started, clock = time.time(), time.perf_counter()
            accuracy, cross_entropy, test_accuracy, test_cross_entropy, weight_percentiles, bias_percentiles = (
                trainer.train_steps(order[start:end], start + 1, eval_interval, longest)
            )
            ended = time.time()
            planned = next_chunk_steps(planned, end - start, time.perf_counter() - clock, longest, chunk_seconds)
            if not np.all(np.isfinite(cross_entropy)):
                step = start + 1 + int(np.flatnonzero(~np.isfinite(cross_entropy))[0])
                raise PipelineError(
                    f"training diverged: the batch cross-entropy is not a finite number at step {step} "
                    f"(learning rate too large for this batch size). Try a smaller train.learning_rate."
                )
            history.train_accuracy.append(accuracy)
            history.train_cross_entropy.append(cross_entropy)
            measured = np.flatnonzero(~np.isnan(test_accuracy))
            tests = [
                (start + 1 + int(index), float(test_accuracy[index]), float(test_cross_entropy[index]))
                for index in measured
            ]
            for step, test_accuracy_value, test_cross_entropy_value in tests:
                history.test_steps.append(step)
                history.test_accuracy.append(test_accuracy_value)
                history.test_cross_entropy.append(test_cross_entropy_value)
            history.weight_percentiles.extend(weight_percentiles[measured])
            history.bias_percentiles.extend(bias_percentiles[measured])
            # Like the seed's print(i, a, c): the latest test measurement when there is one.
            printed = end % PRINT_INTERVAL == 0 or end == iterations
            if printed and history.test_steps:
                as_of = "" if history.test_steps[-1] == end else f" (measured at step {history.test_steps[-1]})"
                logger.info(
                    "step %d: test accuracy %.4f, test cross-entropy %.2f%s",
                    end, history.test_accuracy[-1], history.test_cross_entropy[-1], as_of,
                )  # fmt: skip
            elif printed:
                logger.info(
                    "step %d: batch accuracy %.4f, batch cross-entropy %.2f", end, accuracy[-1], cross_entropy[-1]
                )
            if on_chunk is not None:
                on_chunk(start + 1, end, accuracy, cross_entropy, tests, started, ended)
            progress.update(end - start)
            start = end
    return history


def csv_text(columns: list[str], rows) -> str:
    """CSV with a header; every value written as repr(float), which reads back to the same float."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for step, *values in rows:
        writer.writerow([step, *(repr(float(value)) for value in values)])
    return buffer.getvalue()


def train_history_csv(history: History) -> str:
    """Every step's batch measurements, one row per step (TRAIN_HISTORY_COLUMNS)."""
    train_accuracy, train_cross_entropy = history.train_series()
    return csv_text(TRAIN_HISTORY_COLUMNS, zip(range(1, len(train_accuracy) + 1), train_accuracy, train_cross_entropy))


def test_history_csv(history: History) -> str:
    """Every test evaluation, one row per evaluation (TEST_HISTORY_COLUMNS)."""
    return csv_text(TEST_HISTORY_COLUMNS, zip(history.test_steps, history.test_accuracy, history.test_cross_entropy))


def percentiles_csv(history: History) -> str:
    """The weights' and biases' percentiles at every test evaluation (PERCENTILE_COLUMNS)."""
    rows = zip(history.test_steps, history.weight_percentiles, history.bias_percentiles)
    return csv_text(PERCENTILE_COLUMNS, ((step, *weights, *biases) for step, weights, biases in rows))


def final_metrics(history: History) -> dict[str, float]:
    train_accuracy, train_cross_entropy = history.train_series()
    metrics = {
        "final_train_accuracy": float(train_accuracy[-1]),
        "final_train_cross_entropy_sum": float(train_cross_entropy[-1]),
    }
    if history.test_steps:
        metrics["final_test_accuracy"] = history.test_accuracy[-1]
        metrics["final_test_cross_entropy_sum"] = history.test_cross_entropy[-1]
        # The statistic the author's scripts print at the end, and the figure his comments quote.
        best = int(np.argmax(history.test_accuracy))
        metrics["max_test_accuracy"] = history.test_accuracy[best]
        metrics["max_test_accuracy_step"] = history.test_steps[best]
    return metrics


def run_name(params: TrainParams) -> str:
    settings = f"bs={params.batch_size} it={params.iterations} seed={params.seed}"
    # Only the seed's softmax trains at train.learning_rate; the other models name themselves instead.
    return f"lr={params.learning_rate:g} {settings}" if params.model == "softmax" else f"{params.model} {settings}"


def chunk_series(
    first_step: int,
    last_step: int,
    accuracy: np.ndarray,
    cross_entropy: np.ndarray,
    tests: list[tuple[int, float, float]],
) -> dict[str, tuple[list[int], list[float]]]:
    """A chunk's measurements as MLflow metric histories: {key: (steps, values)}."""
    steps = list(range(first_step, last_step + 1))
    series = {"train_accuracy": (steps, accuracy.tolist()), "train_cross_entropy_sum": (steps, cross_entropy.tolist())}
    if tests:
        series["test_accuracy"] = ([step for step, _, _ in tests], [value for _, value, _ in tests])
        series["test_cross_entropy_sum"] = ([step for step, _, _ in tests], [value for _, _, value in tests])
    return {record.HISTORY_PREFIX + name: values for name, values in series.items()}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def log_model(model_path: Path, example: np.ndarray, run_params: dict):
    """Log the Keras file at ``model_path`` as the served model (pipeline.serving) in the active run."""
    import mlflow

    from pipeline import serving

    with tempfile.TemporaryDirectory() as folder:
        # The logged model keeps the artifact's file name, which should not be the staged file's.
        keras_file = Path(folder) / "model.keras"
        shutil.copyfile(model_path, keras_file)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=serving.__file__,
            artifacts={serving.KERAS_ARTIFACT: str(keras_file)},
            signature=serving.SIGNATURE,
            # Saved as the model's request example: raw pixels, as serving takes them.
            input_example=example,
            pip_requirements=tags.model_requirements(),
            params={key: str(value) for key, value in run_params.items()},
        )


def main() -> None:
    args = path_arguments(__doc__, [
        "data", "model", "test-probabilities", "weight-maps", "train-history", "test-history",
        "parameter-percentiles", "metrics",
    ])  # fmt: skip
    config, tracking = load_params().train, tracking_settings()

    data, data_digests = load_processed(args.data, splits=("train", "test"))
    num_train = len(data["train_images"])
    if config.batch_size > num_train:
        raise PipelineError(
            f"train.batch_size ({config.batch_size}) is larger than the training set ({num_train} images)."
        )
    # A wrong tracking URI or a dead server is reported now, before TensorFlow's import and any training.
    uri, artifact_location = store.resolve(tracking)

    with native_stderr_silenced():
        import keras
        import mlflow
        import tensorflow as tf

        from pipeline.model import SERIES, SgdTrainer, build_model, raw_pixel_model, save_model, weight_maps

    # Keras' per-call progress bars would interleave with ours when MLflow checks the model;
    # without them Keras reports through absl's logger, which only needs to speak up about problems.
    # TensorFlow's AutoGraph writes each function it converts as a module in the temp folder and
    # imports it; TensorFlow deletes those files at exit, but not the bytecode Python would cache
    # beside them (a __pycache__ folder), so none is written from here on. Everything imported above
    # is cached as usual.
    sys.dont_write_bytecode = True
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    # Seeds fix the initial weights; op determinism makes reductions repeat bit for bit.
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    # A step is far too small to gain from splitting across cores (one thread is ~30% faster per
    # step, with identical numbers), and it leaves the other core to MLflow's logging.
    tf.config.threading.set_intra_op_parallelism_threads(1)

    series = SERIES[config.model]
    model = build_model(config.seed, config.model)
    trainer = SgdTrainer(model, series.optimizer(config.learning_rate), data["train_images"], data["train_labels"],
                         data["test_images"], data["test_labels"], series.test_batch_size,
                         series.jit_compile)  # fmt: skip
    order = BatchOrder(num_train, config.batch_size, config.iterations, config.seed)
    run_params = {
        **{f"train.{key}": value for key, value in vars(config).items()},
        "data.train_examples": num_train,
        "data.test_examples": len(data["test_images"]),
        "model": series.description,
        "model.script": series.script,
        "loss": "cross-entropy summed over the batch",
        "optimizer": series.optimizer_description,
    }
    outputs = [args.model, args.test_probabilities, args.weight_maps, args.metrics]
    histories = [args.train_history, args.test_history, args.parameter_percentiles]
    # New outputs replace the old ones only once the run is recorded (files.staged).
    with (
        store.ServerWatch(uri, tracking).running(),
        files.staged([*outputs, *histories]) as (
            model_path,
            probabilities_path,
            weight_maps_path,
            metrics_path,
            *history_paths,
        ),
        record.training_run(
            uri, artifact_location, tracking.experiment, run_name(config), run_params, data_digests
        ) as mlflow_run,
    ):
        logger.info("MLflow run %s (%s) in experiment %r", mlflow_run.run_id, run_name(config), tracking.experiment)

        def log_chunk(first_step, last_step, accuracy, cross_entropy, tests, started, ended) -> None:
            series = chunk_series(first_step, last_step, accuracy, cross_entropy, tests)
            mlflow_run.log_history(series, started, ended)

        started = time.perf_counter()
        history = train(trainer, order, config.eval_interval, on_chunk=log_chunk)
        train_seconds = time.perf_counter() - started
        metrics = final_metrics(history)
        logger.info("trained %d steps in %.1f s: %s", config.iterations, train_seconds, metrics)

        test_probabilities = trainer.test_probabilities()
        probabilities = npy_bytes(test_probabilities)
        # The metrics the gate compares, logged with the model so that every registry version has
        # them, whatever DVC later restores of the report stage from its cache.
        scores = score.flat(score.score(data["test_labels"].argmax(axis=1), test_probabilities))
        # Users get the model that takes raw 0-255 pixels; its probabilities are the trained model's.
        save_model(raw_pixel_model(model), model_path)
        probabilities_path.write_bytes(probabilities)
        weight_maps_path.write_bytes(npy_bytes(weight_maps(model)))
        history_texts = [train_history_csv(history), test_history_csv(history), percentiles_csv(history)]
        for path, text in zip(history_paths, history_texts):
            path.write_text(text)
        metrics_path.write_text(
            json.dumps(
                {**metrics, "environment": tags.environment(store.project_root())},
                indent=2,
                sort_keys=True,
                allow_nan=False,
            )
            + "\n"
        )

        mlflow_run.wait()
        try:
            logged = log_model(model_path, data["test_images"][:5], run_params)
            mlflow.log_metrics({**metrics, **scores, "train_seconds": train_seconds}, model_id=logged.model_id)
            for final_path, text in zip(histories, history_texts):
                mlflow.log_text(text, final_path.name)
            mlflow.set_tag(record.TEST_PROBABILITIES_TAG, record.sha256(probabilities))
            name, model_sha256 = tracking.registered_model, record.sha256(model_path.read_bytes())
            version = registry.same_version(mlflow_run.client, name, model_sha256, scores)
            if version is not None:
                logger.info("the model is version %s of %r already, with the same metrics: linked, not registered "
                            "again", version.version, name)  # fmt: skip
            else:
                version = registry.register(
                    mlflow_run.client,
                    name,
                    logged.model_uri,
                    registry.version_tags(
                        mlflow_run.run_id, tags.run_tags(store.project_root(), data_digests), model_sha256
                    ),
                    registry.description(scores["test_accuracy"], len(data["test_images"]), run_name(config)),
                )
                logger.info("registered the model as version %s of %r", version.version, name)
            mlflow.set_tag(registry.RUN_VERSION_TAG, registry.version_uri(name, version.version))
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise PipelineError(
                f"logging the model to MLflow run {mlflow_run.run_id} failed: {store.short(str(error))} "
                "The stage wrote no output."
            ) from None


if __name__ == "__main__":
    run(main)
