"""Reproduction check: did ``dvc repro`` reproduce the committed results (``mnist-reproduce``)?

Compares the working tree's ``dvc.lock`` and metrics with a commit's (HEAD by default) and says which
case it found: *identical* (byte for byte, as on the CPU that made them), *within tolerance on a
different CPU*, or not reproduced. Exits 0, 1 (not reproduced) or 2 (bad input).

On another CPU, TensorFlow's kernels round differently in the last bits, so the trained model's bytes
differ; the data stages do no floating-point work and must stay byte-identical, and every metric
must agree within :data:`TOLERANCES`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli import PipelineError, run

EXIT_REPRODUCED, EXIT_NOT_REPRODUCED, EXIT_BAD_INPUT = 0, 1, 2
# Stages whose outputs must be byte-identical on every CPU: they decode, slice and one-hot integers.
EXACT_STAGES = ("fetch", "preprocess")
LOCK_FILE, METRICS_FOLDER = "dvc.lock", "metrics"
# The train stage records the CPU under this key of its metrics file's environment (pipeline.tracking.tags).
CPU_KEY = "environment.cpu"
# Test predictions, one row per test image (report's --confusion output), to count changed predictions.
PREDICTIONS_FILE = "metrics/confusion.csv"
# Largest allowed difference per kind of metric: (relative, absolute). Measured on the seed
# configuration (10,000 steps) across XLA's instruction sets SSE4.2, AVX, AVX2 and AVX-512 and
# the CPU the committed results came from: cross-entropies differed by at most 2.1e-7 relative
# (about two float32 roundings) and no test prediction changed, so no count-based metric moved.
# The tolerances leave 50 times that rounding for cross-entropies, and for metrics counted over
# test images (accuracies, precision, recall, F1) 0.001: ten of the 10,000 test images for the
# test accuracy, about one image of a class for a per-class recall.
TOLERANCES = {"cross_entropy": (1e-5, 0.0), "other": (0.0, 1e-3)}


def tolerance(metric: str) -> tuple[float, float]:
    return TOLERANCES["cross_entropy" if "cross_entropy" in metric else "other"]


def beyond(metric: str, old: float, new: float) -> float:
    """How far the difference goes past the metric's tolerance, as a multiple of it (≤ 1 is within)."""
    relative, absolute = tolerance(metric)
    allowed = max(relative * abs(old), absolute)
    difference = abs(new - old)
    return difference / allowed if allowed else (0.0 if difference == 0 else float("inf"))


def lock_differences(committed: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What in dvc.lock may not differ between the two: every stage's command, params and deps, and
    the exact stages' outputs. Outputs of the other stages, and deps on them, follow from the trained
    weights; the metrics checked below say whether they agree."""
    old_stages, new_stages = committed.get("stages", {}), current.get("stages", {})
    trained = {out["path"] for name, stage in old_stages.items() if name not in EXACT_STAGES for out in stage["outs"]}

    def fixed(stage: dict[str, Any], name: str) -> dict[str, Any]:
        kept = {key: stage.get(key) for key in ("cmd", "params")}
        kept["deps"] = [dep for dep in stage.get("deps", []) if dep.get("path") not in trained]
        if name in EXACT_STAGES:
            kept["outs"] = stage.get("outs")
        return kept

    problems = []
    for name in {**old_stages, **new_stages}:
        if name not in old_stages or name not in new_stages:
            problems.append(f"stage {name} is {'new' if name not in old_stages else 'gone'}")
            continue
        old, new = fixed(old_stages[name], name), fixed(new_stages[name], name)
        problems += [f"{name}'s {key} differ" for key in old if old[key] != new[key]]
    return problems


def changed_predictions(committed: str, current: str) -> tuple[int, int]:
    """(test images predicted differently, test images) between two confusion CSVs of actual,predicted rows."""
    old, new = (list(csv.reader(io.StringIO(text))) for text in (committed, current))
    if len(old) != len(new):
        return max(len(old), len(new)) - 1, max(len(old), len(new)) - 1
    return sum(a != b for a, b in zip(old[1:], new[1:])), len(old) - 1


def verdict(
    lock_problems: list[str], metrics: dict[str, dict[str, Any]], predictions: tuple[int, int] | None
) -> tuple[int, str]:
    """The exit code and the one-paragraph verdict, from the differences found."""
    flat = {f"{path} {name}": values for path, entries in metrics.items() for name, values in entries.items()}
    cpu: dict[str, Any] = next((values for key, values in flat.items() if key.endswith(f" {CPU_KEY}")), {})
    same_cpu = cpu.get("old") == cpu.get("new")
    environment = [
        f"{key.split()[-1]} {values.get('old')} → {values.get('new')}"
        for key, values in flat.items()
        if " environment." in key and key.split()[-1] != CPU_KEY and values.get("old") != values.get("new")
    ]
    numbers = {
        key: (values.get("old"), values.get("new"))
        for key, values in flat.items()
        if isinstance(values.get("old"), (int, float)) or isinstance(values.get("new"), (int, float))
    }
    missing = [key for key, (old, new) in numbers.items() if old is None or new is None]
    excess = {key: beyond(key.split()[-1], old, new) for key, (old, new) in numbers.items() if key not in missing}
    worst = max(excess, key=lambda key: excess[key], default=None)
    changed = "" if predictions is None else f"; {predictions[0]:,} of {predictions[1]:,} test predictions changed"
    if lock_problems or environment or missing:
        reasons = [*lock_problems, *environment, *(f"{key} is only on one side" for key in missing)]
        return EXIT_NOT_REPRODUCED, (
            f"not a reproduction of the same inputs: {'; '.join(reasons)}. Commit the change and its dvc.lock, "
            "or check out the committed files and the locked environment (uv sync --locked), then dvc repro."
        )
    where = f"committed on {cpu.get('old') or 'an unrecorded CPU'}, reproduced on {cpu.get('new')}"
    if worst is None or excess[worst] == 0:
        place = "" if same_cpu else f" on a different CPU ({where})"
        return EXIT_REPRODUCED, f"identical metrics{place}: every metric is the committed value{changed}."
    old, new = numbers[worst]
    relative, absolute = tolerance(worst.split()[-1])
    largest = (
        f"largest difference {abs(new - old):.3g} in {worst} ({old!r} → {new!r}; "
        f"tolerance {'relative ' + format(relative, 'g') if relative else format(absolute, 'g')})"
    )
    if same_cpu:
        return EXIT_NOT_REPRODUCED, (
            f"not reproduced on the same CPU ({cpu.get('new')}), where the results must be byte-identical: "
            f"{largest}{changed}. Something in the run is not deterministic."
        )
    if excess[worst] <= 1:
        return EXIT_REPRODUCED, f"within tolerance on a different CPU ({where}): {largest}{changed}."
    failing = sorted(key for key, value in excess.items() if value > 1)
    return EXIT_NOT_REPRODUCED, (
        f"beyond tolerance on a different CPU ({where}): {largest}{changed}; "
        f"{len(failing)} metric{'s' if len(failing) > 1 else ''} beyond tolerance: {', '.join(failing)}."
    )


def git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PipelineError("git is not installed or not on PATH.") from None


def committed_text(rev: str, path: str) -> str:
    shown = git("show", f"{rev}:{path}")
    if shown.returncode != 0:
        raise PipelineError(f"cannot read {path} at {rev}: {shown.stderr.strip()}")
    return shown.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-reproduce", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the commit whose results to reproduce (default: HEAD)")
    args = parser.parse_args(argv)
    if git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{args.rev}^{{commit}}").returncode != 0:
        raise PipelineError(f"unknown git revision {args.rev!r}.")
    if not Path(LOCK_FILE).is_file():
        raise PipelineError(f"{LOCK_FILE} does not exist here; run from the project root after dvc repro.")

    # Anything else that the run changed (an output git should ignore, a source file) is no reproduction.
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".", f":!{LOCK_FILE}", f":!{METRICS_FOLDER}")
    if status.stdout.strip():
        files = ", ".join(line[3:] for line in status.stdout.splitlines()[:5])
        print(f"not reproduced: files besides {LOCK_FILE} and {METRICS_FOLDER}/ changed or appeared: {files}.")
        return EXIT_NOT_REPRODUCED
    if git("diff", "--quiet", args.rev, "--", LOCK_FILE, METRICS_FOLDER).returncode == 0:
        print(f"identical: {LOCK_FILE} and {METRICS_FOLDER}/ are byte for byte those of {args.rev}.")
        return EXIT_REPRODUCED

    committed_lock = yaml.safe_load(committed_text(args.rev, LOCK_FILE)) or {}
    current_lock = yaml.safe_load(Path(LOCK_FILE).read_text()) or {}
    diff = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", "--json", "--all", "--", args.rev],
        capture_output=True,
        text=True,
        check=False,
    )
    if diff.returncode != 0:
        raise PipelineError(f"dvc metrics diff failed: {diff.stderr.strip()}")
    metrics = json.loads(diff.stdout or "{}")
    predictions = None
    if Path(PREDICTIONS_FILE).is_file():
        committed_predictions = committed_text(args.rev, PREDICTIONS_FILE)
        predictions = changed_predictions(committed_predictions, Path(PREDICTIONS_FILE).read_text())
    code, message = verdict(lock_differences(committed_lock, current_lock), metrics, predictions)
    print(message)
    return code


def cli() -> None:
    """Entry point of ``mnist-reproduce`` and ``python -m pipeline.reproduce``."""
    run(lambda: sys.exit(main(sys.argv[1:])), error_exit_code=EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
