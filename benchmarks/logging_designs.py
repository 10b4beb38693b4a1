"""Compare ways for the train stage to log its metric history to MLflow, by the cold wall time of a whole process.

Run from the project root::

    uv run python -m benchmarks.logging_designs               # 3 repetitions (about 10 minutes on 2 cores)
    uv run python -m benchmarks.logging_designs --repeat 5 --only helper,after,none
    uv run python -m benchmarks.logging_designs --keep        # keep the work directory and every log

It prepares one copy of the project in a temporary directory (fetch and preprocess run there, with
``$MNIST_MIRROR``, default ``../shared/mnist``, as the only mirror), then times each design as a fresh
process logging to a fresh SQLite store (``sqlite:///<tmp>/mlflow.db``, artifacts beside it). The
designs run in turn, ABCDE ABCDE…, so that a change in the machine's load hits all of them alike.
Every design trains the seed configuration (10,000 steps of batch 100, the test set every 100 steps:
20,200 metric values) and logs the same parameters, tags, final metrics, history CSV and Keras model:

* ``helper``: the train stage as it was at git revision HELPER_REV (``--helper-rev``), the last one
  that logged through a hand-made helper process (pipeline.tracking.RunRecorder: a socket-pair RPC
  to ``python -m pipeline.tracking``), run from a copy of that revision with the same data.
* ``stage``: the train stage as it is now (``python -m pipeline.train`` with dvc.yaml's arguments),
  which logs like ``async`` below, from a writer thread of its own (pipeline.tracking.record).
* ``async``: this module's worker; each 1,000-step chunk is handed to MLflow's own async logging
  queue with ``MlflowClient.log_batch(..., synchronous=False)`` from train()'s ``on_chunk`` callback,
  and the returned RunOperations are waited for before the run ends.
* ``async-buffered``: the same with ``mlflow.config.enable_async_logging()`` (so log_batch is
  asynchronous by default) and MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS set, so that MLflow's queue
  waits that long between writes and merges what has queued up meanwhile.
* ``after``: nothing is logged while training; afterwards the whole history goes out in
  synchronous log_batch calls of at most 1,000 values each.
* ``none``: as ``after`` without the history (parameters, final metrics and the model only): the
  floor, for reference.

A metric value's timestamp is interpolated between its chunk's start and end wall time by step,
in every design of this module (``helper`` keeps the stage's own timestamps). After each run the
benchmark counts the run's values with ``MlflowClient.get_metric_history``; a design that lost any
is disqualified. For information it also times ``import mlflow`` alone and the creation of a fresh
SQLite store alone, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/logging_designs.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.run import base_env, copy_project, last_json, run_timed, sqlite_uri, stage_command  # noqa: E402
from pipeline.data import TEST_HISTORY_COLUMNS, TRAIN_HISTORY_COLUMNS  # noqa: E402
from pipeline.tracking.record import HISTORY_PREFIX  # noqa: E402

DESIGNS = ("helper", "stage", "async", "async-buffered", "after", "none")
# The last commit whose train stage logged through the hand-made helper process.
HELPER_REV = "30da5b9"
# The rule for choosing: the first of these whose median is within KEEP_WITHIN of the fastest design's.
SIMPLICITY_ORDER = ("after", "async", "async-buffered", "helper")
KEEP_WITHIN = 0.15
HISTORY_KEYS = tuple(HISTORY_PREFIX + name for name in [*TRAIN_HISTORY_COLUMNS[1:], *TEST_HISTORY_COLUMNS[1:]])
# MLflow accepts at most 1,000 metric values per log_batch call.
METRICS_PER_BATCH = 1000
# A chunk of 1,000 steps takes about a second or two to train, so this lets a few chunks queue up.
BUFFERING_SECONDS = 2


# --------------------------------------------------------------------------------------------
# The worker: one design's whole train process, run in the prepared project copy


def chunk_metrics(first_step, last_step, started, ended, accuracy, cross_entropy, tests) -> list:
    """A chunk's values as MLflow Metrics, each stamped by linear interpolation over the chunk's wall time."""
    from mlflow.entities import Metric

    from pipeline.train import chunk_series

    span = last_step - first_step + 1

    def timestamp_ms(step: int) -> int:
        return int(1000 * (started + (ended - started) * (step - first_step + 1) / span))

    series = chunk_series(first_step, last_step, accuracy, cross_entropy, tests)
    return [
        Metric(key, float(value), timestamp_ms(step), step)
        for key, (steps, values) in series.items()
        for step, value in zip(steps, values)
    ]


@dataclass
class Sink:
    """What a design does with each chunk's values (``on_chunk``) and once training is over (``finish``)."""

    design: str
    client: object
    run_id: str
    pending: list = field(default_factory=list)

    def on_chunk(self, first_step, last_step, accuracy, cross_entropy, tests, started, ended) -> None:
        if self.design != "none":
            metrics = chunk_metrics(first_step, last_step, started, ended, accuracy, cross_entropy, tests)
            if self.design == "async":
                self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
            elif self.design == "async-buffered":
                # enable_async_logging() made asynchronous the default, so no `synchronous` argument.
                self.pending.append(self.client.log_batch(self.run_id, metrics=metrics))
            else:
                self.pending.extend(metrics)

    def finish(self) -> None:
        import mlflow

        if self.design == "after":
            for start in range(0, len(self.pending), METRICS_PER_BATCH):
                self.client.log_batch(
                    self.run_id, metrics=self.pending[start : start + METRICS_PER_BATCH], synchronous=True
                )
        elif self.design.startswith("async"):
            # RunOperations.wait() raises if any of its batches failed; a flush would only log the failure.
            for operations in self.pending:
                operations.wait()
            # With async logging enabled MLflow's own calls (inside log_model) are queued too.
            mlflow.flush_async_logging()


def build_trainer(config, data):
    """TensorFlow, the model and its trainer with pipeline/train.py main()'s determinism settings."""
    # pipeline.model quietens TensorFlow's start-up and keeps Keras from importing what it does not need,
    # so it is imported before Keras and TensorFlow.
    from pipeline.model import SgdTrainer, build_model

    # isort: split
    import keras
    import tensorflow as tf

    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    model = build_model(config.seed)
    trainer = SgdTrainer(
        model,
        config.learning_rate,
        data["train_images"],
        data["train_labels"],
        data["test_images"],
        data["test_labels"],
    )
    trainer.trace()
    return model, trainer


def start_run(store: Path, params, data) -> tuple:
    """Create the store, the experiment and the run with its parameters and tags, as the stage does."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from pipeline.params import tracking_settings
    from pipeline.tracking import store as tracking_store
    from pipeline.tracking import tags
    from pipeline.train import run_name

    uri = tracking_store.with_busy_timeout(sqlite_uri(store / "mlflow.db"))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment(
        tracking_settings().experiment, artifact_location=(store / "mlartifacts").as_uri()
    )
    run = client.create_run(experiment, run_name=run_name(params.train), tags=tags.run_tags(Path.cwd()))
    values = {
        **{f"train.{key}": value for key, value in vars(params.train).items()},
        "data.train_examples": len(data["train_images"]),
        "data.test_examples": len(data["test_images"]),
        "model": "Dense(10, softmax) on 784 pixels",
        "loss": "cross-entropy summed over the batch",
        "optimizer": "SGD",
    }
    client.log_batch(
        run.info.run_id, params=[Param(key, str(value)) for key, value in values.items()], synchronous=True
    )
    return client, run.info.run_id


def write_outputs(out: Path, model, trainer, history) -> Path:
    """The stage's output files; returns the history CSV, which is logged as an artifact."""
    import numpy as np

    from pipeline import files
    from pipeline.model import raw_pixel_model, save_model
    from pipeline.train import final_metrics, train_history_csv

    save_model(raw_pixel_model(model), out / "model.keras")
    np.save(out / "test_probabilities.npy", trainer.test_probabilities(), allow_pickle=False)
    files.write_text(out / "train_history.csv", train_history_csv(history))
    files.write_json(out / "train.json", final_metrics(history))
    return out / "train_history.csv"


def log_model_and_end(sink: Sink, data, history, history_file: Path, train_seconds: float) -> None:
    """Log final metrics, the history CSV and the Keras model into the run, finish the history, end the run."""
    import mlflow
    from mlflow.entities import Metric

    from pipeline.train import final_metrics, log_model

    metrics = {**final_metrics(history), "train_seconds": train_seconds}
    now_ms = int(time.time() * 1000)
    # log_model runs inside the resumed run so that MLflow links the model to it; leaving the block ends it.
    with mlflow.start_run(run_id=sink.run_id):
        # Step-0 metrics logged before the model are linked to it by log_model itself.
        sink.client.log_batch(
            sink.run_id,
            metrics=[Metric(key, float(value), now_ms, 0) for key, value in metrics.items()],
            synchronous=True,
        )
        sink.client.log_artifact(sink.run_id, str(history_file))
        # As the stage does (pipeline.serving's model, the Keras file as its artifact).
        log_model(history_file.parent / "model.keras", data["test_images"][:5], {})
        sink.finish()


def worker_design(design: str, store: Path, out: Path) -> dict:
    """One design's train process, in the project copy (the current directory); returns its phase times."""
    from pipeline.data import load_processed
    from pipeline.params import load_params
    from pipeline.train import batch_order, train

    times = {}
    clock = time.perf_counter()
    params = load_params(Path("params.yaml"))
    data, _ = load_processed(Path("data/processed"), splits=("train", "test"))
    model, trainer = build_trainer(params.train, data)
    order = batch_order(len(data["train_images"]), params.train.batch_size, params.train.iterations, params.train.seed)
    times["tensorflow"], clock = time.perf_counter() - clock, time.perf_counter()

    if design == "async-buffered":
        import mlflow
        from mlflow.environment_variables import MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS

        MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.set(BUFFERING_SECONDS)
        mlflow.config.enable_async_logging()
    client, run_id = start_run(store, params, data)
    times["mlflow_start"], clock = time.perf_counter() - clock, time.perf_counter()

    sink = Sink(design, client, run_id)
    history = train(trainer, order, params.train.eval_interval, on_chunk=sink.on_chunk)
    times["train"], clock = time.perf_counter() - clock, time.perf_counter()

    history_file = write_outputs(out, model, trainer, history)
    log_model_and_end(sink, data, history, history_file, times["train"])
    times["outputs_model_finish"] = time.perf_counter() - clock
    return {"run_id": run_id, "seconds": times}


def worker_import_mlflow() -> dict:
    started = time.perf_counter()
    import mlflow  # noqa: F401

    return {"seconds": time.perf_counter() - started}


def worker_create_store(store: Path) -> dict:
    """Open a new SQLite store (MLflow creates and migrates its schema) and create an experiment in it."""
    from mlflow import MlflowClient

    started = time.perf_counter()
    client = MlflowClient(sqlite_uri(store / "mlflow.db"))
    client.create_experiment("store-creation", artifact_location=(store / "mlartifacts").as_uri())
    return {"seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class Bench:
    workdir: Path
    project: Path
    helper_project: Path
    env: dict
    samples: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def record(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)


def prepare(workdir: Path, mirror: Path, helper_rev: str) -> Bench:
    """A copy of the project with data/processed made by the fetch and preprocess stages, and a copy
    of ``helper_rev``'s sources (``git archive``) sharing that data, for the ``helper`` design."""
    project = workdir / "project"
    project.mkdir(parents=True)
    env = base_env(workdir, {"MNIST_MIRROR": str(mirror)})
    copy_project(project, env)
    helper_project = workdir / "helper-project"
    helper_project.mkdir()
    archive = subprocess.run(
        ["git", "archive", helper_rev, "pipeline", "dvc.yaml", "params.yaml"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(helper_project)], input=archive, check=True)
    bench = Bench(workdir, project, helper_project, env)
    for stage in ("fetch", "preprocess"):
        bench.say(f"preparing: {stage}")
        run_timed(stage_command(project, stage), cwd=project, env=env, shell=True, log=workdir / "logs" / stage)
    (helper_project / "data").mkdir()
    (helper_project / "data" / "processed").symlink_to(project / "data" / "processed")
    return bench


def run_design(bench: Bench, design: str, repetition: int) -> None:
    """Time one design's whole process on a fresh store, then count the values it left in the store."""
    store = Path(tempfile.mkdtemp(prefix=f"{design}-{repetition}-", dir=bench.workdir))
    uri = sqlite_uri(store / "mlflow.db")
    log = bench.workdir / "logs" / f"{design}-{repetition}"
    if design in ("helper", "stage"):
        project = bench.helper_project if design == "helper" else bench.project
        done = run_timed(
            stage_command(project, "train"),
            cwd=project,
            shell=True,
            log=log,
            env={**bench.env, "MLFLOW_TRACKING_URI": uri},
        )
        run_id = only_run_id(uri)
        # The stage keeps its artifacts beside dvc.yaml; the next run starts without them.
        shutil.rmtree(project / "mlartifacts", ignore_errors=True)
    else:
        (store / "out").mkdir()
        command = [
            sys.executable,
            "-m",
            "benchmarks.logging_designs",
            "--worker",
            design,
            "--store",
            str(store),
            "--out",
            str(store / "out"),
        ]
        done = run_timed(command, cwd=bench.project, env=bench.env, log=log)
        result = last_json(done.stdout)
        run_id = result["run_id"]
        bench.samples.setdefault(f"{design} phases", []).append(result["seconds"])
    bench.record(design, done.seconds)
    bench.counts.setdefault(design, []).append(count_values(uri, run_id))
    bench.say(f"{design} {repetition + 1}: {done.seconds:.2f} s, {bench.counts[design][-1]:,} values")
    shutil.rmtree(store, ignore_errors=True)


def only_run_id(uri: str) -> str:
    """The id of the one run in a fresh store."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    return run.info.run_id


def count_values(uri: str, run_id: str) -> int:
    """How many history values the run holds in the store; None of them may be lost."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return sum(len(client.get_metric_history(run_id, key)) for key in HISTORY_KEYS)


def run_info_rows(bench: Bench, repetition: int) -> None:
    for name, worker in (("import mlflow", "import-mlflow"), ("create SQLite store", "create-store")):
        store = Path(tempfile.mkdtemp(prefix=f"{worker}-{repetition}-", dir=bench.workdir))
        command = [sys.executable, "-m", "benchmarks.logging_designs", "--worker", worker, "--store", str(store)]
        done = run_timed(
            command, cwd=bench.project, env=bench.env, log=bench.workdir / "logs" / f"{worker}-{repetition}"
        )
        bench.record(name, last_json(done.stdout)["seconds"])
        shutil.rmtree(store, ignore_errors=True)


def expected_values(project: Path) -> int:
    from pipeline.params import load_params

    config = load_params(project / "params.yaml").train
    return 2 * config.iterations + 2 * (config.iterations // config.eval_interval)


# --------------------------------------------------------------------------------------------
# Results


def expected_for(design: str, expected: int) -> int:
    """``none`` logs no history by design; every other design must leave all of it in the store."""
    return 0 if design == "none" else expected


def medians(bench: Bench, designs, expected: int) -> dict[str, float]:
    """The median wall time of each design that left exactly the values it should in the store."""
    return {
        design: statistics.median(bench.samples[design])
        for design in designs
        if all(count == expected_for(design, expected) for count in bench.counts[design])
    }


def keep_by_rule(qualified: dict[str, float]) -> str | None:
    """The simplest logging design within KEEP_WITHIN of the fastest logging design (``none`` logs none)."""
    candidates = [qualified[design] for design in SIMPLICITY_ORDER if design in qualified]
    if not candidates:
        return None
    fastest = min(candidates)
    for design in SIMPLICITY_ORDER:
        if design in qualified and qualified[design] <= (1 + KEEP_WITHIN) * fastest:
            return design
    return None


def ratio(wall: float, base: float | None, qualified: bool) -> str:
    return f"{wall / base:.3f}" if base and qualified else "—"


def table(bench: Bench, designs, expected: int) -> str:
    qualified = medians(bench, designs, expected)
    fastest = min(qualified.values()) if qualified else None
    floor = qualified.get("none")
    lines = [
        "| Design | Median wall (s) | Samples (s) | × fastest | × none | History values in store |",
        "|---|---|---|---|---|---|",
    ]
    for design in designs:
        wall = statistics.median(bench.samples[design])
        counts = ", ".join(f"{count:,}" for count in sorted(set(bench.counts[design])))
        verdict = "" if design in qualified else " — DISQUALIFIED"
        samples = ", ".join(f"{value:.2f}" for value in bench.samples[design])
        lines.append(
            f"| {design} | {wall:.2f} | {samples} | {ratio(wall, fastest, design in qualified)} | "
            f"{ratio(wall, floor, design in qualified)} | "
            f"{counts} of {expected_for(design, expected):,}{verdict} |"
        )
    for name in ("import mlflow", "create SQLite store"):
        if name in bench.samples:
            samples = ", ".join(f"{value:.2f}" for value in bench.samples[name])
            lines.append(
                f"| (info) {name}, in a fresh process | {statistics.median(bench.samples[name]):.2f} | "
                f"{samples} | — | — | — |"
            )
    return "\n".join(lines)


def phase_notes(bench: Bench, designs) -> list[str]:
    notes = []
    for design in designs:
        phases = bench.samples.get(f"{design} phases")
        if phases:
            medians_ = {key: statistics.median(sample[key] for sample in phases) for key in phases[0]}
            notes.append(f"- {design}: " + ", ".join(f"{key} {value:.2f} s" for key, value in medians_.items()))
    return notes


def report(bench: Bench, designs, expected: int, load: str) -> None:
    print(table(bench, designs, expected))
    print(f"\nLoad average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} cores.")
    print(
        "\nWorker phases (median): TensorFlow start-up and tracing, MLflow import + store + run, train loop,"
        " outputs + model + finishing the history:"
    )
    print("\n".join(phase_notes(bench, designs)))
    qualified = {design: wall for design, wall in medians(bench, designs, expected).items() if design != "none"}
    if qualified:
        kept = keep_by_rule(qualified)
        fastest = min(qualified, key=qualified.get)
        print(
            f"\nFastest logging design: {fastest} ({qualified[fastest]:.2f} s). Kept by the rule (simplest within "
            f"{KEEP_WITHIN:.0%} of the fastest): {kept} ({qualified[kept] / qualified[fastest] - 1:+.1%})."
        )


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each design (default 3)")
    parser.add_argument(
        "--only", default=",".join(DESIGNS), help=f"comma-separated designs (default {','.join(DESIGNS)})"
    )
    parser.add_argument(
        "--mirror",
        type=Path,
        default=ROOT.parent / "shared" / "mnist",
        help="directory of the four MNIST files (default ../shared/mnist; $MNIST_MIRROR wins)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs included)")
    parser.add_argument(
        "--helper-rev",
        default=HELPER_REV,
        help=f"git revision whose train stage is the helper design (default {HELPER_REV})",
    )
    parser.add_argument("--worker", choices=(*DESIGNS[2:], "import-mlflow", "create-store"), help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    if args.worker == "import-mlflow":
        result = worker_import_mlflow()
    elif args.worker == "create-store":
        result = worker_create_store(args.store)
    else:
        result = worker_design(args.worker, args.store, args.out)
    print(json.dumps(result), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    designs = [design for design in DESIGNS if design in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="logging-designs-"))
    try:
        bench = prepare(workdir, Path(os.environ.get("MNIST_MIRROR") or args.mirror), args.helper_rev)
        expected = expected_values(bench.project)
        for repetition in range(args.repeat):
            for design in designs:
                bench.say(f"repetition {repetition + 1}/{args.repeat}: {design}")
                run_design(bench, design, repetition)
            run_info_rows(bench, repetition)
        report(bench, designs, expected, " ".join(f"{value:.2f}" for value in os.getloadavg()))
    finally:
        if args.keep:
            print(f"\nWork directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
