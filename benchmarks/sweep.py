"""The sweep row: a 3 × 2 grid of short trials through ``mnist-sweep`` (Ray Tune, 2 at a time) or DVC's queue, each
side in a fresh copy of the tiny project (neither restores the other's trainings from DVC's run cache), timed until
every experiment has finished. ``python -m benchmarks.sweep`` is ``python -m benchmarks.run --only sweep``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

LEARNING_RATES = (0.001, 0.003, 0.01)
BATCH_SIZES = (10, 20)
SWEEP = {
    "name": "bench",
    "search": "grid",
    "max_concurrent": 2,
    "parameters": {
        "train.learning_rate": {"values": list(LEARNING_RATES)},
        "train.batch_size": {"values": list(BATCH_SIZES)},
    },
}


def prepared(directory: Path):
    from pipeline_project import make_project

    project = make_project(directory)
    (project.root / "sweep.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Prepared data and the sweep")
    return project


def time_queue(project) -> float:
    started = time.perf_counter()
    rates, sizes = ",".join(map(str, LEARNING_RATES)), ",".join(map(str, BATCH_SIZES))
    project.dvc("exp", "run", "--queue", "-S", f"train.learning_rate={rates}", "-S", f"train.batch_size={sizes}")
    status = project.run_queue(jobs=2, timeout=1800)
    elapsed = time.perf_counter() - started
    if status.count("Success") != len(LEARNING_RATES) * len(BATCH_SIZES):
        raise RuntimeError(f"the DVC queue did not run every experiment:\n{status}")
    return elapsed


def time_sweep(project) -> float:
    started = time.perf_counter()
    done = project.run(str(Path(sys.executable).parent / "mnist-sweep"), "sweep.yaml", timeout=1800)
    elapsed = time.perf_counter() - started
    if "Sweep bench: 6 trials" not in done.stdout or "failed" in done.stdout.split("ranked by")[-1]:
        raise RuntimeError(f"the sweep did not run every trial:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", "sweep", *sys.argv[1:]]))
