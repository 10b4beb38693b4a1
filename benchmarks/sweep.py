"""Benchmark sweep throughput: 6 short trials through ``mnist-sweep`` (Ray Tune, local, 2 at a time)
against the same 6 through DVC's own queue (``dvc exp run --queue`` + ``dvc queue start -j 2``).

Run from the project root::

    uv run python -m benchmarks.sweep            # one repetition of each, about 5 minutes on 2 cores
    uv run python -m benchmarks.sweep --repeat 2

Each side gets its own fresh copy of the project (tests/pipeline_project.py: tiny synthetic MNIST,
50 training steps, data prepared and committed beforehand, its own DVC cache and SQLite MLflow
store), so neither can restore the other's trainings from DVC's run cache. The grid is
train.learning_rate × train.batch_size = 3 × 2. Measured: wall time from the command's start until
every experiment has finished (the queue's ``dvc queue status`` is polled every second). Ray's own
start-up, a fresh process running ``ray.init()`` and ``ray.shutdown()``, is measured separately; it
is part of the sweep's wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from pipeline_project import VENV_BIN, Project, make_project  # noqa: E402

LEARNING_RATES = (0.001, 0.003, 0.01)
BATCH_SIZES = (10, 20)
TARGET = 1.25
SWEEP = {
    "name": "bench",
    "search": "grid",
    "max_concurrent": 2,
    "parameters": {
        "train.learning_rate": {"values": list(LEARNING_RATES)},
        "train.batch_size": {"values": list(BATCH_SIZES)},
    },
}


def prepared(directory: Path) -> Project:
    project = make_project(directory)
    (project.root / "sweep.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Prepared data and the sweep")
    return project


def time_queue(project: Project) -> float:
    started = time.perf_counter()
    project.dvc(
        "exp", "run", "--queue",
        "-S", "train.learning_rate=" + ",".join(map(str, LEARNING_RATES)),
        "-S", "train.batch_size=" + ",".join(map(str, BATCH_SIZES)),
    )  # fmt: skip
    project.start_queue(jobs=2)
    # Polled here rather than with Project.wait_for_queue, whose 2-minute limit per `dvc queue
    # status` a busy machine can exceed.
    while True:
        status = project.dvc("queue", "status", timeout=1800).stdout
        if not any(word in ("Queued", "Running") for word in status.split()):
            break
        time.sleep(1)
    elapsed = time.perf_counter() - started
    if status.count("Success") != len(LEARNING_RATES) * len(BATCH_SIZES):
        raise SystemExit(f"the DVC queue did not run every experiment:\n{status}")
    return elapsed


def time_sweep(project: Project) -> float:
    started = time.perf_counter()
    done = project.run(str(VENV_BIN / "mnist-sweep"), "sweep.yaml", timeout=1800)
    elapsed = time.perf_counter() - started
    if "trial 6/6" not in done.stdout or "failed" in done.stdout.split("ranked by")[-1]:
        raise SystemExit(f"the sweep did not run every trial:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def time_ray_start() -> float:
    script = (
        "import time; started = time.perf_counter(); import ray\n"
        "ray.init(include_dashboard=False, configure_logging=False); ray.shutdown()\n"
        "print(time.perf_counter() - started)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"Ray did not start:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    queue, sweep, ray_start = [], [], []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as workdir:
        for repetition in range(args.repeat):
            base = Path(workdir) / str(repetition)
            projects = {"queue": prepared(base / "queue"), "sweep": prepared(base / "sweep")}
            # The order alternates, so that a change in the machine's load hits both sides alike.
            for side in ("queue", "sweep") if repetition % 2 == 0 else ("sweep", "queue"):
                if side == "queue":
                    queue.append(time_queue(projects["queue"]))
                    projects["queue"].stop_queue()
                else:
                    sweep.append(time_sweep(projects["sweep"]))
                print(f"repetition {repetition + 1}: {side} done", flush=True)
            ray_start.append(time_ray_start())
    ratio = statistics.median(sweep) / statistics.median(queue)
    verdict = "✅" if ratio <= TARGET else "❌"
    print()
    print("| measure | mnist-sweep (Ray) | dvc queue -j 2 | ratio | target |")
    print("|---|--:|--:|--:|---|")
    print(
        f"| 6 short trials, 2 at a time (median of {args.repeat}) | {statistics.median(sweep):.1f} s | "
        f"{statistics.median(queue):.1f} s | {ratio:.2f}× | ≤ {TARGET}× {verdict} |"
    )
    print(f"| Ray's start-up alone (ray.init + shutdown, fresh process) | {statistics.median(ray_start):.1f} s | | | |")
    print(f"\nload average: {' '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(f"samples: sweep {[round(x, 1) for x in sweep]}, queue {[round(x, 1) for x in queue]}")


if __name__ == "__main__":
    main()
