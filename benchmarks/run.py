"""Benchmark the pipeline against a plain NumPy reference; print a Markdown table of medians and ratios.

    uv run python -m benchmarks.run [--only pipeline,stage,train-loop,series,sweep,asha] [--repeat N] [--slow-repeat N]

benchmarks/README.md says what each row measures. Every measured piece runs in a process of its
own, with PYTHONDONTWRITEBYTECODE=1 as on our machines, in a throwaway directory; within a
repetition ours and its references take turns, in an order rotated from one repetition to the next,
so that a change in the machine's load hits them alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SECTIONS = ("pipeline", "stage", "train-loop", "series", "sweep", "asha")
STAGES = ("fetch", "preprocess", "train", "report")
# The series section times this many steps per model, after as many that compile the loop; at
# eval_interval 100 the test set is measured twice in them, as often as in a whole run.
SERIES_STEPS = 200
SERIES_RUN_STEPS = 10_000
# The only model of the series that is another one plus dropout.
DROPOUT_PAIR = ("five_layers_relu_lrdecay_dropout", "five_layers_relu_lrdecay")
# The NumPy reference gets one BLAS thread, as TensorFlow gets one in the train stage. Its matrices
# are tiny (100x784 by 784x10), so a second OpenBLAS thread only adds hand-offs, and spins when the
# machine is busy: the 10,000 steps took 2.6 s with one thread and 42 s with two under a load of 3.5.
ONE_BLAS_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class Row:
    """A measure's samples; the target is ratio ≤ limit, or, without a reference, ours < limit."""

    measure: str
    ours: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    unit: str = "s"
    limit: float | None = None

    def cells(self) -> list[str]:
        ours = statistics.median(self.ours)
        reference = statistics.median(self.reference) if self.reference else None
        ratio = ours / reference if reference else None
        target = ""
        if self.limit is not None and ratio is None:
            target = f"< {self.limit:g} {self.unit} " + ("✅" if ours < self.limit else "❌")
        elif self.limit is not None:
            target = f"≤ {self.limit:g}× " + ("✅" if ratio <= self.limit else "❌")
        return [
            self.measure,
            f"{ours:,.2f} {self.unit}",
            "" if reference is None else f"{reference:,.2f} {self.unit}",
            "" if ratio is None else f"{ratio:.2f}×",
            target,
        ]


def markdown(rows: list[Row]) -> str:
    lines = ["| measure | ours (median) | reference (median) | ratio | target |", "|---|--:|--:|--:|---|"]
    return "\n".join(lines + ["| " + " | ".join(row.cells()) + " |" for row in rows])


def alternate(repeat: int, kinds: tuple[str, ...]):
    """(repetition, kind) for every kind in every repetition, the order rotated by one each time."""
    for repetition in range(repeat):
        shift = repetition % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            yield repetition, kind


class Failed(RuntimeError):
    """A measured command failed; the message holds its command and the tail of its output."""


@dataclass
class Bench:
    workdir: Path
    mirror: Path
    repeat: int
    slow_repeat: int
    iterations: int | None
    notes: list[str] = field(default_factory=list)
    logs: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of commands run outside a project copy (the copies bring their own)."""
        from pipeline_project import base_env

        return base_env(self.workdir / "root", {"MNIST_MIRROR": str(self.mirror), **extra})

    def project(self, name: str):
        """A fresh copy of the pipeline (tests/pipeline_project.py) on the real data, committed."""
        from pipeline_project import make_project

        return make_project(self.workdir / name, mirror=self.mirror, tiny=False)

    def run(self, label: str, command: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, **extra: str):
        """Run ``command``; return its wall time, the peak RSS (MiB) of exactly that process (and of
        the processes it waited for: os.wait4's usage, unlike RUSAGE_CHILDREN a maximum over that
        child alone) and its standard output, kept under logs/ with its standard error."""
        print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr, flush=True)
        self.logs += 1
        log = self.workdir / "logs" / f"{self.logs:03d}-{label.replace(' ', '-').replace('/', '-')}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{log}.out", "w+") as out, open(f"{log}.err", "w+") as err:
            started = time.perf_counter()
            process = subprocess.Popen(
                [str(part) for part in command],
                cwd=cwd,
                env={**(env or self.env()), **extra},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if process.returncode:
            command_line = " ".join(map(str, command))
            raise Failed(
                f"{label}: {command_line} exited {process.returncode} in {cwd}\n{stdout[-2000:]}{stderr[-3000:]}"
            )
        return seconds, usage.ru_maxrss / 1024, stdout

    def worker(self, label: str, kind: str, *args: str) -> dict:
        """A worker of this module in a fresh process; what it prints last as JSON."""
        command = [sys.executable, "-m", "benchmarks.run", "--worker", kind, "--mirror", str(self.mirror), *args]
        return json.loads(self.run(label, command)[2].strip().splitlines()[-1])

    def reference(self, label: str, *args: str) -> tuple[float, dict]:
        """The NumPy reference process: its wall time and its JSON summary."""
        command = [sys.executable, "-m", "benchmarks.numpy_reference", *args]
        seconds, _, stdout = self.run(label, command, **ONE_BLAS_THREAD)
        return seconds, json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Sections


def bench_pipeline(bench: Bench) -> list[Row]:
    """A cold ``dvc repro`` of a fresh copy against the NumPy reference process; then the no-op repro."""
    cold = Row("cold `dvc repro` of a fresh copy vs the NumPy reference process (raw IDX files in)", limit=3)
    noop = Row("no-op `dvc repro` vs `dvc status`", limit=2)
    project = None
    for repetition, kind in alternate(bench.repeat, ("repro", "numpy")):
        if kind == "numpy":
            out = bench.workdir / "numpy-out"
            cold.reference.append(
                bench.reference("NumPy reference process", "--mirror", str(bench.mirror), "--out", str(out))[0]
            )
            continue
        if project is not None:  # one copy's data and DVC cache on disk at a time
            shutil.rmtree(project.root.parent)
        project = bench.project(f"pipeline-{repetition}")
        cold.ours.append(bench.run("cold dvc repro", [VENV_BIN / "dvc", "repro"], project.root, project.env)[0])
    for _, kind in alternate(bench.repeat, ("repro", "status")):
        seconds, _, output = bench.run(f"no-op dvc {kind}", [VENV_BIN / "dvc", kind], project.root, project.env)
        if kind == "repro" and "Running stage" in output:
            raise Failed(f"the no-op dvc repro ran a stage:\n{output}")
        (noop.ours if kind == "repro" else noop.reference).append(seconds)
    return [cold, noop]


def bench_stage(bench: Bench) -> list[Row]:
    """Each stage once (its peak RSS), then the train stage and mnist-predict against the NumPy process."""
    import numpy as np
    from PIL import Image

    project = bench.project("stage")
    seconds, rss = {}, {}
    for name in STAGES:
        seconds[name], rss[name], _ = bench.run(f"stage {name}", project.stage_command(name), project.root, project.env)
    processed = project.root / "data" / "processed"
    allocated = sum(path.stat().st_blocks * 512 for path in processed.iterdir())
    image = project.root / "digit.png"
    Image.fromarray(np.load(processed / "test_images.npy")[0].reshape(28, 28)).save(image)

    stage = Row("train stage as a process vs a NumPy process of the same training (data/processed in)", limit=2.5)
    logging = Row("train stage with its per-step MLflow logging vs without", limit=1.05)
    predict = Row("`mnist-predict` on one image vs that NumPy process", limit=1.2)
    # What no change of ours can go below: a process that only imports what the command must load.
    imports = {
        "keras": Row(
            "floor of `mnist-predict`: a process that only imports Keras (so TensorFlow) vs that NumPy process"
        ),
        "keras, mlflow": Row(
            "floor of the train stage: a process that only imports Keras and MLflow vs that NumPy process"
        ),
    }
    stage_arguments = project.stage_command("train")[3:]  # after `python -m pipeline.train`
    for repetition, kind in alternate(bench.repeat, ("stage", "numpy", "no-logging", "predict", *imports)):
        store = {"MLFLOW_TRACKING_URI": f"sqlite:///{bench.workdir}/mlflow-{kind}-{repetition}.db"}
        if kind == "stage":
            ours = bench.run("train stage", project.stage_command("train"), project.root, project.env, **store)[0]
            stage.ours.append(ours)
            logging.ours.append(ours)
        elif kind == "no-logging":
            command = [sys.executable, "-m", "benchmarks.run", "--worker", "train-stage", "--", *stage_arguments]
            label = "train stage without per-step logging"
            logging.reference.append(
                bench.run(label, command, project.root, project.env, PYTHONPATH=str(ROOT), **store)[0]
            )
        elif kind == "numpy":
            params = project.root / "params.yaml"
            reference = bench.reference("NumPy process", "--data", str(processed), "--params", str(params))[0]
            for row in (stage, predict, *imports.values()):
                row.reference.append(reference)
        elif kind in imports:
            # gc.freeze() as pipeline.cli.run does: Python's last collection would walk every TensorFlow object.
            command = [sys.executable, "-c", f"import gc, {kind}; gc.freeze()"]
            imports[kind].ours.append(bench.run(f"import {kind}", command, project.root, project.env)[0])
        else:
            command = [VENV_BIN / "mnist-predict", "--model", "models/model.keras", image]
            predict.ours.append(bench.run("mnist-predict", command, project.root, project.env)[0])
    bench.notes.append("Stage wall times (their RSS run): " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    history = [
        bench.worker("MLflow writing the history", "history-write", "--workdir", str(bench.workdir))["seconds"]
        for _ in range(bench.repeat)
    ]
    return [
        stage,
        logging,
        Row("floor of the logging: MLflow writing the seed's 20,200 history values to a new SQLite store", history),
        predict,
        *imports.values(),
        *(Row(f"peak RSS, stage {name}", [value], unit="MiB", limit=1536) for name, value in rss.items()),
        Row("`data/processed` on disk (du)", [allocated / 1e6], unit="MB", limit=60),
    ]


def bench_train_loop(bench: Bench) -> list[Row]:
    """The seed's 10,000 steps in TensorFlow against NumPy, and TensorFlow without the percentiles."""
    iterations = str(bench.iterations or 10_000)
    weights = bench.workdir / "initial-weights.npz"
    loop = Row(f"train loop, {int(iterations):,} steps: TensorFlow vs NumPy, from the same initial weights", limit=1.0)
    percentiles = Row("train loop recording weight and bias percentiles every evaluation vs not", limit=1.05)
    compiled = Row("the same train loop after its first step, which XLA compiles, vs NumPy's whole loop")
    finals = {}
    # TensorFlow runs first: it writes the initial weights NumPy starts from.
    for _, kind in alternate(bench.repeat, ("tensorflow", "numpy", "no-percentiles")):
        if kind == "numpy":
            _, finals[kind] = bench.reference(
                "NumPy train loop",
                "--mirror",
                str(bench.mirror),
                "--no-verify",
                "--iterations",
                iterations,
                "--initial-weights",
                str(weights),
            )
            loop.reference.append(finals[kind]["train_seconds"])
            compiled.reference.append(finals[kind]["train_seconds"])
            continue
        off = kind == "no-percentiles"
        finals[kind] = bench.worker(
            f"TensorFlow train loop, {kind}",
            "train-loop",
            "--iterations",
            iterations,
            "--weights-out",
            str(weights),
            "--percentiles",
            "off" if off else "on",
        )
        (percentiles.reference if off else loop.ours).append(finals[kind]["seconds"])
        if not off:
            percentiles.ours.append(finals[kind]["seconds"])
            compiled.ours.append(finals[kind]["seconds"] - finals[kind]["first_step_seconds"])
    finals_text = (
        f"{kind} {final['test_accuracy']:.4f} / {final['test_cross_entropy']:.2f}" for kind, final in finals.items()
    )
    bench.notes.append("Train loop, final test accuracy / cross-entropy: " + ", ".join(finals_text))
    return [loop, compiled, percentiles]


def bench_series(bench: Bench) -> list[Row]:
    """One step of every model of the series, on one core and on two (TensorFlow's intra- and inter-op threads)."""
    milliseconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    compile_seconds: dict[str, float] = {}
    models = ["softmax"]  # The softmax's worker names the others; the loop below takes them in turn.
    for repetition in range(bench.slow_repeat):
        for model in models:
            for threads in (1, 2) if repetition % 2 == 0 else (2, 1):
                label, arguments = f"series {model} {threads} thread(s)", ["--model", model, "--threads", str(threads)]
                result = bench.worker(label, "series-step", *arguments)
                milliseconds[model, threads].append(1000 * result["step_seconds"])
                compile_seconds[model] = result["first_chunk_seconds"]
                models += [name for name in result["models"] if name not in models]
    from pipeline.model import SERIES

    # What the train stage runs: each model at the threads pipeline.model chose for it.
    best = {model: statistics.median(milliseconds[model, SERIES[model].threads]) for model in models}
    # Convolutional models are to run at least 1.6 times as fast on two cores as on one.
    rows = [
        Row(
            f"one step of {model}: 2 cores vs 1 (the stage uses {SERIES[model].threads})",
            milliseconds[model, 2],
            milliseconds[model, 1],
            "ms",
            limit=1 / 1.6 if model.startswith("conv") else None,
        )
        for model in models
    ]
    dropout, plain = DROPOUT_PAIR
    rows.append(
        Row(f"one step of {dropout} vs {plain} (the stage's threads)", [best[dropout]], [best[plain]], "ms", 1.5)
    )
    minutes = sum(best.values()) * SERIES_RUN_STEPS / 60_000
    rows.append(
        Row(f"series total: {SERIES_RUN_STEPS:,} × step time per model (the stage's threads)", [minutes], [], "min", 30)
    )
    for threads in (1, 2):
        total = sum(statistics.median(milliseconds[model, threads]) for model in models) * SERIES_RUN_STEPS / 60_000
        bench.notes.append(f"Series total with {threads} thread(s) for every model: {total:.1f} min.")
    shares = (f"{model} {value / sum(best.values()):.0%}" for model, value in best.items())
    bench.notes.append("Series, each model's share of the total: " + ", ".join(shares) + ".")
    compiling = (f"{model} {value:.1f} s" for model, value in compile_seconds.items())
    bench.notes.append(f"Series, compiling the loop and its first {SERIES_STEPS} steps: " + ", ".join(compiling) + ".")
    return rows


def bench_sweep(bench: Bench) -> list[Row]:
    from benchmarks import sweep

    row = Row("6 short trials through `mnist-sweep` (Ray, 2 at a time) vs `dvc queue start -j 2`", limit=1.25)
    ray = []
    for repetition, kind in alternate(bench.slow_repeat, ("queue", "sweep")):
        print(f"[{time.strftime('%H:%M:%S')}] {kind}: 6 trials", file=sys.stderr, flush=True)
        project = sweep.prepared(bench.workdir / f"sweep-{repetition}-{kind}")
        if kind == "queue":
            row.reference.append(sweep.time_queue(project))
        else:
            row.ours.append(sweep.time_sweep(project))
            ray.append(bench.worker("Ray start-up", "ray-start")["seconds"])
    bench.notes.append(
        f"Ray's start-up (ray.init() and ray.shutdown(), a fresh process): {statistics.median(ray):.1f} s."
    )
    return [row]


def bench_asha(bench: Bench) -> list[Row]:
    from benchmarks import asha

    return asha.rows(bench)


BENCHES = {
    "pipeline": bench_pipeline,
    "stage": bench_stage,
    "train-loop": bench_train_loop,
    "series": bench_series,
    "sweep": bench_sweep,
    "asha": bench_asha,
}


# --------------------------------------------------------------------------------------------
# Workers: the measured pieces that are not a command of the project, each run in a fresh process


def worker_train_loop(args: argparse.Namespace) -> dict:
    """The seed's training as the train stage runs it, from building the trainer to the last step."""
    import numpy as np
    import tensorflow as tf

    import pipeline.model
    from benchmarks.numpy_reference import load_mirror
    from pipeline.data import PERCENTILES
    from pipeline.params import load_params
    from pipeline.train import BatchOrder, seeded_trainer, train

    params = load_params(ROOT / "params.yaml")
    config = replace(params.train, model="softmax")  # The model the NumPy reference computes.
    data = load_mirror(args.mirror, params.preprocess.validation_size, verify=False)
    if args.percentiles == "off":  # A constant is traced in place of each sort; pipeline/ is unchanged.
        pipeline.model.percentiles_graph = lambda variables: tf.fill([len(PERCENTILES)], float("nan"))
    started = time.perf_counter()
    trainer, _ = seeded_trainer(config, data)
    initial = trainer.model.get_weights()
    order = BatchOrder(len(data["train_images"]), config.batch_size, args.iterations, config.seed)
    chunk_ends: list[float] = []
    history = train(trainer, order, config.eval_interval, on_chunk=lambda *_: chunk_ends.append(time.perf_counter()))
    seconds = time.perf_counter() - started
    np.savez(args.weights_out, **dict(zip(("weights", "biases"), initial)))
    return {
        "seconds": seconds,
        "first_step_seconds": chunk_ends[0] - started,  # The first chunk is one step: building and compiling it.
        "test_accuracy": history.test_accuracy[-1],
        "test_cross_entropy": history.test_cross_entropy[-1],
    }


def worker_series_step(args: argparse.Namespace) -> dict:
    """Seconds per step of one model of the series, as the train stage runs it (on ``--threads``), once compiled."""
    from benchmarks.numpy_reference import load_mirror
    from pipeline.params import load_params
    from pipeline.train import BatchOrder, seeded_trainer

    params = load_params(ROOT / "params.yaml")
    config = replace(params.train, model=args.model)
    data = load_mirror(args.mirror, params.preprocess.validation_size, verify=False)
    order = BatchOrder(len(data["train_images"]), config.batch_size, 2 * SERIES_STEPS, config.seed)
    trainer, _ = seeded_trainer(config, data, threads=args.threads)
    started = time.perf_counter()
    trainer.train_steps(order[:SERIES_STEPS], 1, config.eval_interval)
    compiled = time.perf_counter()
    trainer.train_steps(order[SERIES_STEPS:], SERIES_STEPS + 1, config.eval_interval)
    from pipeline.model import SERIES

    return {
        "step_seconds": (time.perf_counter() - compiled) / SERIES_STEPS,
        "first_chunk_seconds": compiled - started,
        "models": list(SERIES),
    }


def worker_train_stage(args: argparse.Namespace) -> None:
    """``python -m pipeline.train`` without its per-step logging: the chunks reach the run, which logs nothing."""
    from pipeline.tracking import record

    record.TrainingRun.log_history = lambda self, series, started, ended: None
    sys.argv = ["pipeline.train", *args.rest]
    runpy.run_module("pipeline.train", run_name="__main__")


def worker_history_write(args: argparse.Namespace) -> dict:
    """Seconds MLflow takes to write the seed's history (10,000 steps x 2, 100 tests x 2) as train sends it."""
    import mlflow
    from mlflow.entities import Metric

    from pipeline.tracking.record import HISTORY_PREFIX, METRICS_PER_BATCH

    client = mlflow.MlflowClient(f"sqlite:///{args.workdir}/history-write-{os.getpid()}.db")
    run_id = client.create_run(client.create_experiment("history-write")).info.run_id
    steps = {
        "train_accuracy": 10_000,
        "train_cross_entropy_sum": 10_000,
        "test_accuracy": 100,
        "test_cross_entropy_sum": 100,
    }
    points = [Metric(HISTORY_PREFIX + key, 0.5, step, step) for key, count in steps.items() for step in range(count)]
    started = time.perf_counter()
    for start in range(0, len(points), METRICS_PER_BATCH):
        client.log_batch(run_id, points[start : start + METRICS_PER_BATCH], synchronous=True)
    return {"seconds": time.perf_counter() - started}


def worker_ray_start(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    import ray

    ray.init(include_dashboard=False, configure_logging=False)
    ray.shutdown()
    return {"seconds": time.perf_counter() - started}


WORKERS = {
    "train-loop": worker_train_loop,
    "series-step": worker_series_step,
    "train-stage": worker_train_stage,
    "ray-start": worker_ray_start,
    "history-write": worker_history_write,
}


# --------------------------------------------------------------------------------------------


def precompiled() -> str:
    """Which heavy libraries have bytecode in the virtualenv; the others every process compiles again."""
    found = []
    for name in ("tensorflow", "keras", "mlflow"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and Path(importlib.util.cache_from_source(spec.origin)).exists():
            found.append(name)
    return ", ".join(found) or "none of tensorflow, keras, mlflow"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each measure (default 3)")
    parser.add_argument("--slow-repeat", type=int, default=1, help="repetitions of series and sweep (default 1)")
    parser.add_argument("--iterations", type=int, help="steps of the train-loop section (default 10,000)")
    mirror = os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "mnist"
    parser.add_argument("--mirror", type=Path, default=mirror, help="the four MNIST files (default $MNIST_MIRROR)")
    parser.add_argument("--workdir", type=Path, help="where the copies and logs go (default a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--json", type=Path, help="also write every sample and the notes to this JSON file")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--percentiles", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--weights-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [name for name in SECTIONS if name in args.only.split(",")]
    if unknown := set(args.only.split(",")) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.mirror = Path(args.mirror).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        if result is not None:
            print(json.dumps(result))
        return 0
    sys.path.insert(0, str(ROOT / "tests"))  # pipeline_project: a committed copy of the pipeline
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mnist-benchmark-"))).resolve()
    bench = Bench(workdir, args.mirror, args.repeat, args.slow_repeat, args.iterations)
    load_before, started = os.getloadavg(), time.perf_counter()
    rows = []
    try:
        for section in args.sections:
            rows += BENCHES[section](bench)
    except RuntimeError as error:  # Failed, or a sweep that did not run every trial
        print(f"error: {error}\n(every command's output is under {workdir / 'logs'})", file=sys.stderr)
        return 1
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(rows) + "\n")
    print(
        f"--repeat {args.repeat}, --slow-repeat {args.slow_repeat}; {time.perf_counter() - started:.0f} s in all; "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after; {os.cpu_count()} CPUs; "
        f"bytecode in the virtualenv for {precompiled()}."
    )
    for note in bench.notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(row) for row in rows], "notes": bench.notes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
