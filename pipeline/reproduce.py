"""``mnist-reproduce``: did ``dvc repro`` reproduce a commit's ``dvc.lock`` and metrics (``--rev``, default HEAD)?
*identical*, *within tolerance on a different CPU* (its kernels round differently in the last bits), or not
reproduced (exit 1; 2 on bad input)."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.check import dvc_json, environment_at, git
from pipeline.cli import PipelineError, run

EXIT_REPRODUCED, EXIT_NOT_REPRODUCED, EXIT_BAD_INPUT = 0, 1, 2
EXACT_STAGES = ("fetch", "preprocess")  # They decode, slice and one-hot integers: identical on any CPU.
PREDICTIONS = "metrics/confusion.csv"  # One actual,predicted row per test image.
# Measured for the seed across XLA's SSE4.2 to AVX-512 code and two CPUs: cross-entropies moved by at most 2.1e-7
# relative, no test prediction changed. The tolerances allow 50 times that, and ten test images (0.001) for the rest.
CROSS_ENTROPY_RELATIVE, OTHER_ABSOLUTE = 1e-5, 1e-3


def beyond(metric: str, old: float, new: float) -> float:
    """How far the difference goes past the metric's tolerance, as a multiple of it (≤ 1 is within)."""
    allowed = CROSS_ENTROPY_RELATIVE * abs(old) if "cross_entropy" in metric else OTHER_ABSOLUTE
    return abs(new - old) / allowed if allowed else 0.0 if new == old else math.inf


def lock_differences(committed: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What in dvc.lock must match: all but trained outputs and the deps on them, which the metrics judge."""
    stages = committed.get("stages", {})
    trained = {out["path"] for name, stage in stages.items() if name not in EXACT_STAGES for out in stage["outs"]}

    def kept(lock: dict[str, Any]) -> dict[tuple[str, str], Any]:
        return {
            (name, key): [entry for entry in value if entry.get("path") not in trained]
            if key in ("deps", "outs")
            else value
            for name, stage in lock.get("stages", {}).items()
            for key, value in stage.items()
        }

    old, new = kept(committed), kept(current)
    return [
        f"{name}'s {key} differ"
        for name, key in dict.fromkeys([*old, *new])
        if old.get((name, key)) != new.get((name, key))
    ]


def changed_predictions(committed: str, current: str) -> tuple[int, int]:
    """(test images predicted differently, test images) between two confusion CSVs."""
    old, new = committed.strip().splitlines()[1:], current.strip().splitlines()[1:]
    return sum(a != b for a, b in itertools.zip_longest(old, new)), max(len(old), len(new))


def verdict(lock_problems: list[str], diff: dict[str, Any], predictions: tuple[int, int] | None) -> tuple[int, str]:
    """The exit code and the one-paragraph verdict, from ``dvc metrics diff --json --all``'s output."""
    pairs = {name: (v.get("old"), v.get("new")) for names in diff.values() for name, v in names.items()}
    environment = {name: pairs.pop(name) for name in list(pairs) if name.startswith("environment.")}
    old_cpu, new_cpu = environment.pop("environment.cpu", (None, None))
    changed = [f"{name} {old} → {new}" for name, (old, new) in environment.items() if old != new]
    changed += [f"{name} is only on one side" for name, (old, new) in pairs.items() if (old is None) != (new is None)]
    if reasons := lock_problems + changed:
        return EXIT_NOT_REPRODUCED, (
            f"not a reproduction of the same inputs: {'; '.join(reasons)}. Commit the change and its dvc.lock, "
            "or check out the committed files and the locked environment (uv sync --locked), then dvc repro."
        )
    excess = {name: beyond(name, *pair) for name, pair in pairs.items() if type(pair[0]) in (int, float)}
    worst = max(excess, key=excess.__getitem__, default=None)
    where = f"committed on {old_cpu or 'an unrecorded CPU'}, reproduced on {new_cpu}"
    counted = "" if predictions is None else f"; {predictions[0]:,} of {predictions[1]:,} test predictions changed"
    if worst is None or excess[worst] == 0:
        place = "" if old_cpu == new_cpu else f" on a different CPU ({where})"
        return EXIT_REPRODUCED, f"identical metrics{place}: every metric is the committed value{counted}."
    (old, new), relative = pairs[worst], "cross_entropy" in worst
    tolerance = f"relative {CROSS_ENTROPY_RELATIVE:g}" if relative else f"{OTHER_ABSOLUTE:g}"
    largest = f"largest difference {abs(new - old):.3g} in {worst} ({old!r} → {new!r}; tolerance {tolerance}){counted}"
    failing = sorted(name for name, value in excess.items() if value > 1)
    if old_cpu == new_cpu:
        return EXIT_NOT_REPRODUCED, (
            f"not reproduced on the same CPU ({new_cpu}), where the results must be byte-identical: {largest}. "
            "Something in the run is not deterministic."
        )
    if not failing:
        return EXIT_REPRODUCED, f"within tolerance on a different CPU ({where}): {largest}."
    return EXIT_NOT_REPRODUCED, (
        f"beyond tolerance on a different CPU ({where}): {largest}; {len(failing)} metric{'s'[: len(failing) - 1]} "
        f"beyond tolerance: {', '.join(failing)}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the commit whose results to reproduce (default: HEAD)")
    rev = parser.parse_args(argv).rev
    if (commit := git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")) is None:
        raise PipelineError(f"unknown git revision {rev!r}.")
    if not Path("dvc.lock").is_file():
        raise PipelineError("dvc.lock does not exist here; run from the project root after dvc repro.")
    # Anything else the run changed or left behind (an output git should ignore, a source file) is no reproduction.
    if stray := git("status", "--porcelain", "--untracked-files=all", "--", ".", ":!dvc.lock", ":!metrics"):
        found = ", ".join(line[3:] for line in stray.splitlines()[:5])
        print(f"not reproduced: files besides dvc.lock and metrics/ changed or appeared: {found}.")
        return EXIT_NOT_REPRODUCED
    if git("diff", "--quiet", commit, "--", "dvc.lock", "metrics") is not None:
        print(f"identical: dvc.lock and metrics/ are byte for byte those of {rev}.")
        return EXIT_REPRODUCED
    committed_lock = yaml.safe_load(git("show", f"{commit}:dvc.lock") or "") or {}
    current_lock = yaml.safe_load(Path("dvc.lock").read_text())
    diff = dvc_json(f"the metrics at {rev}", "metrics", "diff", "--all", commit)[0]
    committed, current = git("show", f"{commit}:{PREDICTIONS}"), Path(PREDICTIONS)
    predictions = changed_predictions(committed, current.read_text()) if committed and current.is_file() else None
    # train.json's environment, a list the diff leaves out, joins it.
    was, now = environment_at(commit), environment_at(None)
    diff["environment"] = {f"environment.{key}": {"old": was.get(key), "new": now.get(key)} for key in {**was, **now}}
    code, message = verdict(lock_differences(committed_lock, current_lock), diff, predictions)
    print(message)
    return code


def cli() -> None:
    run(lambda: sys.exit(main(sys.argv[1:])), error_exit_code=EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
