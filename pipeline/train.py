"""Stage ``train``: fit the model ``train.model`` names as the seed trains it, recording the run in MLflow.
Writes the model (raw 0-255 pixels in), test probabilities, weight maps, histories and metrics; logs them, the
per-step history and the gate's metrics to the run, and registers the model."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import files, score
from pipeline.cli import PipelineError, native_stderr_silenced, path_arguments, redact, run
from pipeline.data import PERCENTILE_COLUMNS, PERCENTILES, TEST_HISTORY_COLUMNS, TRAIN_HISTORY_COLUMNS, load_processed
from pipeline.params import TrainParams, load_params, tracking_settings
from pipeline.tracking import record, registry, store, tags

logger = logging.getLogger(__name__)

PRINT_INTERVAL = 1000  # The seed prints a line every 1,000 steps.
PROGRESS_SECONDS = 5.0  # A progress line at least this often, with or without a terminal (dvc repro has none).
CHUNK_SECONDS = 0.5  # How often Python regains control (to stop, to hand MLflow the history), however slow a step.
MAX_CHUNK_INDICES = 10_000_000  # A chunk's batch indices, as one int32 tensor: 40 MB at most.
CSV_PATHS = ["train-history", "test-history", "parameter-percentiles"]
PATHS = ["data", "model", "test-probabilities", "weight-maps", *CSV_PATHS, "metrics"]  # --NAME PATH, as dvc.yaml


class BatchOrder:
    """Each step's indices as the seed's ``next_batch`` drew them (epochs' permutations end to end), chunk by chunk."""

    def __init__(self, num_examples: int, batch_size: int, iterations: int, seed: int) -> None:
        if batch_size > num_examples:
            raise PipelineError(
                f"train.batch_size ({batch_size}) is larger than the training set ({num_examples} images)."
            )
        self.num_examples, self.shape = num_examples, (iterations, batch_size)
        self.rng, self.next_step, self.drawn = np.random.default_rng(seed), 0, np.empty(0, np.int32)

    def __getitem__(self, steps: slice) -> np.ndarray:
        start, stop, _ = steps.indices(self.shape[0])
        if start != self.next_step:
            raise ValueError(f"steps must be asked for in order: expected a slice from {self.next_step}, got {steps}")
        needed, parts = (stop - start) * self.shape[1], [self.drawn]
        while sum(map(len, parts)) < needed:
            parts.append(self.rng.permutation(self.num_examples).astype(np.int32))
        indices = np.concatenate(parts)
        self.drawn, self.next_step = indices[needed:], stop
        return indices[:needed].reshape(stop - start, self.shape[1])


def longest_chunk(iterations: int, batch_size: int) -> int:
    """The most steps a chunk runs; every chunk is padded to it, so that XLA compiles the loop once."""
    return min(PRINT_INTERVAL, iterations, max(1, MAX_CHUNK_INDICES // batch_size))


def next_chunk_steps(planned: int, ran: int, seconds: float, longest: int, chunk_seconds: float = CHUNK_SECONDS) -> int:
    """The steps the last chunk's pace fits in ``chunk_seconds``; at most twice its plan (the first compiled)."""
    return max(1, min(2 * planned, longest, int(ran * chunk_seconds / max(seconds, 1e-9))))


@dataclass
class History:
    """The seed's measurements and the parameters' percentiles at each test; train lists hold an array per chunk."""

    train_accuracy: list[np.ndarray] = field(default_factory=list)
    train_cross_entropy: list[np.ndarray] = field(default_factory=list)
    test_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_cross_entropy: list[float] = field(default_factory=list)
    weight_percentiles: list[np.ndarray] = field(default_factory=list)
    bias_percentiles: list[np.ndarray] = field(default_factory=list)

    def add(self, steps: np.ndarray, *measured: np.ndarray) -> dict[str, tuple[list, list]]:
        """Add a chunk's measurements (NaN where untested); return them as {metric: (steps, values)}."""
        accuracy, cross_entropy, test_accuracy, test_cross_entropy, weights, biases = measured
        tested = ~np.isnan(test_accuracy)
        self.train_accuracy.append(accuracy)
        self.train_cross_entropy.append(cross_entropy)
        self.test_steps += steps[tested].tolist()
        self.test_accuracy += test_accuracy[tested].tolist()
        self.test_cross_entropy += test_cross_entropy[tested].tolist()
        self.weight_percentiles += list(weights[tested])
        self.bias_percentiles += list(biases[tested])
        return {
            "train_accuracy": (steps.tolist(), accuracy.tolist()),
            "train_cross_entropy_sum": (steps.tolist(), cross_entropy.tolist()),
            "test_accuracy": (steps[tested].tolist(), test_accuracy[tested].tolist()),
            "test_cross_entropy_sum": (steps[tested].tolist(), test_cross_entropy[tested].tolist()),
        }

    def train_series(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.train_accuracy), np.concatenate(self.train_cross_entropy)

    def csv_files(self) -> list[str]:
        """The train history, test history and percentiles as CSV, in float64 (whose repr reads back exactly)."""
        train = pd.DataFrame(np.column_stack(self.train_series()).astype(float), columns=TRAIN_HISTORY_COLUMNS[1:])
        train.insert(0, "step", range(1, len(train) + 1))
        percentiles = [
            np.reshape(values, (-1, len(PERCENTILES))) for values in (self.weight_percentiles, self.bias_percentiles)
        ]
        values = np.column_stack([self.test_accuracy, self.test_cross_entropy, *percentiles])
        tests = pd.DataFrame(values, columns=[*TEST_HISTORY_COLUMNS[1:], *PERCENTILE_COLUMNS[1:]])
        tests.insert(0, "step", self.test_steps)
        return [frame.to_csv(index=False) for frame in (train, tests[TEST_HISTORY_COLUMNS], tests[PERCENTILE_COLUMNS])]


def train(trainer, order, eval_interval: int, on_chunk=None, chunk_seconds: float = CHUNK_SECONDS) -> History:
    """Run ``order`` in chunks (the same compiled code, so the same numbers), ``on_chunk(series, started, ended)``."""
    history, (iterations, batch_size) = History(), order.shape
    longest, start, planned = longest_chunk(iterations, batch_size), 0, 1
    began = shown = time.perf_counter()
    bar = tqdm(total=iterations, unit="step", desc="train", disable=None, mininterval=0.5)
    with logging_redirect_tqdm(), bar as progress:
        while start < iterations:
            end = min(start + planned, (start // PRINT_INTERVAL + 1) * PRINT_INTERVAL, iterations)
            started, clock = time.time(), time.perf_counter()
            measured = trainer.train_steps(order[start:end], start + 1, eval_interval, longest)
            planned = next_chunk_steps(planned, end - start, time.perf_counter() - clock, longest, chunk_seconds)
            if not np.all(np.isfinite(cross_entropy := measured[1])):
                step = start + 1 + int(np.flatnonzero(~np.isfinite(cross_entropy))[0])
                raise PipelineError(
                    f"training diverged: the batch cross-entropy is not a finite number at step {step} (learning "
                    "rate too large for this batch size). Try a smaller train.learning_rate."
                )
            series = history.add(np.arange(start + 1, end + 1), *measured)
            # The seed's print(i, a, c), and a line every few seconds when 1,000 steps take longer.
            if end % PRINT_INTERVAL == 0 or end == iterations or time.perf_counter() - shown >= PROGRESS_SECONDS:
                logger.info(progress_line(history, end, iterations, time.perf_counter() - began))
                shown = time.perf_counter()
            if on_chunk is not None:
                on_chunk(series, started, time.time())
            progress.update(end - start)
            start = end
    return history


def progress_line(history: History, step: int, iterations: int, seconds: float) -> str:
    """Where the training is, how fast it goes, when it ends, and the latest test measurement (or batch's)."""
    rate = step / max(seconds, 1e-9)
    left = tqdm.format_interval((iterations - step) / rate)
    where = f"step {step} of {iterations} ({rate:,.0f} steps/s, {left} left)"
    if not history.test_steps:
        accuracy, cross_entropy = history.train_accuracy[-1][-1], history.train_cross_entropy[-1][-1]
        return f"{where}: batch accuracy {accuracy:.4f}, batch cross-entropy {cross_entropy:.2f}"
    accuracy, cross_entropy, tested = history.test_accuracy[-1], history.test_cross_entropy[-1], history.test_steps[-1]
    as_of = "" if tested == step else f" (measured at step {tested})"
    return f"{where}: test accuracy {accuracy:.4f}, test cross-entropy {cross_entropy:.2f}{as_of}"


def final_metrics(history: History) -> dict[str, float]:
    """train.json's figures. The final test figures are report's (metrics.json) and test_history.csv's last row."""
    accuracy, cross_entropy = history.train_series()
    metrics = {"final_train_accuracy": float(accuracy[-1]), "final_train_cross_entropy_sum": float(cross_entropy[-1])}
    if history.test_steps:
        best = int(np.argmax(history.test_accuracy))  # The figure the author's scripts print and quote.
        metrics["max_test_accuracy"] = history.test_accuracy[best]
        metrics["max_test_accuracy_step"] = history.test_steps[best]
    return metrics


def run_name(params: TrainParams) -> str:
    settings = f"bs={params.batch_size} it={params.iterations} seed={params.seed}"
    # Only the seed's softmax trains at train.learning_rate; the others keep their script's rate.
    return f"lr={params.learning_rate:g} {settings}" if params.model == "softmax" else f"{params.model} {settings}"


def log_to_mlflow(mlflow_run, registered_model, paths, test_images, run_params, metrics, scores, csv_files):
    """Log the model pipeline.serving serves, its metrics (``scores``: the gate's), CSV files and tags; register it."""
    import mlflow

    from pipeline import serving

    (model_path, probabilities_path), client, run_id = paths, mlflow_run.client, mlflow_run.run_id
    try:
        with tempfile.TemporaryDirectory() as folder:
            keras_file = Path(folder) / "model.keras"  # Its name in the logged model, not the staged file's.
            shutil.copyfile(model_path, keras_file)
            logged = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving.__file__,
                artifacts={serving.KERAS_ARTIFACT: str(keras_file)},
                signature=serving.SIGNATURE,
                input_example=test_images[:5],
                pip_requirements=tags.model_requirements(),
                params={key: str(value) for key, value in run_params.items()},
            )
        # train.json's final_* figures the run holds once already, as the last points of its history/ curves.
        once = {key: value for key, value in metrics.items() if not key.startswith("final_")}
        mlflow.log_metrics({**once, **scores}, model_id=logged.model_id)
        for name, text in csv_files.items():
            mlflow.log_text(text, name)
        mlflow.set_tag(record.TEST_PROBABILITIES_TAG, record.sha256(probabilities_path.read_bytes()))
        model_sha256 = record.sha256(model_path.read_bytes())
        # A retrained identical model (same file, same metrics) is linked to its version, not registered again.
        if (version := registry.same_version(client, registered_model, model_sha256, scores)) is not None:
            logger.info(
                "the model is version %s of %r already, with the same metrics: linked, not registered again",
                version.version,
                registered_model,
            )
        else:
            run = client.get_run(run_id)
            version_tags = registry.version_tags(run_id, run.data.tags, model_sha256)
            description = registry.description(scores["test_accuracy"], len(test_images), run.info.run_name)
            # MLflow prints "Created version N of model <name>".
            version = registry.register(client, registered_model, logged.model_uri, version_tags, description)
        mlflow.set_tag(registry.RUN_VERSION_TAG, registry.version_uri(registered_model, version.version))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise store.failed(f"logging the model to MLflow run {run_id}", error) from None


def view_run_line(uri: str, mlflow_run) -> str:
    """A local store's run page as ``mlflow ui`` serves it, as MLflow itself prints it for a server's runs."""
    run = mlflow_run.client.get_run(mlflow_run.run_id)
    # Where `mlflow ui` serves by default; MLflow 3's UI otherwise opens the GenAI view, without the run's charts.
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    page += "?workflowType=machine_learning"
    database = store.sqlite_path(uri)
    backend = f"sqlite:///{database.as_posix()}" if database else uri
    return redact(f"View run {run.info.run_name} at: {page} (uv run mlflow ui --backend-store-uri {backend})")


def seeded_trainer(config: TrainParams, data: dict, threads: int | None = None):
    """The trainer of ``config``'s model, in TensorFlow set up to repeat the seed's numbers (on ``threads``, by
    default the model's); the run's params."""
    import keras
    import tensorflow as tf

    from pipeline.model import SERIES, SgdTrainer, build_model

    # AutoGraph imports from the temp folder, which TensorFlow empties at exit, but not of cached bytecode.
    sys.dont_write_bytecode = True
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    series = SERIES[config.model]
    threads = threads or series.threads
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    arrays = data["train_images"], data["train_labels"], data["test_images"], data["test_labels"]
    run_params = {
        **{f"train.{key}": value for key, value in vars(config).items()},
        "data.train_examples": len(data["train_images"]),
        "data.test_examples": len(data["test_labels"]),
        "model": series.description,
        "model.script": series.script,
        "loss": "cross-entropy summed over the batch",
        "optimizer": series.optimizer_description,
    }
    model, optimizer = build_model(config.seed, config.model), series.optimizer(config.learning_rate)
    return SgdTrainer(model, optimizer, *arrays, series.test_batch_size, series.jit_compile), run_params


def main() -> None:
    args, config, tracking = path_arguments(__doc__, PATHS), load_params().train, tracking_settings()
    data, data_digests = load_processed(args.data, splits=("train", "test"))
    order = BatchOrder(len(data["train_images"]), config.batch_size, config.iterations, config.seed)
    uri, artifact_location = store.resolve(tracking)  # A dead server is reported before any training.
    with native_stderr_silenced():
        from pipeline.model import raw_pixel_model, save_model, weight_maps

    trainer, run_params = seeded_trainer(config, data)
    name, registered_model = run_name(config), tracking.registered_name(config.model)
    csv_outputs = [args.train_history, args.test_history, args.parameter_percentiles]
    outputs = [args.model, args.test_probabilities, args.weight_maps, args.metrics, *csv_outputs]
    with (
        store.ServerWatch(uri, tracking).running() as watch,
        files.staged(outputs) as (model_path, probabilities_path, maps_path, metrics_path, *csvs),
        record.training_run(
            uri, artifact_location, tracking.experiment, name, run_params, data_digests, watch.check, args.data
        ) as mlflow_run,
    ):
        logger.info("MLflow run %s (%s) in experiment %r", mlflow_run.run_id, name, tracking.experiment)
        started = time.perf_counter()
        history = train(trainer, order, config.eval_interval, on_chunk=mlflow_run.log_history)
        train_seconds, metrics = time.perf_counter() - started, final_metrics(history)
        logger.info("trained %d steps in %.1f s: %s", config.iterations, train_seconds, metrics)

        probabilities = trainer.test_probabilities()
        scores = score.flat(score.score(data["test_labels"].argmax(axis=1), probabilities))  # Every version's.
        save_model(raw_pixel_model(trainer.model), model_path)
        for path, array in ((probabilities_path, probabilities), (maps_path, weight_maps(trainer.model))):
            with open(path, "wb") as file:  # np.save(path) would add .npy to the staged file's name.
                np.save(file, array, allow_pickle=False)
        csv_files = dict(zip([path.name for path in csv_outputs], history.csv_files()))
        for path, text in zip(csvs, csv_files.values()):
            path.write_text(text)
        # DVC's tables show numbers and strings, not lists, so the record keeps the environment as [name, value]
        # pairs: committed with the results, out of `dvc exp show` (the run has it as env.* tags).
        environment = sorted(tags.environment(store.project_root()).items())
        metrics_path.write_text(json.dumps({**metrics, "environment": environment}, indent=2, sort_keys=True) + "\n")

        mlflow_run.wait()
        metrics["train_seconds"] = train_seconds  # The run's alone: train.json would change at every rerun.
        paths = [model_path, probabilities_path]
        log_to_mlflow(mlflow_run, registered_model, paths, data["test_images"], run_params, metrics, scores, csv_files)
    if artifact_location is not None:  # A local store.
        print(view_run_line(uri, mlflow_run))


if __name__ == "__main__":
    run(main)
