"""mnist-reproduce: identical on the same CPU, within tolerance on another, not reproduced beyond it.
``verdict`` gets what ``dvc metrics diff --json --all`` gives, the environment joined; the end-to-end test meets the
cases as CI does."""

from __future__ import annotations

import json

import pytest

from pipeline import reproduce
from pipeline.reproduce import EXIT_NOT_REPRODUCED, EXIT_REPRODUCED, verdict

CPU_A, CPU_B = "CPU A (x86_64: avx2)", "CPU B (x86_64: avx512f)"
ROUNDED = {"test_cross_entropy": (0.2695878173828125, 0.269587841796875)}  # As on another CPU.
ACCURACY = {"test_accuracy": (0.92, 0.92)}
BEYOND = {"test_cross_entropy": (0.2695, 0.2696), "test_accuracy": (0.92, 0.93)}
SAME_CPU = {"environment.cpu": (CPU_A, CPU_A), "environment.keras": ("3.15", "3.15")}
OTHER_CPU = SAME_CPU | {"environment.cpu": (CPU_A, CPU_B)}
KERAS = {"environment.keras": ("3.15", "3.16")}
WITHIN = ["within tolerance on a different CPU (committed on CPU A", "0 of 10,000 test predictions changed"]


@pytest.mark.parametrize(
    ("values", "lock", "code", "phrases"),
    [
        (ROUNDED | ACCURACY | OTHER_CPU, [], EXIT_REPRODUCED, [*WITHIN, "test_cross_entropy"]),
        (ROUNDED | SAME_CPU, [], EXIT_NOT_REPRODUCED, ["not reproduced on the same CPU"]),
        (BEYOND | OTHER_CPU, [], EXIT_NOT_REPRODUCED, ["beyond tolerance on a different CPU", "2 metrics beyond"]),
        (ACCURACY | OTHER_CPU, [], EXIT_REPRODUCED, ["identical metrics on a different CPU (committed on CPU A"]),
        # Changed inputs or environment are no reproduction, whatever the metrics.
        (ACCURACY | OTHER_CPU | KERAS, ["train's params differ"], EXIT_NOT_REPRODUCED, ["params", "keras 3.15 → 3.16"]),
        (SAME_CPU | {"test_accuracy": (0.92, None)}, [], EXIT_NOT_REPRODUCED, ["test_accuracy is only on one"]),
    ],
)
def test_verdict(values, lock, code, phrases):
    diff = {"metrics/metrics.json": {name: {"old": old, "new": new} for name, (old, new) in values.items()}}
    found, message = verdict(lock, diff, (0, 10_000))
    assert found == code, message
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.parametrize(
    ("metric", "old", "new", "within"),
    [
        ("test_cross_entropy", 0.2695, 0.2695 * (1 + 0.9e-5), True),
        ("test_cross_entropy", 0.2695, 0.2695 * (1 + 1.1e-5), False),
        ("test_accuracy", 0.9248, 0.9257, True),
        ("test_accuracy", 0.9248, 0.9260, False),
        ("max_test_accuracy_step", 9100, 9100, True),
        ("max_test_accuracy_step", 9100, 9200, False),
    ],
)
def test_tolerances(metric, old, new, within):
    assert (reproduce.beyond(metric, old, new) <= 1) is within


def test_lock_differences_allow_trained_outputs_to_differ_but_not_data_or_inputs():
    def lock(model: str = "b", data: str = "a", params: int = 1) -> dict:
        return {
            "stages": {
                "preprocess": {"cmd": "p", "outs": [{"path": "data/processed", "md5": data}]},
                "train": {"cmd": "t", "params": {"train": params}, "outs": [{"path": "model", "md5": model}]},
                "report": {"deps": [{"path": "model", "md5": model}], "outs": [{"path": "m", "md5": model}]},
            }
        }

    assert reproduce.lock_differences(lock(), lock(model="c")) == []
    differences = ["preprocess's outs differ", "train's params differ"]
    assert reproduce.lock_differences(lock(), lock(model="c", data="z", params=2)) == differences


def test_changed_predictions_counts_rows():
    old = "actual,predicted\n1,1\n2,2\n3,3\n"
    assert reproduce.changed_predictions(old, old) == (0, 3)
    assert reproduce.changed_predictions(old, "actual,predicted\n1,1\n2,7\n3,3\n") == (1, 3)


def test_the_check_on_a_real_pipeline_same_cpu_other_cpu_and_beyond_tolerance(reproduced_project):
    project = reproduced_project
    project.commit("Results")
    check = ["-m", "pipeline.reproduce"]

    # Same machine, same bytes.
    project.dvc("repro", "-f")
    same = project.python(*check, check=False)
    assert same.returncode == EXIT_REPRODUCED, same.stdout + same.stderr
    assert same.stdout.startswith("identical: dvc.lock and metrics/ are byte for byte"), same.stdout

    # "Another CPU": XLA limited to SSE4.2 rounds differently; the check must say so and pass.
    project.dvc("repro", "-f", env={"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"})
    other = project.python(*check, check=False)
    assert other.returncode == EXIT_REPRODUCED, other.stdout + other.stderr
    assert "on a different CPU" in other.stdout and "XLA limited to SSE4_2" in other.stdout, other.stdout
    train = json.loads((project.root / "metrics/train.json").read_text())
    assert "XLA limited to SSE4_2" in dict(train["environment"])["cpu"]

    # A metric beyond its tolerance fails, naming it.
    metrics = json.loads((project.root / "metrics/metrics.json").read_text())
    metrics["test_cross_entropy"] *= 1.01
    (project.root / "metrics/metrics.json").write_text(json.dumps(metrics))
    failed = project.python(*check, check=False)
    assert failed.returncode == EXIT_NOT_REPRODUCED, failed.stdout + failed.stderr
    assert "beyond tolerance" in failed.stdout and "test_cross_entropy" in failed.stdout

    # Any other file the run left behind is no reproduction either.
    project.git("checkout", "--", "metrics")
    (project.root / "stray.txt").write_text("left behind")
    stray = project.python(*check, check=False)
    assert stray.returncode == EXIT_NOT_REPRODUCED and "stray.txt" in stray.stdout
