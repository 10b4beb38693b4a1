"""The asha rows: sweeps/series-asha.yaml on the real data as a plain grid and with ASHA, each in a fresh copy of the
project (no shared run cache) and SQLite store; a trial's steps are the last of its run's history/train_accuracy.
``python -m benchmarks.asha`` is ``python -m benchmarks.run --only asha``."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import yaml

DEFINITION = Path(__file__).resolve().parents[1] / "sweeps" / "series-asha.yaml"
STOPPED = re.compile(r"at step (\d+)")


def prepared(bench, kind: str):
    """A copy of the project on the real data, its data prepared, holding the definition as ``sweep.yaml``."""
    definition = yaml.safe_load(DEFINITION.read_text())
    if kind == "grid":
        del definition["scheduler"]
    project = bench.project(f"asha-{kind}")
    (project.root / "sweep.yaml").write_text(yaml.safe_dump(definition, sort_keys=False))
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Prepared data and the sweep")
    return project


def swept(bench, project, kind: str) -> dict:
    """Run the sweep; its wall time, ranking table and, per trial, the steps trained and the outcome."""
    from mlflow import MlflowClient

    from pipeline.params import tracking_settings
    from pipeline.tracking import record, store

    command = [str(Path(sys.executable).parent / "mnist-sweep"), "sweep.yaml"]
    seconds, _, stdout = bench.run(f"series-asha {kind}", command, cwd=project.root, env=project.env)
    client = MlflowClient(store.tracking_uri("", project.root))
    experiment = client.get_experiment_by_name(tracking_settings(project.env).experiment)
    trials = []
    for run in client.search_runs([experiment.experiment_id], "tags.`sweep.name` = 'series-asha'"):
        if "sweep.trial" not in run.data.tags:  # the sweep's own run
            continue
        history = client.get_metric_history(run.info.run_id, record.HISTORY_PREFIX + "train_accuracy")
        stop = STOPPED.search(run.data.tags.get("sweep.stopped_early", ""))
        trial = f"{run.data.params['train.model']}, batch {run.data.params['train.batch_size']}"
        accuracy = run.data.metrics.get("test_accuracy")  # the final score, which only a finished trial has
        steps = max((point.step for point in history), default=0)
        trials.append({"trial": trial, "steps": steps, "stop": stop and int(stop[1]), "accuracy": accuracy})
    table = stdout.split(" ranked by ", 1)[-1].split("\n", 1)[-1].split("\n\n")[0]
    return {"seconds": seconds, "table": table, "trials": trials}


def rows(bench) -> list:
    from benchmarks.run import Row

    results = {}
    for kind in ("grid", "asha"):
        print(f"[{time.strftime('%H:%M:%S')}] series-asha: {kind}", file=sys.stderr, flush=True)
        results[kind] = swept(bench, prepared(bench, kind), kind)
    grid, asha = results["grid"], results["asha"]
    steps = Row("series-asha: steps trained, ASHA vs the same trials run to the end", unit="steps", limit=0.6)
    steps.ours, steps.reference = [sum(t["steps"] for t in asha["trials"])], [sum(t["steps"] for t in grid["trials"])]
    wall = Row("series-asha: wall time, ASHA vs the grid", [asha["seconds"]], [grid["seconds"]])
    best = {}
    for kind, result in results.items():
        best[kind] = max((trial for trial in result["trials"] if trial["accuracy"]), key=lambda t: t["accuracy"])
    gap = 100 * (best["grid"]["accuracy"] - best["asha"]["accuracy"])
    bench.notes.append(
        f"series-asha best trial: grid {best['grid']['trial']} ({best['grid']['accuracy']:.4f}), ASHA "
        f"{best['asha']['trial']} ({best['asha']['accuracy']:.4f}): {gap:.2f} points apart (≤ 0.1 "
        + ("✅)." if gap <= 0.1 else "❌).")
    )
    stopped = [t for t in asha["trials"] if t["stop"]]
    at = ", ".join(f"{trial['stop']:,}" for trial in stopped)
    past = ", ".join(f"{trial['steps'] - trial['stop']:+,}" for trial in stopped)
    bench.notes.append(
        f"series-asha: {len(stopped)} of {len(asha['trials'])} trials stopped, at steps {at}; the steps their runs "
        f"logged after the result that stopped them: {past}."
    )
    bench.notes.append(f"series-asha ranking with ASHA:\n\n{asha['table']}\n")
    return [steps, wall]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", "asha", *sys.argv[1:]]))
