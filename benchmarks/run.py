"""Benchmark the pipeline against a plain NumPy reference and print a Markdown table of medians.

Run from the project root, with the project's virtualenv::

    uv run python -m benchmarks.run            # 3 repetitions of everything (about 4 minutes)
    uv run python -m benchmarks.run --quick    # 1 repetition
    uv run python -m benchmarks.run --only train-loop,memory --repeat 5

Sections (``--only``, comma-separated; default all):

* ``train-loop``: 10,000 SGD steps of the seed configuration in TensorFlow (SgdTrainer + train(),
  including XLA compilation, per-step metrics and test evaluations; excluding the TensorFlow import
  and data loading) against benchmarks.numpy_reference.train_numpy on the same data, initial
  weights and batch order. Each run is a fresh process, so every TensorFlow run compiles afresh.
* ``percentiles``: the same TensorFlow train loop with the weights' and biases' percentiles recorded
  at every test evaluation (as the train stage does) against the loop without them (by patching
  ``pipeline.model.percentiles_graph`` to return NaNs in the benchmark's own worker process, so the
  compiled loop has no sort in it; pipeline/ is not edited), alternating, a fresh process each.
* ``tracking``: the train stage's wall time (a fresh SQLite MLflow store each time) with its
  per-step MLflow logging against the same stage with that logging switched off (by patching
  ``pipeline.tracking.record.TrainingRun.log_history`` in the benchmark's own process; pipeline/ is
  not edited), plus ``log_history`` of the same 20,200 values alone, for information.
* ``pipeline``: a cold ``dvc repro`` of a fresh copy of the project against the NumPy reference
  process (``python -m benchmarks.numpy_reference``, raw IDX files in, scores out), then a no-op
  ``dvc repro`` against ``dvc status`` in that copy.
* ``series``: one training step of each model of the series (``train.model``), on the real data
  with the loop the train stage uses (batch of train.batch_size, the batch measured again after the
  update, the test set every train.eval_interval steps, so its cost is spread over the steps as in
  a run), after XLA has compiled the loop; each in a fresh process, against the seed's softmax
  measured the same way in the same run.
* ``memory``: peak RSS of each stage's dvc.yaml command run as a child process (``os.wait4``'s
  resource usage of exactly that child), the same for train with the largest batch size params.yaml
  accepts (55,000, for LARGE_BATCH_STEPS steps), and the size of data/processed.

Every measured command runs in a throwaway directory (``--workdir``, default a new temp dir, removed
afterwards unless ``--keep``) with this virtualenv first on PATH, ``$MNIST_MIRROR`` (default
``../shared/mnist`` beside the project) as the fetch mirror and no network source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

from pipeline.data import FILES  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SECTIONS = ("train-loop", "percentiles", "tracking", "pipeline", "series", "memory")
# Steps timed per model in the series section: two test evaluations at the default eval_interval.
SERIES_STEPS = 200
STAGES = ("fetch", "preprocess", "train", "report")
GIT_IDENTITY = {"user.name": "Benchmark", "user.email": "benchmark@example.invalid"}
MIB = 1024 * 1024
# The memory section also runs train with the largest batch params.yaml accepts (the whole training
# set), for enough steps to draw hundreds of epochs' permutations.
LARGE_BATCH = 55_000
LARGE_BATCH_STEPS = 300

TARGETS = {
    "train-loop": 1.5,
    "percentiles": 1.05,
    "tracking": 1.10,
    "pipeline": 5.0,
    "noop": 2.0,
    "rss_mib": 1.5 * 1024,
    "processed_mb": 60.0,
}


# The NumPy reference runs with one BLAS thread. Its matrices are tiny (100x784 by 784x10 per step),
# so a second OpenBLAS thread only adds hand-offs: on this 2-core machine the 10,000 steps took
# 3.3-4.3 s with one thread and 4.9-8.2 s with two (the more so when anything else runs, as idle
# OpenBLAS threads spin). A reference slowed down by its own threading would flatter the pipeline.
REFERENCE_THREADS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class BenchmarkError(RuntimeError):
    """A measured command failed; the message holds its command and the tail of its output."""


# --------------------------------------------------------------------------------------------
# Running things


def base_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without pipeline/DVC/MLflow settings, this virtualenv first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "DVC_", "MNIST_", "GIT_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(
        {
            "VIRTUAL_ENV": str(VENV_BIN.parent),
            "DVC_NO_ANALYTICS": "1",
            # DVC keeps per-repository indexes in a machine-wide directory; a private one keeps runs cold.
            "DVC_SITE_CACHE_DIR": str(workdir / "dvc-site-cache"),
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": GIT_IDENTITY["user.name"],
            "GIT_AUTHOR_EMAIL": GIT_IDENTITY["user.email"],
            "GIT_COMMITTER_NAME": GIT_IDENTITY["user.name"],
            "GIT_COMMITTER_EMAIL": GIT_IDENTITY["user.email"],
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # Only the local mirror: a broken mirror fails fast instead of falling back to the network.
            "MNIST_PUBLIC_MIRRORS": "",
            "MNIST_PYPI_FIND_LINKS": str(workdir / "no-wheels"),
        }
    )
    (workdir / "no-wheels").mkdir(parents=True, exist_ok=True)
    env.update(extra or {})
    return env


@dataclass
class Completed:
    seconds: float
    maxrss_kib: int
    stdout: str
    stderr: str


def run_timed(
    command: Sequence[str] | str,
    *,
    cwd: Path,
    env: dict[str, str],
    log: Path,
    timeout: float = 900,
    shell: bool = False,
) -> Completed:
    """Run one command, returning its wall time and the peak RSS of exactly that child process.

    ``os.wait4`` reports the resource usage of the child it reaps (including descendants that child
    waited for), so unlike ``RUSAGE_CHILDREN`` it is not a running maximum over earlier children.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            shell=shell,
            start_new_session=True,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
                process.returncode = -9
                raise BenchmarkError(f"{command} did not finish within {timeout:g} s (log {out_path})")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if process.returncode != 0:
        raise BenchmarkError(
            f"{command if isinstance(command, str) else ' '.join(map(str, command))} exited "
            f"{process.returncode} in {cwd}\n--- stdout (tail)\n{stdout[-3000:]}\n--- stderr (tail)\n{stderr[-3000:]}"
        )
    return Completed(seconds, usage.ru_maxrss, stdout, stderr)


def last_json(stdout: str) -> dict:
    """The JSON object a worker prints as its last line of output."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchmarkError(f"no JSON result in the worker's output:\n{stdout[-2000:]}")


def worker_command(kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.run", "--worker", kind, *args]


def copy_project(destination: Path, env: dict[str, str], git: bool = True) -> Path:
    """A fresh copy of the working tree (tracked and untracked-but-not-ignored files), git init'ed.

    Nothing ignored comes along: no outputs, no DVC cache, no MLflow store, no __pycache__.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    if git:
        for command in (
            ["git", "init", "-q", "-b", "main"],
            ["git", "add", "-A"],
            ["git", "commit", "-q", "-m", "benchmark copy"],
        ):
            subprocess.run(command, cwd=destination, env=env, check=True, capture_output=True)
    return destination


def stage_command(project: Path, stage: str) -> str:
    import yaml

    return " ".join(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"].split())


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.as_posix()}"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    measure: str
    ours: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    unit: str = "s"
    target: str = ""
    # Given the medians (ours, reference) and the ratio, whether the target is met; None = no verdict.
    verdict: Callable[[float, float | None, float | None], bool] | None = None

    def medians(self) -> tuple[float | None, float | None, float | None]:
        ours = statistics.median(self.ours) if self.ours else None
        reference = statistics.median(self.reference) if self.reference else None
        ratio = ours / reference if ours is not None and reference else None
        return ours, reference, ratio

    def cells(self) -> list[str]:
        ours, reference, ratio = self.medians()
        verdict = "—"
        if self.verdict is not None and ours is not None:
            verdict = "PASS" if self.verdict(ours, reference, ratio) else "FAIL"
        show = lambda value: "—" if value is None else f"{value:.2f} {self.unit}".strip()  # noqa: E731
        return [
            self.measure,
            show(ours),
            show(reference),
            "—" if ratio is None else f"{ratio:.3f}×" if ratio < 10 else f"{ratio:.1f}×",
            self.target or "—",
            verdict,
        ]


def markdown_table(rows: list[Row]) -> str:
    header = ["Measure", "Ours (median s)", "Reference (median s)", "Ratio", "Target", "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def at_most(limit: float):
    return lambda ours, reference, ratio: ratio is not None and ratio <= limit


def below(limit: float):
    return lambda ours, reference, ratio: ours < limit


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class Context:
    workdir: Path
    mirror: Path
    repeat: int
    iterations: int | None
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)
    stage_project: Path | None = None
    reference_threads: int = 1

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.workdir, {"MNIST_MIRROR": str(self.mirror), **extra})

    def reference_env(self, **extra: str) -> dict[str, str]:
        """The environment of the NumPy reference's processes: BLAS limited to ``reference_threads``."""
        env = self.env(**extra)
        if self.reference_threads > 0:
            env.update({name: str(self.reference_threads) for name in REFERENCE_THREADS_ENV})
        return env

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_stage_project(context: Context) -> Path:
    """A copy of the project with fetch and preprocess run (their peak RSS recorded on the way)."""
    if context.stage_project is None:
        project = context.workdir / "stages" / "project"
        project.mkdir(parents=True)
        env = context.env(MLFLOW_TRACKING_URI=sqlite_uri(project / "mlflow.db"))
        copy_project(project, env)
        for stage in ("fetch", "preprocess"):
            context.say(f"stage {stage} (for its peak RSS and the processed data)")
            done = run_timed(
                stage_command(project, stage),
                cwd=project,
                env=env,
                shell=True,
                log=context.workdir / "logs" / f"stage-{stage}",
            )
            context.samples.setdefault("stage_rss_kib", {})[stage] = done.maxrss_kib
            context.samples.setdefault("stage_seconds", {})[stage] = done.seconds
        context.stage_project = project
    return context.stage_project


def bench_train_loop(context: Context) -> list[Row]:
    from pipeline.params import load_params

    config = load_params(ROOT / "params.yaml").train
    iterations = context.iterations or config.iterations
    weights = context.workdir / "initial-weights.npz"
    common = ["--mirror", str(context.mirror), "--iterations", str(iterations)]
    env = context.env(PYTHONPATH=str(ROOT))
    reference_env = context.reference_env(PYTHONPATH=str(ROOT))
    row = Row(
        f"Train loop: {iterations:,} steps, TF SgdTrainer + train() vs NumPy reference",
        target=f"≤ {TARGETS['train-loop']}×",
        verdict=at_most(TARGETS["train-loop"]),
    )
    results = context.samples.setdefault("train_loop", [])
    for repetition in range(context.repeat):
        # Alternate which goes first, so that a change in the machine's load hits both alike (TF goes
        # first the first time: it writes the initial weights NumPy starts from).
        order = ("tf", "numpy") if repetition % 2 == 0 else ("numpy", "tf")
        for kind in order:
            context.say(f"train loop {repetition + 1}/{context.repeat}: {kind}")
            if kind == "tf":
                done = run_timed(
                    worker_command("tf-train", *common, "--weights-out", str(weights)),
                    cwd=ROOT,
                    env=env,
                    log=context.workdir / "logs" / f"train-loop-tf-{repetition}",
                )
                result = last_json(done.stdout)
                row.ours.append(result["seconds"])
            else:
                done = run_timed(
                    worker_command("numpy-train", *common, "--weights-in", str(weights)),
                    cwd=ROOT,
                    env=reference_env,
                    log=context.workdir / "logs" / f"train-loop-numpy-{repetition}",
                )
                result = last_json(done.stdout)
                row.reference.append(result["seconds"])
            results.append({"kind": kind, **result})
    tf_runs = [result for result in results if result["kind"] == "tf"]
    numpy_runs = [result for result in results if result["kind"] == "numpy"]
    context.notes.append(
        "Train loop, TF breakdown (median): trainer construction "
        f"{statistics.median(r['construct_seconds'] for r in tf_runs):.2f} s, tracing the step loop "
        f"{statistics.median(r['trace_seconds'] for r in tf_runs):.2f} s, first train_steps call (XLA compile + "
        f"its steps) {statistics.median(r['first_chunk_seconds'] for r in tf_runs):.2f} s. Final test accuracy: TF "
        f"{tf_runs[-1]['test_accuracy']:.4f}, NumPy {numpy_runs[-1]['test_accuracy']:.4f}; final test cross-entropy: "
        f"TF {tf_runs[-1]['test_cross_entropy']:.2f}, NumPy {numpy_runs[-1]['test_cross_entropy']:.2f}."
    )
    return [row]


def bench_percentiles(context: Context) -> list[Row]:
    from pipeline.params import load_params

    iterations = context.iterations or load_params(ROOT / "params.yaml").train.iterations
    env = context.env(PYTHONPATH=str(ROOT))
    row = Row(
        f"Percentiles: {iterations:,}-step train loop recording weight and bias percentiles vs not",
        target=f"≤ {TARGETS['percentiles']:.2f}×",
        verdict=at_most(TARGETS["percentiles"]),
    )
    for repetition in range(context.repeat):
        order = ("on", "off") if repetition % 2 == 0 else ("off", "on")
        for state in order:
            context.say(f"percentiles {repetition + 1}/{context.repeat}: recording {state}")
            done = run_timed(
                worker_command("tf-train", "--mirror", str(context.mirror), "--iterations", str(iterations),
                               "--percentiles", state),
                cwd=ROOT,
                env=env,
                log=context.workdir / "logs" / f"percentiles-{state}-{repetition}",
            )  # fmt: skip
            (row.ours if state == "on" else row.reference).append(last_json(done.stdout)["seconds"])
    ours, reference, _ = row.medians()
    context.notes.append(
        f"Percentiles: recording them adds {ours - reference:+.2f} s (median) to a {reference:.2f} s train loop."
    )
    return [row]


def bench_tracking(context: Context) -> list[Row]:
    project = prepare_stage_project(context)
    arguments = stage_command(project, "train").split()[3:]  # after `python -m pipeline.train`
    row = Row(
        "Tracking: train stage with per-step MLflow logging vs without (fresh SQLite store)",
        target=f"≤ {TARGETS['tracking']:.2f}×",
        verdict=at_most(TARGETS["tracking"]),
    )
    alone = Row("  (info) log_history of the same 20,200 values alone vs train stage without logging")
    stores = context.workdir / "tracking"
    stores.mkdir(parents=True, exist_ok=True)
    for repetition in range(context.repeat):
        order = ("on", "off") if repetition % 2 == 0 else ("off", "on")
        for logging_state in order:
            context.say(f"tracking {repetition + 1}/{context.repeat}: train stage, per-step logging {logging_state}")
            env = context.env(MLFLOW_TRACKING_URI=sqlite_uri(stores / f"stage-{logging_state}-{repetition}.db"))
            done = run_timed(
                worker_command("train-stage", "--step-logging", logging_state, "--", *arguments),
                cwd=project,
                env=env,
                log=context.workdir / "logs" / f"tracking-{logging_state}-{repetition}",
            )
            (row.ours if logging_state == "on" else row.reference).append(done.seconds)
            if logging_state == "on":
                context.samples.setdefault("train_stage_rss_kib", []).append(done.maxrss_kib)
        context.say(f"tracking {repetition + 1}/{context.repeat}: log_history alone")
        env = context.env(PYTHONPATH=str(ROOT))
        done = run_timed(
            worker_command("log-series", "--uri", sqlite_uri(stores / f"alone-{repetition}.db")),
            cwd=stores,
            env=env,
            log=context.workdir / "logs" / f"log-series-{repetition}",
        )
        alone.ours.append(last_json(done.stdout)["seconds"])
    alone.reference = list(row.reference)
    ours, reference, _ = row.medians()
    context.notes.append(
        f"Tracking: per-step logging adds {ours - reference:+.2f} s (median) to a {reference:.2f} s train stage; "
        f"logging the 20,200 values alone takes {alone.medians()[0]:.2f} s, mostly hidden behind training by "
        "the stage's writer thread."
    )
    return [row, alone]


def bench_pipeline(context: Context) -> list[Row]:
    cold = Row(
        "Whole pipeline: cold `dvc repro` (fresh copy) vs NumPy reference process",
        target=f"≤ {TARGETS['pipeline']:g}×",
        verdict=at_most(TARGETS["pipeline"]),
    )
    noop = Row(
        "No-op `dvc repro` (all up to date) vs `dvc status`",
        target=f"≤ {TARGETS['noop']:g}×",
        verdict=at_most(TARGETS["noop"]),
    )
    dvc = str(VENV_BIN / "dvc")
    last_project = None
    for repetition in range(context.repeat):
        base = context.workdir / f"pipeline-{repetition}"
        project = base / "project"
        project.mkdir(parents=True)
        env = context.env(MLFLOW_TRACKING_URI=sqlite_uri(project / "mlflow.db"))
        copy_project(project, env)
        order = ("dvc", "numpy") if repetition % 2 == 0 else ("numpy", "dvc")
        for kind in order:
            context.say(
                f"pipeline {repetition + 1}/{context.repeat}: "
                f"{'cold dvc repro' if kind == 'dvc' else 'NumPy reference process'}"
            )
            if kind == "dvc":
                done = run_timed(
                    [dvc, "repro"], cwd=project, env=env, log=context.workdir / "logs" / f"dvc-repro-cold-{repetition}"
                )
                cold.ours.append(done.seconds)
            else:
                done = run_timed(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.numpy_reference",
                        "--mirror",
                        str(context.mirror),
                        "--params",
                        str(project / "params.yaml"),
                        "--out",
                        str(base / "numpy-out"),
                    ],
                    cwd=ROOT,
                    env=context.reference_env(PYTHONPATH=str(ROOT)),
                    log=context.workdir / "logs" / f"numpy-process-{repetition}",
                )
                cold.reference.append(done.seconds)
        if last_project is not None:  # keep the disk use to one project's outputs and cache
            shutil.rmtree(last_project.parent, ignore_errors=True)
        last_project = project
    env = context.env(MLFLOW_TRACKING_URI=sqlite_uri(last_project / "mlflow.db"))
    for repetition in range(context.repeat):
        for kind in ("repro", "status") if repetition % 2 == 0 else ("status", "repro"):
            context.say(f"no-op {repetition + 1}/{context.repeat}: dvc {kind}")
            done = run_timed(
                [dvc, kind], cwd=last_project, env=env, log=context.workdir / "logs" / f"dvc-{kind}-noop-{repetition}"
            )
            output = done.stdout + done.stderr
            if kind == "repro" and "Running stage" in output:
                raise BenchmarkError(f"the no-op dvc repro ran a stage:\n{output[-2000:]}")
            if kind == "status" and "up to date" not in output:
                raise BenchmarkError(f"dvc status after repro is not up to date:\n{output[-2000:]}")
            (noop.ours if kind == "repro" else noop.reference).append(done.seconds)
    return [cold, noop]


def bench_series(context: Context) -> list[Row]:
    from pipeline.params import MODEL_NAMES

    env = context.env(PYTHONPATH=str(ROOT))
    per_step: dict[str, list[float]] = {name: [] for name in MODEL_NAMES}
    compile_seconds: dict[str, list[float]] = {name: [] for name in MODEL_NAMES}
    for repetition in range(context.repeat):
        for name in MODEL_NAMES:
            context.say(f"series {repetition + 1}/{context.repeat}: one step of {name}")
            done = run_timed(
                worker_command("series-step", "--mirror", str(context.mirror), "--model", name),
                cwd=ROOT,
                env=env,
                log=context.workdir / "logs" / f"series-{name}-{repetition}",
            )
            result = last_json(done.stdout)
            per_step[name].append(result["step_seconds"] * 1000)
            compile_seconds[name].append(result["first_chunk_seconds"])
    rows = [
        Row(
            f"Series: one step of {name} vs one step of softmax",
            ours=per_step[name],
            reference=per_step["softmax"],
            unit="ms",
        )  # fmt: skip
        for name in MODEL_NAMES[1:]
    ]
    context.notes.append(
        f"Series: one step (average of {SERIES_STEPS} steps, test evaluations included; median of repetitions) takes "
        + ", ".join(f"{name} {statistics.median(per_step[name]):.2f} ms" for name in MODEL_NAMES)
        + "; compiling the loop and running its first steps: "
        + ", ".join(f"{name} {statistics.median(compile_seconds[name]):.1f} s" for name in MODEL_NAMES)
        + "."
    )
    return rows


def bench_memory(context: Context) -> list[Row]:
    project = prepare_stage_project(context)
    env = context.env(MLFLOW_TRACKING_URI=sqlite_uri(project / "mlflow.db"))
    for stage in ("train", "report"):
        context.say(f"stage {stage} (for its peak RSS)")
        done = run_timed(
            stage_command(project, stage),
            cwd=project,
            env=env,
            shell=True,
            log=context.workdir / "logs" / f"stage-{stage}",
        )
        context.samples["stage_rss_kib"][stage] = done.maxrss_kib
        context.samples["stage_seconds"][stage] = done.seconds
    # The largest batch the validator accepts: the whole training set. The batch order used to be
    # built for the whole run at once (iterations x batch indices: 8.95 GB at 10,000 steps); now
    # the train stage holds one bounded chunk of it, so the peak does not grow with the steps.
    large = project.parent / "large-batch"
    if not large.exists():
        shutil.copytree(project, large, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts"))
    params_path = large / "params.yaml"
    params_path.write_text(
        params_path.read_text()
        .replace("batch_size: 100", f"batch_size: {LARGE_BATCH}")
        .replace("iterations: 10000", f"iterations: {LARGE_BATCH_STEPS}")
    )
    context.say(f"stage train with batch size {LARGE_BATCH}, {LARGE_BATCH_STEPS} steps (for its peak RSS)")
    done = run_timed(
        stage_command(large, "train"),
        cwd=large,
        env=context.env(MLFLOW_TRACKING_URI=sqlite_uri(large / "mlflow.db")),
        shell=True,
        log=context.workdir / "logs" / "stage-train-large-batch",
    )
    rows = [
        Row(
            f"Peak RSS, stage train, batch {LARGE_BATCH:,} ({LARGE_BATCH_STEPS} steps)",
            ours=[done.maxrss_kib / 1024],
            unit="MiB",
            target=f"< {TARGETS['rss_mib']:.0f} MiB",
            verdict=below(TARGETS["rss_mib"]),
        )
    ]
    for stage in STAGES:
        mib = context.samples["stage_rss_kib"][stage] / 1024
        rows.append(
            Row(
                f"Peak RSS, stage {stage}",
                ours=[mib],
                unit="MiB",
                target=f"< {TARGETS['rss_mib']:.0f} MiB",
                verdict=below(TARGETS["rss_mib"]),
            )
        )
    processed = project / "data" / "processed"
    size = sum(path.stat().st_size for path in processed.rglob("*") if path.is_file())
    blocks = sum(path.stat().st_blocks * 512 for path in processed.rglob("*") if path.is_file())
    rows.append(
        Row(
            "data/processed on disk (du)",
            ours=[blocks / 1e6],
            unit="MB",
            target=f"< {TARGETS['processed_mb']:g} MB",
            verdict=below(TARGETS["processed_mb"]),
        )
    )
    context.notes.append(
        f"data/processed: {size:,} bytes in files ({size / MIB:.1f} MiB), {blocks / 1e6:.1f} MB allocated. "
        "Stage wall times of this run: "
        + ", ".join(f"{stage} {context.samples['stage_seconds'][stage]:.1f} s" for stage in STAGES)
        + "."
    )
    return rows


# --------------------------------------------------------------------------------------------
# Workers: run in their own processes by the sections above


def worker_tf_train(args: argparse.Namespace) -> dict:
    import numpy as np

    from benchmarks.numpy_reference import load_mirror
    from pipeline.params import load_params
    from pipeline.train import batch_order, train

    params = load_params(ROOT / "params.yaml")
    config = params.train
    data = load_mirror(args.mirror, params.preprocess.validation_size, verify=False)
    order = batch_order(len(data["train_images"]), config.batch_size, args.iterations or config.iterations, config.seed)

    import keras
    import tensorflow as tf

    import pipeline.model
    from pipeline.model import SgdTrainer, build_model  # imports TensorFlow (not timed)

    if args.percentiles == "off":
        # The loop then computes no percentiles: each call is a constant, traced in their place.
        pipeline.model.percentiles_graph = lambda variables: tf.fill(
            [len(pipeline.model.PERCENTILES)], tf.constant(float("nan"))
        )

    # As the train stage does.
    keras.config.disable_interactive_logging()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    model = build_model(config.seed)
    initial_weights, initial_biases = model.get_weights()

    timings: dict[str, float] = {}

    started = time.perf_counter()
    trainer = SgdTrainer(
        model,
        config.learning_rate,
        data["train_images"],
        data["train_labels"],
        data["test_images"],
        data["test_labels"],
    )
    timings["construct_seconds"] = time.perf_counter() - started

    trainer.trace()
    timings["trace_seconds"] = time.perf_counter() - started - timings["construct_seconds"]

    # Record how long the first chunk takes: XLA compiles the step loop on that call.
    original = trainer.train_steps

    def first_call(*call_args):
        call_started = time.perf_counter()
        result = original(*call_args)
        timings.setdefault("first_chunk_seconds", time.perf_counter() - call_started)
        return result

    trainer.train_steps = first_call
    history = train(trainer, order, config.eval_interval)
    seconds = time.perf_counter() - started

    if args.weights_out:
        np.savez(args.weights_out, weights=initial_weights, biases=initial_biases)
    return {
        "seconds": seconds,
        **timings,
        "test_accuracy": float(history.test_accuracy[-1]) if history.test_accuracy else float("nan"),
        "test_cross_entropy": float(history.test_cross_entropy[-1]) if history.test_cross_entropy else float("nan"),
    }


def worker_numpy_train(args: argparse.Namespace) -> dict:
    import numpy as np

    from benchmarks.numpy_reference import load_mirror, train_numpy, truncated_normal
    from pipeline.params import load_params
    from pipeline.train import batch_order

    params = load_params(ROOT / "params.yaml")
    config = params.train
    data = load_mirror(args.mirror, params.preprocess.validation_size, verify=False)
    order = batch_order(len(data["train_images"]), config.batch_size, args.iterations or config.iterations, config.seed)
    if args.weights_in and Path(args.weights_in).exists():
        with np.load(args.weights_in) as initial:
            weights, biases = initial["weights"], initial["biases"]
    else:
        weights, biases = truncated_normal((784, 10), 0.1, config.seed), np.zeros(10, np.float32)

    started = time.perf_counter()
    result = train_numpy(
        data["train_images"],
        data["train_labels"],
        data["test_images"],
        data["test_labels"],
        weights,
        biases,
        order,
        config.learning_rate,
        config.eval_interval,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "test_accuracy": float(result["test_accuracy"][-1]) if len(result["test_accuracy"]) else float("nan"),
        "test_cross_entropy": float(result["test_cross_entropy"][-1])
        if len(result["test_cross_entropy"])
        else float("nan"),
    }


def worker_series_step(args: argparse.Namespace) -> dict:
    """Seconds per training step of one model of the series, after compilation, as the train stage runs it."""
    from benchmarks.numpy_reference import load_mirror
    from pipeline.params import load_params
    from pipeline.train import batch_order

    params = load_params(ROOT / "params.yaml")
    config = params.train
    data = load_mirror(args.mirror, params.preprocess.validation_size, verify=False)
    order = batch_order(len(data["train_images"]), config.batch_size, 2 * SERIES_STEPS, config.seed)

    import keras
    import tensorflow as tf

    from pipeline.model import SERIES, SgdTrainer, build_model

    keras.config.disable_interactive_logging()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    series = SERIES[args.model]
    trainer = SgdTrainer(build_model(config.seed, args.model), series.optimizer(config.learning_rate),
                         data["train_images"], data["train_labels"], data["test_images"], data["test_labels"],
                         series.test_batch_size, series.jit_compile)  # fmt: skip
    started = time.perf_counter()
    trainer.train_steps(order[:SERIES_STEPS], 1, config.eval_interval)
    first_chunk_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train_steps(order[SERIES_STEPS:], SERIES_STEPS + 1, config.eval_interval)
    return {
        "step_seconds": (time.perf_counter() - started) / SERIES_STEPS,
        "first_chunk_seconds": first_chunk_seconds,
    }


def worker_train_stage(args: argparse.Namespace) -> None:
    """The train stage itself, optionally without its per-step MLflow logging."""
    import pipeline.train as train_module
    from pipeline.cli import run
    from pipeline.tracking import record

    if args.step_logging == "off":
        # Chunks still reach the run; it just logs nothing. Everything else is the real stage.
        record.TrainingRun.log_history = lambda self, series, started, ended: None
    sys.argv = ["pipeline.train", *args.rest]
    run(train_module.main)


def worker_log_series(args: argparse.Namespace) -> dict:
    """TrainingRun.log_history for the seed configuration's 20,200 values, in 1,000-step chunks as train logs them."""
    from dataclasses import replace

    import numpy as np

    from pipeline.params import load_params
    from pipeline.tracking import record, store
    from pipeline.train import PRINT_INTERVAL

    config = load_params(ROOT / "params.yaml").train
    tracking = load_params(ROOT / "params.yaml").tracking
    uri, location = store.resolve(replace(tracking, experiment="benchmark-log-series", uri=args.uri))
    rng = np.random.default_rng(0)
    accuracy = rng.random(config.iterations, dtype=np.float32)
    cross_entropy = rng.random(config.iterations, dtype=np.float32) * 100
    values = 0
    with record.training_run(uri, location, "benchmark-log-series", "log-series", {}) as run:
        started = time.perf_counter()
        for start in range(0, config.iterations, PRINT_INTERVAL):
            end = min(start + PRINT_INTERVAL, config.iterations)
            steps = range(start + 1, end + 1)
            series = {"train_accuracy": (steps, accuracy[start:end]),
                      "train_cross_entropy": (steps, cross_entropy[start:end])}  # fmt: skip
            test_steps = [step for step in steps if step % config.eval_interval == 0]
            if test_steps:
                series["test_accuracy"] = (test_steps, [0.9] * len(test_steps))
                series["test_cross_entropy"] = (test_steps, [2700.0] * len(test_steps))
            run.log_history(series, time.time(), time.time())
            values += sum(len(steps_) for steps_, _ in series.values())
        run.wait()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "values": values}


def run_worker(args: argparse.Namespace) -> None:
    workers = {
        "tf-train": worker_tf_train,
        "numpy-train": worker_numpy_train,
        "train-stage": worker_train_stage,
        "log-series": worker_log_series,
        "series-step": worker_series_step,
    }
    result = workers[args.worker](args)
    if result is not None:
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    parser.add_argument("--quick", action="store_true", help="one repetition of each measurement")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default all)",
    )
    parser.add_argument("--iterations", type=int, help="steps of the train-loop section (default train.iterations)")
    parser.add_argument(
        "--mirror",
        type=Path,
        help="directory of the four MNIST files (default $MNIST_MIRROR, else ../shared/mnist beside the project)",
    )
    parser.add_argument(
        "--reference-blas-threads",
        type=int,
        default=1,
        help="BLAS threads of the NumPy reference (default 1; 0 leaves the library's default)",
    )
    parser.add_argument("--workdir", type=Path, help="where the copies and logs go (default a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--json", type=Path, help="also write every sample and median to this JSON file")
    # Internal: the benchmark runs its measured pieces in fresh processes of this same module.
    parser.add_argument(
        "--worker",
        choices=("tf-train", "numpy-train", "train-stage", "log-series", "series-step"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--percentiles", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--weights-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights-in", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step-logging", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.rest and not args.worker:
        parser.error(f"unexpected arguments: {' '.join(args.rest)}")
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.mirror is None:
        args.mirror = (
            Path(os.environ["MNIST_MIRROR"]) if os.environ.get("MNIST_MIRROR") else ROOT.parent / "shared" / "mnist"
        )
    args.mirror = args.mirror.resolve()
    return args


def reexec_in_project_venv() -> None:
    """`python benchmarks/run.py` with a python outside any virtualenv: switch to the project's."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if sys.prefix == sys.base_prefix and venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        reexec_in_project_venv()
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if not all((args.mirror / f"{name}.gz").is_file() or (args.mirror / name).is_file() for name in FILES):
        print(
            f"error: {args.mirror} does not hold the four MNIST files; set MNIST_MIRROR or pass --mirror.",
            file=sys.stderr,
        )
        return 2

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mnist-benchmark-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    context = Context(
        workdir=workdir,
        mirror=args.mirror,
        repeat=args.repeat,
        iterations=args.iterations,
        reference_threads=args.reference_blas_threads,
    )
    load_before = load_average()
    started = time.perf_counter()
    rows: list[Row] = []
    succeeded = False
    try:
        benches = {
            "train-loop": bench_train_loop,
            "percentiles": bench_percentiles,
            "tracking": bench_tracking,
            "pipeline": bench_pipeline,
            "series": bench_series,
            "memory": bench_memory,
        }
        for section in SECTIONS:
            if section in args.sections:
                rows += benches[section](context)
        succeeded = True
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"(logs in {workdir / 'logs'})", file=sys.stderr)
        return 1
    finally:
        # Keep everything after a failure (or when asked); on success only the table matters.
        if succeeded and not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(markdown_table(rows))
    print()
    threads = args.reference_blas_threads or "default"
    print(
        f"{args.repeat} repetition(s); load average before {load_before}, after {load_average()}; "
        f"{os.cpu_count()} CPUs; NumPy reference BLAS threads: {threads}; {time.perf_counter() - started:.0f} s in all."
    )
    for note in context.notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "repeat": args.repeat,
                    "rows": [
                        {
                            "measure": row.measure,
                            "unit": row.unit,
                            "ours": row.ours,
                            "reference": row.reference,
                            "medians": row.medians(),
                            "target": row.target,
                            "cells": row.cells(),
                        }
                        for row in rows
                    ],
                    "samples": context.samples,
                    "notes": context.notes,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
