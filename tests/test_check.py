"""Tests of the metric-regression gate (pipeline/check.py) and of the workflow that runs it in CI.

The command-line tests run ``python -m pipeline.check`` as a subprocess inside temporary git and DVC
repositories with real commits: main holds a copy of the project's params.yaml, a dvc.yaml whose
train and report stages declare metrics/train.json and metrics/metrics.json as metrics (as the
project's does), and both files committed; a feature branch changes the metrics. DVC reads them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dvc.api
import pytest
import yaml
from conftest import ROOT
from dvc.repo import Repo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import check
from pipeline.check import (
    Baseline,
    CheckError,
    check_metric,
    compare,
    environment_difference,
    render_json,
    render_markdown,
)
from pipeline.files import READ_LIMIT
from pipeline.params import CheckRule, ParamsError, load_params, validate

WORKFLOW = ROOT / ".github" / "workflows" / "metrics-gate.yml"
BASE_METRICS = {
    "test_accuracy": 0.9213,
    "test_cross_entropy": 0.2845,
    "macro_precision": 0.9205,
    "macro_recall": 0.9201,
    "macro_f1": 0.9202,
    "per_class_recall": {str(digit): 0.9 + digit / 100 for digit in range(10)},
}
# What a much smaller learning rate gives after the same number of steps.
WORSE_METRICS = {**BASE_METRICS, "test_accuracy": 0.80, "test_cross_entropy": 0.61, "macro_f1": 0.79}
BETTER_METRICS = {**BASE_METRICS, "test_accuracy": 0.93, "test_cross_entropy": 0.27, "macro_f1": 0.929}
HIGHER = CheckRule(better="higher", max_worsening=0.002, floor=0.915)
LOWER = CheckRule(better="lower", max_worsening=0.01)
SCORE = CheckRule(better="higher", max_worsening=0.002, range=(0.0, 1.0))
# What the train stage writes to metrics/train.json: numbers, and the versions it ran with as strings.
ENVIRONMENT = {
    "python": "3.11.7",
    "tensorflow": "2.21.0",
    "keras": "3.15.1",
    "numpy": "2.1.3",
    "scikit-learn": "1.6.1",
    "dvc": "3.67.1",
    "mlflow": "3.5.0",
    "uv_lock_sha256": "0" * 64,
}
TRAIN_METRICS = {"final_test_accuracy": 0.9212, "final_train_accuracy": 0.95, "environment": ENVIRONMENT}
# The metrics declarations of the project's dvc.yaml: each stage declares the file it writes.
DVC_YAML = """\
stages:
  train:
    cmd: python -m pipeline.train --metrics metrics/train.json
    metrics:
      - metrics/train.json:
          cache: false
  report:
    cmd: python -m pipeline.report --metrics metrics/metrics.json
    metrics:
      - metrics/metrics.json:
          cache: false
"""
# Keep git independent of the developer's own configuration (signing, hooks, default branch).
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def write_metrics(repo: Path, metrics: dict | str, train: dict | str | None = None) -> None:
    """Write metrics/metrics.json, and metrics/train.json when given or not there yet (TRAIN_METRICS)."""
    files = {"metrics.json": metrics}
    if train is not None or not (repo / "metrics" / "train.json").exists():
        files["train.json"] = TRAIN_METRICS if train is None else train
    (repo / "metrics").mkdir(exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (repo / "metrics" / name).write_text(text, encoding="utf-8")


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def new_repo(path: Path, branch: str = "main") -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", branch)
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "commit.gpgsign", "false")
    Repo.init(str(path)).close()
    (path / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose main has committed metrics, checked out on a branch ``feature`` made from it."""
    repo = new_repo(tmp_path / "repo")
    write_metrics(repo, BASE_METRICS)
    commit_all(repo, "baseline pipeline run")
    git(repo, "switch", "-q", "-c", "feature")
    return repo


def check_env(**extra: str) -> dict[str, str]:
    # No MLflow setting from the test process (an earlier in-process test may have set one).
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("GITHUB_STEP_SUMMARY", "PIPELINE_PARAMS") and not key.startswith("MLFLOW_")
    }
    env.update(GIT_ENV, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", **extra)
    return env


def run_check(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.check", *args],
        check=False,
        cwd=cwd,
        env=check_env(**env),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


def assert_bad_input(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 2, nothing on stdout, and one 'error:' paragraph on stderr naming every phrase."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert "\n\n" not in result.stderr.strip()
    message = " ".join(result.stderr.split())
    for phrase in phrases:
        assert phrase in message, message


def edit_params(repo: Path, edit) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Pure functions.


def test_higher_is_better_fails_when_the_drop_exceeds_max_worsening():
    row = check_metric("test_accuracy", 0.9213, 0.9180, HIGHER)
    assert not row.passed
    assert row.change == pytest.approx(-0.0033)
    assert row.failures == ("fell by 0.0033, more than the 0.002 allowed",)


def test_a_drop_of_exactly_max_worsening_passes_despite_float_rounding():
    # 0.9213 - 0.9193 is 0.0020000000000000018 in floating point.
    assert check_metric("test_accuracy", 0.9213, 0.9193, HIGHER).passed
    assert check_metric("test_cross_entropy", 0.2845, 0.2945, LOWER).passed


def test_lower_is_better_fails_when_the_rise_exceeds_max_worsening():
    assert check_metric("test_cross_entropy", 0.2845, 0.2700, LOWER).passed
    row = check_metric("test_cross_entropy", 0.2845, 0.3000, LOWER)
    assert row.failures == ("rose by 0.0155, more than the 0.01 allowed",)


def test_improvements_pass():
    assert check_metric("test_accuracy", 0.9213, 0.95, HIGHER).passed
    assert check_metric("test_cross_entropy", 0.2845, 0.1, LOWER).passed


def test_floor_and_ceiling_hold_even_within_max_worsening_and_without_baseline():
    # A drop of 0.0015 is allowed, but it lands below the floor.
    assert check_metric("test_accuracy", 0.916, 0.9145, HIGHER).failures == ("below the floor of 0.915",)
    no_baseline = check_metric("test_accuracy", None, 0.90, HIGHER)
    assert no_baseline.failures == ("below the floor of 0.915",)
    assert no_baseline.change is None
    capped = CheckRule(better="lower", max_worsening=0.01, ceiling=0.3)
    assert check_metric("test_cross_entropy", 0.29, 0.295, capped).passed
    assert check_metric("test_cross_entropy", 0.299, 0.305, capped).failures == ("above the ceiling of 0.3",)


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (math.nan, "test_accuracy is nan, not a finite number"),
        (math.inf, "test_accuracy is inf, not a finite number"),
        (-math.inf, "test_accuracy is -inf, not a finite number"),
        (10**400, "test_accuracy is a 401-digit number, too large to compare"),
        (1e308, "test_accuracy is 1e+308, outside its range [0, 1] in params.yaml"),
        (-0.1, "test_accuracy is -0.1, outside its range [0, 1] in params.yaml"),
        ("0.92", "test_accuracy is '0.92', not a number"),
    ],
)
def test_values_that_cannot_be_compared_are_bad_input_in_either_metrics(value, phrase):
    rules = {"test_accuracy": SCORE}
    with pytest.raises(CheckError, match="cannot be checked against the current metrics") as current:
        compare(BASE_METRICS, {**BASE_METRICS, "test_accuracy": value}, rules)
    assert phrase in str(current.value)
    with pytest.raises(CheckError, match="cannot be checked against the baseline") as baseline:
        compare({**BASE_METRICS, "test_accuracy": value}, BASE_METRICS, rules)
    assert phrase in str(baseline.value)


def test_params_reject_a_malformed_range():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["check"]["test_accuracy"]["range"] = [1, 0]
    raw["check"]["macro_f1"]["range"] = "0..1"
    raw["check"]["test_cross_entropy"]["range"] = [0, "many"]
    with pytest.raises(ParamsError) as raised:
        validate(raw)
    message = str(raised.value)
    assert "params.yaml has 3 problems" in message
    assert "check.test_accuracy.range must have low <= high, got [1, 0]" in message
    assert "check.macro_f1.range must be a list [low, high] of two numbers or nulls, got '0..1'" in message
    assert "check.test_cross_entropy.range must be a number, got 'many'" in message


def test_a_range_open_at_one_end_bounds_only_the_other():
    loss = CheckRule(better="lower", max_worsening=0.01, range=(0.0, None))
    assert compare(None, {"loss": 1e300}, {"loss": loss})[0].current == 1e300
    with pytest.raises(CheckError, match=r"loss is -0.5, outside its range \[0, null\]"):
        compare(None, {"loss": -0.5}, {"loss": loss})


def test_a_change_too_large_to_compute_is_bad_input():
    with pytest.raises(CheckError, match="the change in x from -1e.308 to 1e.308 is too large to compute"):
        compare({"x": -1e308}, {"x": 1e308}, {"x": LOWER})


def test_compare_checks_rules_in_order_and_notes_missing_baselines():
    rules = {"test_cross_entropy": LOWER, "test_accuracy": HIGHER, "per_class_recall.3": HIGHER}
    current = {**BASE_METRICS, "test_accuracy": 0.80}
    rows = compare(BASE_METRICS, current, rules)
    assert [row.metric for row in rows] == list(rules)
    assert [row.passed for row in rows] == [True, False, True]
    assert check.overall_status(rows) == "fail" and check.exit_code(rows) == 1

    unchecked = compare(None, BASE_METRICS, rules)
    assert all(row.baseline is None and row.note == "no baseline" for row in unchecked)
    assert check.exit_code(unchecked) == 0

    old = {key: value for key, value in BASE_METRICS.items() if key != "test_accuracy"}
    assert compare(old, BASE_METRICS, rules)[1].note == "new metric, not in the baseline"


@pytest.mark.parametrize(
    ("rules", "phrase"),
    [
        ({"test_acuracy": HIGHER}, "test_acuracy is not in it (did you mean test_accuracy?)"),
        (
            {"per_class_recall": HIGHER},
            "per_class_recall is a group of metrics, not one; name one of them, like per_class_recall.0",
        ),
        ({"f1": HIGHER}, "f1 is not in it (it has macro_f1, macro_precision"),
    ],
)
def test_compare_rejects_rules_for_metrics_that_do_not_exist(rules, phrase):
    with pytest.raises(CheckError, match="cannot be checked against the current metrics") as raised:
        compare(BASE_METRICS, BASE_METRICS, rules)
    assert phrase in str(raised.value)


def test_compare_rejects_values_that_are_not_numbers():
    with pytest.raises(CheckError, match="test_accuracy is 'high', not a number"):
        compare(BASE_METRICS, {**BASE_METRICS, "test_accuracy": "high"}, {"test_accuracy": HIGHER})
    with pytest.raises(CheckError, match="against the baseline: test_accuracy is True, not a number"):
        compare({**BASE_METRICS, "test_accuracy": True}, BASE_METRICS, {"test_accuracy": HIGHER})


# When two metrics files hold the same top-level name, dvc.api.metrics_show names each "<file>:<name>".
CLASHING = {"metrics/metrics.json:test_accuracy": 0.9213, "metrics/train.json:test_accuracy": 0.5, "macro_f1": 0.9}


def test_a_metric_is_found_in_whichever_metrics_file_holds_it():
    same = {**CLASHING, "metrics/train.json:test_accuracy": 0.9213}
    assert compare(same, same, {"test_accuracy": HIGHER})[0].current == 0.9213
    # A rule may also name the file, as DVC does.
    rows = compare(CLASHING, CLASHING, {"metrics/train.json:test_accuracy": LOWER})
    assert rows[0].current == 0.5


def test_a_metric_two_files_hold_differently_is_bad_input():
    with pytest.raises(CheckError) as raised:
        compare(None, CLASHING, {"test_accuracy": HIGHER})
    assert (
        "test_accuracy differs between the metrics files "
        "(metrics/metrics.json has 0.9213, metrics/train.json has 0.5); rename one of them"
    ) in str(raised.value)


@pytest.mark.parametrize(
    ("rule", "phrase"),
    [
        ("python", "python is not in it (it has final_test_accuracy, final_train_accuracy, macro_f1,"),
        ("tensorflw", "tensorflw is not in it (it has final_test_accuracy,"),
        ("test_acuracy", "test_acuracy is not in it (did you mean test_accuracy?)"),
        ("environment", "environment holds text, not metrics"),
        ("environment.python", "environment.python is '3.11.7', not a number"),
    ],
)
def test_environment_strings_are_not_metrics(rule, phrase):
    current = {**BASE_METRICS, **TRAIN_METRICS}
    with pytest.raises(CheckError) as raised:
        compare(current, current, {rule: HIGHER})
    assert phrase in str(raised.value)
    assert "environment." not in str(raised.value).replace(f"{rule} is", "")


def test_environment_difference_names_what_changed():
    new = {**ENVIRONMENT, "tensorflow": "2.22.0", "uv_lock_sha256": "1" * 64}
    assert environment_difference(TRAIN_METRICS, {**TRAIN_METRICS, "environment": new}) == (
        "Environment differs from the baseline's: tensorflow 2.21.0 → 2.22.0, uv.lock changed."
    )
    added = {**ENVIRONMENT, "jax": "0.5.0"}
    assert environment_difference(TRAIN_METRICS, {"environment": added}) == (
        "Environment differs from the baseline's: jax (none) → 0.5.0."
    )
    baseline = {"environment": {**ENVIRONMENT, "cpu": "CPU A (x86_64: avx2)"}}
    assert environment_difference(baseline, {"environment": {**ENVIRONMENT, "cpu": "CPU B (x86_64: avx512f)"}}) == (
        "Environment differs from the baseline's: the baseline came from another CPU (CPU A (x86_64: avx2))."
    )


def test_environment_difference_says_nothing_when_equal_or_when_a_side_has_none():
    assert environment_difference(TRAIN_METRICS, dict(TRAIN_METRICS)) is None
    assert environment_difference(BASE_METRICS, TRAIN_METRICS) is None
    assert environment_difference(None, TRAIN_METRICS) is None
    assert environment_difference(TRAIN_METRICS, BASE_METRICS) is None


def test_render_markdown_gives_a_summary_line_then_the_table():
    rules = {"test_accuracy": HIGHER, "test_cross_entropy": LOWER}
    rows = compare(BASE_METRICS, {**BASE_METRICS, "test_accuracy": 0.80}, rules)
    markdown = render_markdown(rows, Baseline("origin/main (1a2b3c4)", BASE_METRICS))
    assert markdown == (
        "### ❌ Metric check failed: 1 of 2 metrics broke their rules (test_accuracy), against origin/main (1a2b3c4)\n"
        "\n"
        "| metric | baseline | current | change | rule | verdict |\n"
        "|---|--:|--:|--:|---|---|\n"
        "| `test_accuracy` | 0.9213 | 0.8 | -0.1213 | higher is better, may fall ≤ 0.002, floor 0.915 "
        "| ❌ fail: fell by 0.1213, more than the 0.002 allowed; below the floor of 0.915 |\n"
        "| `test_cross_entropy` | 0.2845 | 0.2845 | 0 | lower is better, may rise ≤ 0.01 | ✅ pass |\n"
        "\n"
    )


def test_render_markdown_says_when_there_is_no_baseline():
    rows = compare(None, BASE_METRICS, {"test_accuracy": HIGHER})
    markdown = render_markdown(rows, Baseline("v1", None, "metrics/metrics.json does not exist at v1"))
    assert markdown.splitlines()[0] == (
        "### ✅ Metric check passed: 1 of 1 metrics within their rules; no baseline, as "
        "metrics/metrics.json does not exist at v1, so only floors and ceilings were checked"
    )
    assert (
        "| `test_accuracy` | — | 0.9213 | — | higher is better, may fall ≤ 0.002, floor 0.915 | ✅ pass (no baseline) |"
        in markdown
    )


def test_render_markdown_and_json_carry_the_environment_line():
    rows = compare(BASE_METRICS, BASE_METRICS, {"test_accuracy": HIGHER})
    line = "Environment differs from the baseline's: numpy 2.1.3 → 2.2.0."
    markdown = render_markdown(rows, Baseline("main", BASE_METRICS), line)
    assert markdown.splitlines()[:4] == [
        "### ✅ Metric check passed: 1 of 1 metrics within their rules, against main",
        "",
        line,
        "",
    ]
    assert markdown.splitlines()[4] == check.TABLE_HEADER
    assert json.loads(render_json(rows, None, line))["environment_difference"] == line
    assert json.loads(render_json(rows))["environment_difference"] is None
    assert "Environment" not in render_markdown(rows)


def test_render_markdown_escapes_pipes_in_cells():
    rows = compare({"a|b": 1.0}, {"a|b": 1.0}, {"a|b": HIGHER})
    assert "| `a\\|b` |" in render_markdown(rows)


def test_render_json_is_standard_json_with_the_overall_status():
    rows = compare(
        BASE_METRICS,
        {**BASE_METRICS, "test_cross_entropy": 0.5},
        {"test_accuracy": HIGHER, "test_cross_entropy": LOWER},
    )
    report = json.loads(
        render_json(rows, Baseline("HEAD (1a2b3c4)", BASE_METRICS, commit="1a2b3c4")), parse_constant=pytest.fail
    )
    assert report["status"] == "fail"
    assert report["baseline"]["found"] is True and report["baseline"]["commit"] == "1a2b3c4"
    accuracy, entropy = report["metrics"]
    assert accuracy == {
        "metric": "test_accuracy",
        "baseline": 0.9213,
        "current": 0.9213,
        "change": 0.0,
        "rule": {"better": "higher", "max_worsening": 0.002, "floor": 0.915, "ceiling": None, "range": None},
        "status": "pass",
        "reasons": [],
        "note": None,
    }
    assert entropy["status"] == "fail" and entropy["current"] == 0.5 and entropy["change"] == pytest.approx(0.2155)


def test_describe_rule():
    assert (
        check.describe_rule(CheckRule("lower", 0.01, floor=0.1, ceiling=0.5))
        == "lower is better, may rise ≤ 0.01, floor 0.1, ceiling 0.5"
    )


# ---------------------------------------------------------------------------------------------
# The command, in real git repositories.


def test_the_projects_params_have_the_rules_these_tests_rely_on(repo):
    rules = load_params(repo / "params.yaml").check
    assert rules["test_accuracy"].better == "higher" and rules["test_accuracy"].floor is not None
    assert rules["test_cross_entropy"].better == "lower"
    # The bad-input tests below rely on these ranges: an accuracy is a fraction and a loss is not negative.
    assert rules["test_accuracy"].range == (0, 1) and rules["test_cross_entropy"].range == (0, None)


def test_an_unchanged_model_passes(repo):
    write_metrics(repo, BASE_METRICS)
    commit_all(repo, "retrain, same metrics")
    result = run_check(repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("### ✅ Metric check passed: 3 of 3 metrics within their rules")
    assert result.stderr == ""


def test_a_worse_model_fails_and_names_the_metric(repo):
    write_metrics(repo, WORSE_METRICS)
    commit_all(repo, "learning_rate 0.003 -> 0.00003")
    result = run_check(repo)
    assert result.returncode == 1, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("### ❌ Metric check failed: 3 of 3 metrics broke their rules")
    assert "test_accuracy" in first_line
    assert "| `test_accuracy` | 0.9213 | 0.8 | -0.1213 |" in result.stdout
    assert "❌ fail: fell by 0.1213, more than the 0.002 allowed; below the floor of 0.915" in result.stdout


def test_an_uncommitted_worse_model_fails_too(repo):
    write_metrics(repo, WORSE_METRICS)
    assert run_check(repo).returncode == 1


def test_a_better_model_passes(repo):
    write_metrics(repo, BETTER_METRICS)
    commit_all(repo, "better")
    result = run_check(repo)
    assert result.returncode == 0, result.stdout
    assert "| `test_accuracy` | 0.9213 | 0.93 | +0.0087 |" in result.stdout


def test_a_floor_violation_fails_even_when_the_drop_is_allowed(repo):
    rule = load_params(repo / "params.yaml").check["test_accuracy"]
    baseline = rule.floor + rule.max_worsening / 2
    current = rule.floor - rule.max_worsening / 4
    git(repo, "switch", "-q", "main")
    write_metrics(repo, {**BASE_METRICS, "test_accuracy": baseline})
    commit_all(repo, "baseline just above the floor")
    git(repo, "switch", "-q", "-C", "feature")
    write_metrics(repo, {**BASE_METRICS, "test_accuracy": current})
    commit_all(repo, "small drop")
    result = run_check(repo)
    assert result.returncode == 1
    assert f"❌ fail: below the floor of {rule.floor:.6g}" in result.stdout
    assert "more than the" not in result.stdout


def test_the_default_baseline_is_the_merge_base_with_main(repo):
    merge_base = git(repo, "rev-parse", "main")
    # main moves on to a much better model after the branch was made; the branch itself is unchanged.
    git(repo, "switch", "-q", "main")
    write_metrics(repo, {**BASE_METRICS, "test_accuracy": 0.99})
    commit_all(repo, "much better model on main")
    git(repo, "switch", "-q", "feature")

    result = run_check(repo)
    assert result.returncode == 0, result.stdout
    assert f"against the merge base with main ({merge_base[:7]})" in result.stdout.splitlines()[0]
    assert json.loads(run_check(repo, "--json").stdout)["baseline"]["commit"] == merge_base

    against_tip = run_check(repo, "--rev", "main")
    assert against_tip.returncode == 1
    assert "against main (" in against_tip.stdout


def test_the_default_baseline_is_origin_main_when_there_is_no_local_main(repo, tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "-b", "feature", str(repo), str(clone))
    assert git(clone, "branch", "--list", "main") == ""
    write_metrics(clone, WORSE_METRICS)
    result = run_check(clone)
    assert result.returncode == 1
    assert "against the merge base with origin/main" in result.stdout


@pytest.mark.slow
def test_the_default_baseline_falls_back_to_head_without_a_main_branch(tmp_path):
    repo = new_repo(tmp_path / "repo", branch="trunk")
    write_metrics(repo, BASE_METRICS)
    head = commit_all(repo, "first run")
    write_metrics(repo, WORSE_METRICS)
    result = run_check(repo)
    assert result.returncode == 1
    assert f"against HEAD ({head[:7]}), as there is no merge base with main" in result.stdout


@pytest.mark.slow
def test_a_missing_baseline_at_the_revision_passes_and_says_so(tmp_path):
    repo = new_repo(tmp_path / "repo")
    first = commit_all(repo, "params only, before the first pipeline run")
    git(repo, "switch", "-q", "-c", "feature")
    write_metrics(repo, BASE_METRICS)
    commit_all(repo, "first pipeline run")
    result = run_check(repo)
    assert result.returncode == 0, result.stderr
    # DVC reads the train stage's metrics file first, and stops at the first one missing.
    assert (
        f"no baseline, as metrics/train.json does not exist at the merge base with main ({first[:7]})" in result.stdout
    )
    assert "| `test_accuracy` | — | 0.9213 | — |" in result.stdout
    report = json.loads(run_check(repo, "--json").stdout)
    assert report["status"] == "pass" and report["baseline"]["found"] is False

    # Floors still hold without a baseline.
    write_metrics(repo, WORSE_METRICS)
    failed = run_check(repo, "--rev", first)
    assert failed.returncode == 1
    assert "below the floor of 0.915" in failed.stdout


@pytest.mark.slow
def test_a_repository_without_commits_has_no_baseline(tmp_path):
    repo = new_repo(tmp_path / "repo")
    write_metrics(repo, BASE_METRICS)
    result = run_check(repo)
    assert result.returncode == 0, result.stderr
    assert "no baseline, as HEAD has no commits yet" in result.stdout


def test_a_baseline_file_replaces_git(repo, tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(BETTER_METRICS), encoding="utf-8")
    result = run_check(repo, "--baseline-file", str(baseline))
    assert result.returncode == 1
    assert f"against {baseline}" in result.stdout
    # What dvc.api.metrics_show returns (the metrics of every file, merged) is a baseline file too.
    baseline.write_text(json.dumps(dvc.api.metrics_show(repo=str(repo))), encoding="utf-8")
    same = run_check(repo, "--baseline-file", str(baseline), "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["baseline"]["path"] == str(baseline)


def test_dvc_finds_the_metrics_from_a_subdirectory(repo):
    write_metrics(repo, WORSE_METRICS)
    result = run_check(repo / "metrics", "--params", str(repo / "params.yaml"))
    assert result.returncode == 1, result.stderr
    assert "| `test_accuracy` | 0.9213 | 0.8 | -0.1213 |" in result.stdout


def test_a_rule_finds_its_metric_in_any_metrics_file(repo):
    edit_params(repo, lambda raw: raw["check"].update(final_test_accuracy={"better": "higher", "max_worsening": 0.01}))
    write_metrics(repo, BASE_METRICS, {**TRAIN_METRICS, "final_test_accuracy": 0.85})
    result = run_check(repo)
    assert result.returncode == 1, result.stderr
    assert "| `final_test_accuracy` | 0.9212 | 0.85 | -0.0712 |" in result.stdout


def test_a_metric_two_files_hold_differently_stops_the_gate(repo):
    write_metrics(repo, BASE_METRICS, {**TRAIN_METRICS, "test_accuracy": 0.5})
    assert_bad_input(
        run_check(repo),
        "test_accuracy differs between the metrics files (metrics/train.json has 0.5, metrics/metrics.json has 0.9213)",
    )
    # The same value in both files is one metric.
    write_metrics(repo, BASE_METRICS, {**TRAIN_METRICS, "test_accuracy": BASE_METRICS["test_accuracy"]})
    assert run_check(repo).returncode == 0


def test_json_output_parses_and_has_the_overall_status(repo):
    write_metrics(repo, WORSE_METRICS)
    result = run_check(repo, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["status"] == "fail"
    assert [row["metric"] for row in report["metrics"]] == ["test_accuracy", "test_cross_entropy", "macro_f1"]
    assert report["metrics"][0]["status"] == "fail"
    assert report["metrics"][0]["change"] == pytest.approx(-0.1213)
    assert report["baseline"]["rev"] is None and report["baseline"]["path"] is None


def test_the_summary_file_gets_the_markdown_appended(repo, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    result = run_check(repo, "--json", "--summary-file", str(summary))
    assert result.returncode == 0
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n### ✅ Metric check passed")
    assert check.TABLE_HEADER in text


def test_github_step_summary_is_the_default_summary_file_and_empty_turns_it_off(repo, tmp_path):
    summary = tmp_path / "step_summary.md"
    assert run_check(repo, GITHUB_STEP_SUMMARY=str(summary)).returncode == 0
    assert check.TABLE_HEADER in summary.read_text(encoding="utf-8")
    summary.unlink()
    assert run_check(repo, "--summary-file", "", GITHUB_STEP_SUMMARY=str(summary)).returncode == 0
    assert not summary.exists()


def test_bad_input_is_reported_in_the_summary_file_too(repo, tmp_path):
    summary = tmp_path / "summary.md"
    assert_bad_input(run_check(repo, "--rev", "nope", "--summary-file", str(summary)), "unknown git revision 'nope'")
    assert summary.read_text(encoding="utf-8").startswith(
        "### ⚠️ Metric check could not run\n\nunknown git revision 'nope'"
    )


# Bad input: exit 2 and one paragraph on stderr.


def test_missing_current_metrics(repo):
    (repo / "metrics" / "metrics.json").unlink()
    assert_bad_input(run_check(repo), "metrics/metrics.json does not exist", "dvc repro")


def test_no_metrics_declared(repo):
    (repo / "dvc.yaml").unlink()
    assert_bad_input(run_check(repo), "DVC finds no metrics; declare the metrics files in dvc.yaml")


def test_malformed_current_metrics(repo):
    write_metrics(repo, '{"test_accuracy": 0.92,')
    assert_bad_input(
        run_check(repo),
        "cannot read the current metrics: unable to read: 'metrics/metrics.json', JSON file structure is corrupted",
    )


def test_malformed_baseline_metrics(repo):
    git(repo, "switch", "-q", "main")
    write_metrics(repo, "{not json")
    commit_all(repo, "broken metrics")
    git(repo, "switch", "-q", "feature")
    assert_bad_input(
        run_check(repo, "--rev", "main"),
        "cannot read the baseline metrics at main (",
        "unable to read: 'metrics/metrics.json', JSON file structure is corrupted",
    )


def test_malformed_baseline_file(repo, tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text("[0.92]", encoding="utf-8")
    assert_bad_input(run_check(repo, "--baseline-file", str(baseline)), "must hold a JSON object of metrics, got list")
    baseline.write_bytes(b'{"test_accuracy": "\xe9"}')
    assert_bad_input(run_check(repo, "--baseline-file", str(baseline)), "cannot read the baseline file", "utf-8")


def test_unknown_revision(repo):
    assert_bad_input(
        run_check(repo, "--rev", "no-such-branch"), "unknown git revision 'no-such-branch'", "fetch-depth: 0"
    )
    assert_bad_input(run_check(repo, "--rev=--all"), "unknown git revision '--all'")


def test_rule_for_a_metric_not_in_the_metrics(repo):
    edit_params(repo, lambda raw: raw["check"].update(test_acuracy={"better": "higher", "max_worsening": 0.01}))
    assert_bad_input(
        run_check(repo),
        "cannot be checked against the current metrics",
        "test_acuracy is not in it (did you mean test_accuracy?)",
    )


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_a_baseline_file_that_is_no_regular_file_or_too_large_is_refused_without_reading_it(tmp_path, kind):
    path = {"device": Path("/dev/zero")}.get(kind, tmp_path / "baseline.json")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as handle:
            handle.truncate(READ_LIMIT + 1)
    reason = {
        "fifo": "it is a FIFO, not a regular file",
        "device": "it is a device, not a regular file",
        "directory": "it is a directory, not a regular file",
        "huge": "it holds more than the 67,108,864 bytes this command reads",
    }[kind]
    with pytest.raises(CheckError) as raised:
        check.read_baseline_file(path)
    assert str(raised.value) == f"cannot read the baseline file {path}: {reason}."


def test_a_summary_file_that_cannot_take_the_report_is_bad_input(tmp_path):
    fifo = tmp_path / "summary.fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckError, match="summary.fifo: it is a FIFO that nothing reads"):
        check.append_summary(str(fifo), "report")
    with pytest.raises(CheckError, match="summary file .* Is a directory"):
        check.append_summary(str(tmp_path), "report")


def test_a_summary_file_that_cannot_be_written_keeps_the_real_error_and_the_verdict(repo, tmp_path):
    folder = tmp_path / "summary"
    folder.mkdir()
    result = run_check(repo, "--rev", "nope", "--summary-file", str(folder))
    assert_bad_input(
        result, "unknown git revision 'nope'", f"(Also, cannot append the report to the summary file {folder}"
    )
    write_metrics(repo, WORSE_METRICS)
    result = run_check(repo, "--summary-file", str(folder))
    assert result.returncode == 2 and "### ❌ Metric check failed" in result.stdout, result
    assert "cannot append the report to the summary file" in result.stderr and "Traceback" not in result.stderr


def test_a_current_metrics_file_that_is_a_fifo_or_too_large_is_bad_input_not_a_hang(repo):
    metrics = repo / "metrics" / "metrics.json"
    metrics.unlink()
    os.mkfifo(metrics)
    assert_bad_input(run_check(repo), "cannot read the current metrics: metrics/metrics.json: it is a FIFO")
    metrics.unlink()
    with open(metrics, "wb") as handle:
        handle.truncate(READ_LIMIT + 1)
    assert_bad_input(run_check(repo), "metrics/metrics.json: it holds more than the 67,108,864 bytes")


def test_a_crash_exits_2_never_1_which_means_a_regression(tmp_path):
    """Whatever slips past the checks (here a 5,000-digit integer in the params file) is not a verdict."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("seed: 0", "seed: 1" + "0" * 5000))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.check", "--params", str(params)], cwd=tmp_path, env=check_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == "", result.stderr


def test_missing_baseline_file(repo, tmp_path):
    assert_bad_input(
        run_check(repo, "--baseline-file", str(tmp_path / "gone.json")), "the baseline file", "gone.json does not exist"
    )


def test_bad_params(repo):
    edit_params(repo, lambda raw: raw["check"]["test_accuracy"].update(better="up"))
    assert_bad_input(
        run_check(repo), "params.yaml has 1 problem: check.test_accuracy.better must be 'higher' or 'lower'"
    )
    assert_bad_input(run_check(repo, "--params", "missing.yaml"), "missing.yaml does not exist")
    edit_params(repo, lambda raw: raw.pop("check"))
    assert_bad_input(run_check(repo), "no rules in its check section")


def test_outside_a_dvc_repository(repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(repo / "metrics", outside / "metrics")
    shutil.copy(repo / "params.yaml", outside)
    shutil.copy(repo / "dvc.yaml", outside)
    assert_bad_input(run_check(outside), "cannot read the current metrics", "not inside of a DVC repository")


def test_cli_reads_sys_argv_and_exits_with_the_gates_code(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("PIPELINE_PARAMS", raising=False)
    for metrics, code in ((BASE_METRICS, 0), (WORSE_METRICS, 1), ("oops", 2)):
        write_metrics(repo, metrics)
        monkeypatch.setattr(sys, "argv", ["mnist-check", "--json"])
        with pytest.raises(SystemExit) as exited:
            check.cli()
        assert exited.value.code == code
    assert capsys.readouterr().err.startswith("error: cannot read the current metrics: unable to read:")


# The environment the train stage records (issue "reproducible").


def test_dvc_api_returns_the_environments_strings_with_the_metrics(repo):
    # The experiment behind reading the environment through DVC: metrics_show keeps strings (and
    # nests them as the file does), while it drops lists.
    write_metrics(repo, {**BASE_METRICS, "confusion": [[1, 2], [3, 4]]})
    metrics = dvc.api.metrics_show(repo=str(repo))
    assert metrics["environment"] == ENVIRONMENT
    assert metrics["test_accuracy"] == BASE_METRICS["test_accuracy"]
    assert "confusion" not in metrics


def test_the_report_says_how_the_environment_differs_and_still_passes(repo):
    changed = {**ENVIRONMENT, "tensorflow": "2.22.0", "uv_lock_sha256": "f" * 64}
    write_metrics(repo, BASE_METRICS, {**TRAIN_METRICS, "environment": changed})
    line = "Environment differs from the baseline's: tensorflow 2.21.0 → 2.22.0, uv.lock changed."
    result = run_check(repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2] == line
    assert result.stdout.count("Environment") == 1
    report = json.loads(run_check(repo, "--json").stdout)
    assert report["status"] == "pass" and report["environment_difference"] == line


def test_no_environment_line_when_it_is_the_same_or_the_baseline_has_none(repo, tmp_path):
    same = run_check(repo)
    assert same.returncode == 0 and "Environment" not in same.stdout
    # An older baseline, from before the train stage recorded its environment.
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({**BASE_METRICS, "final_test_accuracy": 0.92}), encoding="utf-8")
    write_metrics(repo, BASE_METRICS, {**TRAIN_METRICS, "environment": {**ENVIRONMENT, "numpy": "2.2.0"}})
    older = run_check(repo, "--baseline-file", str(baseline), "--json")
    assert older.returncode == 0, older.stderr
    assert json.loads(older.stdout)["environment_difference"] is None


# Values that cannot be compared are bad input (issue "nothing unbounded").

DEEP = "[" * 100_000 + "]" * 100_000
UNCOMPARABLE = [
    pytest.param(
        "test_accuracy", "1" + "0" * 400, "test_accuracy is a 401-digit number, too large to compare", id="401-digits"
    ),
    pytest.param("test_accuracy", "1" + "0" * 5000, "Exceeds the limit (4300 digits)", id="5001-digits"),
    pytest.param("test_accuracy", DEEP, "its JSON nests too deeply to parse", id="nested-100000-deep"),
    pytest.param("test_accuracy", "NaN", "test_accuracy is nan, not a finite number", id="NaN"),
    pytest.param("test_accuracy", "Infinity", "test_accuracy is inf, not a finite number", id="Infinity"),
    pytest.param("test_cross_entropy", "-Infinity", "test_cross_entropy is -inf, not a finite number", id="-Infinity"),
    pytest.param("test_accuracy", "1e400", "test_accuracy is inf, not a finite number", id="1e400"),
    pytest.param(
        "test_accuracy", "1e308", "test_accuracy is 1e+308, outside its range [0, 1] in params.yaml", id="1e308"
    ),
    pytest.param(
        "test_cross_entropy", "-0.5", "test_cross_entropy is -0.5, outside its range [0, null]", id="negative-loss"
    ),
]


def metrics_text(metric: str, token: str) -> str:
    """BASE_METRICS as JSON text with ``metric``'s value replaced by the raw JSON ``token``."""
    return json.dumps({**BASE_METRICS, metric: "@"}).replace('"@"', token)


def assert_short_bad_input(result: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert_bad_input(result, phrase)
    # One short reason: never the offending value itself, nor a traceback.
    assert len(result.stderr) < 400, result.stderr


@pytest.mark.parametrize(("metric", "token", "phrase"), UNCOMPARABLE)
def test_an_uncomparable_current_value_is_bad_input(repo, metric, token, phrase):
    write_metrics(repo, metrics_text(metric, token))
    assert_short_bad_input(run_check(repo), phrase)


@pytest.mark.parametrize(("metric", "token", "phrase"), [UNCOMPARABLE[0], UNCOMPARABLE[2], UNCOMPARABLE[3]])
def test_an_uncomparable_baseline_value_is_bad_input(repo, tmp_path, metric, token, phrase):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(metrics_text(metric, token), encoding="utf-8")
    assert_short_bad_input(run_check(repo, "--baseline-file", str(baseline)), phrase)
    git(repo, "switch", "-q", "main")
    write_metrics(repo, metrics_text(metric, token))
    commit_all(repo, "a broken metrics file on main")
    git(repo, "switch", "-q", "feature")
    assert_short_bad_input(run_check(repo, "--rev", "main"), phrase)


# ---------------------------------------------------------------------------------------------
# The GitHub Actions workflow.


def load_workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def steps() -> list[dict]:
    return load_workflow()["jobs"]["metrics-gate"]["steps"]


def step_index(predicate) -> int:
    matches = [index for index, step in enumerate(steps()) if predicate(step)]
    assert len(matches) == 1, matches
    return matches[0]


def gate_step() -> dict:
    return steps()[step_index(lambda step: "pipeline.check --rev" in step.get("run", ""))]


def test_workflow_runs_on_pull_requests_and_has_its_steps_in_order():
    workflow = load_workflow()
    # YAML 1.1 reads the key `on` as the boolean true.
    triggers = workflow.get("on", workflow.get(True))
    assert "pull_request" in triggers and triggers["push"] == {"branches": ["main"]}
    job = workflow["jobs"]["metrics-gate"]
    assert job["env"]["MNIST_MIRROR"] == "${{ vars.MNIST_MIRROR }}"

    checkout = step_index(lambda step: step.get("uses", "").startswith("actions/checkout@"))
    assert steps()[checkout]["with"]["fetch-depth"] == 0
    python = step_index(lambda step: step.get("uses", "").startswith("actions/setup-python@"))
    assert steps()[python]["with"]["python-version-file"] == ".python-version"
    install = step_index(lambda step: step.get("run", "").strip() == "uv sync --locked")
    cache = step_index(lambda step: step.get("uses", "").startswith("actions/cache@"))
    assert steps()[cache]["with"]["path"] == ".dvc/cache"
    assert "hashFiles('dvc.lock')" in steps()[cache]["with"]["key"]
    repro = step_index(lambda step: step.get("run", "").strip() == "uv run --locked dvc repro")
    gate = step_index(lambda step: "pipeline.check --rev" in step.get("run", ""))
    promote = step_index(lambda step: "--promote" in step.get("run", ""))
    assert checkout < python < install < cache < repro < gate < promote
    assert promote == len(steps()) - 1
    # Pull requests are gated against their base branch; only main's pushes move the champion.
    assert steps()[gate]["if"] == "github.event_name == 'pull_request'"
    assert steps()[promote]["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert "--champion" in steps()[promote]["run"] and "continue-on-error" not in steps()[promote]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ vars.MLFLOW_TRACKING_URI }}"
    # The server's credentials come from the repository's secrets, never from the readable URI variable.
    assert job["env"]["MLFLOW_TRACKING_PASSWORD"] == "${{ secrets.MLFLOW_TRACKING_PASSWORD }}"

    gate_run = steps()[gate]["run"]
    assert '--summary-file "$GITHUB_STEP_SUMMARY"' in gate_run
    assert '--rev "origin/$BASE_REF"' in gate_run
    assert steps()[gate]["env"]["BASE_REF"] == "${{ github.base_ref }}"
    # The job must fail when the gate does, so nothing may swallow its exit code.
    assert "continue-on-error" not in steps()[gate] and "||" not in gate_run


def github_expressions(text: str) -> str:
    """Stand in for what GitHub substitutes into a pull request's job, with main as the base branch."""
    text = text.replace("${{ github.base_ref }}", "main").replace("${{ vars.MNIST_MIRROR }}", "")
    text = text.replace("${{ vars.MLFLOW_TRACKING_URI }}", "")
    text = text.replace("${{ secrets.MLFLOW_TRACKING_USERNAME }}", "").replace(
        "${{ secrets.MLFLOW_TRACKING_PASSWORD }}", ""
    )
    assert "${{" not in text, text
    return text


@pytest.fixture
def pull_request(tmp_path: Path) -> Path:
    """A clone of a repository whose main has committed metrics, checked out on a pull request's branch."""
    upstream = new_repo(tmp_path / "upstream")
    write_metrics(upstream, BASE_METRICS)
    commit_all(upstream, "baseline pipeline run")
    clone = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(upstream), str(clone))
    git(clone, "config", "user.name", "Test")
    git(clone, "config", "user.email", "test@example.com")
    git(clone, "switch", "-q", "-c", "pull-request")
    return clone


def run_gate_step(checkout: Path, summary: Path) -> subprocess.CompletedProcess[str]:
    step = gate_step()
    job_env = load_workflow()["jobs"]["metrics-gate"]["env"]
    env = check_env(
        GITHUB_STEP_SUMMARY=str(summary),
        # `python` in the step must be this project's interpreter, as after setup-python and pip install.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **{key: github_expressions(str(value)) for key, value in {**job_env, **step.get("env", {})}.items()},
    )
    script = checkout.parent / "gate-step.sh"
    script.write_text(github_expressions(step["run"]), encoding="utf-8")
    # GitHub runs a `run:` step without an explicit shell as `bash -e {0}`.
    return subprocess.run(
        ["bash", "-e", str(script)], check=False, cwd=checkout, env=env, capture_output=True, text=True, timeout=60
    )


def test_workflow_gate_step_writes_the_table_to_the_step_summary(pull_request, tmp_path):
    write_metrics(pull_request, BETTER_METRICS)
    commit_all(pull_request, "better model")
    summary = tmp_path / "step_summary.md"
    result = run_gate_step(pull_request, summary)
    assert result.returncode == 0, result.stderr
    text = summary.read_text(encoding="utf-8")
    origin_main = git(pull_request, "rev-parse", "origin/main")
    assert text.startswith(
        f"### ✅ Metric check passed: 3 of 3 metrics within their rules, against origin/main ({origin_main[:7]})"
    )
    assert check.TABLE_HEADER in text
    assert "| `test_accuracy` | 0.9213 | 0.93 | +0.0087 |" in text


def test_workflow_gate_step_fails_the_job_on_a_regression(pull_request, tmp_path):
    # Like `dvc repro` in CI, the worse metrics are in the working tree, not committed.
    write_metrics(pull_request, WORSE_METRICS)
    summary = tmp_path / "step_summary.md"
    result = run_gate_step(pull_request, summary)
    assert result.returncode == 1
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("### ❌ Metric check failed")
    assert "| `test_accuracy` | 0.9213 | 0.8 | -0.1213 |" in text


def test_render_promotion_names_the_new_and_the_former_champion():
    assert check.render_promotion(check.Promotion("mnist-softmax", "3", "1")) == (
        "🏆 Promoted mnist-softmax version 3 to `models:/mnist-softmax@champion`; version 1, the former champion, "
        "is now `models:/mnist-softmax@previous`.\n\n"
    )
    assert "(there was no champion)" in check.render_promotion(check.Promotion("mnist-softmax", "1"))
    refused = check.Promotion("mnist-softmax", reason="the metrics broke their rules")
    assert not refused.promoted
    assert check.render_promotion(refused) == "Not promoted: the metrics broke their rules.\n\n"
    report = json.loads(render_json([], Baseline("x", {}), promotion=refused))
    assert report["promotion"] == {
        "model": "mnist-softmax",
        "version": None,
        "previous": None,
        "promoted": False,
        "reason": "the metrics broke their rules",
    }


def test_promotion_needs_a_store_that_exists(repo):
    # The repository has metrics but no pipeline run, so no MLflow store to promote in.
    result = run_check(repo, "--promote")
    assert result.returncode == 2
    assert "does not exist yet; run the pipeline first" in " ".join(result.stderr.split())


def test_a_registry_that_refuses_the_credentials_is_bad_input(repo):
    from test_tracking_server import FakeServer

    # Health checks pass and every API call answers 401, as MLflow's basic-auth app does for a wrong password.
    server = FakeServer(health_status=200, other_status=401)
    try:
        result = run_check(
            repo, "--champion", MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME="someone",
            MLFLOW_TRACKING_PASSWORD="wrong",
        )  # fmt: skip
    finally:
        server.close()
    assert_bad_input(result, f"the MLflow registry at {server.url} failed", "failed with error code 401")


# ---------------------------------------------------------------------------------------------
# Whatever a baseline file or a metrics file holds, the gate gives a verdict (0, 1) or bad input (2).

PROJECT_RULES = load_params(ROOT / "params.yaml").check
# Metric values as JSON can hold them, with the edges most likely to break a comparison.
EDGES = st.sampled_from([0, -0.0, 1e-320, 1e308, -1e308, 2**53 + 1, 10**400, math.nan, math.inf, -math.inf])
VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | EDGES
JSON = st.recursive(
    VALUES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
NAMES = st.sampled_from([*PROJECT_RULES, "per_class_recall", "environment", "a:test_accuracy", ""])


def gate(baseline: dict | None, current: dict) -> int:
    """The gate after its reading: compare and render, returning its exit code (2 for CheckError)."""
    try:
        rows = compare(baseline, current, PROJECT_RULES)
    except CheckError as error:
        assert str(error)
        return check.EXIT_BAD_INPUT
    base = Baseline("the baseline", baseline)
    environment = environment_difference(baseline, current)
    render_markdown(rows, base, environment)
    json.loads(render_json(rows, base, environment))
    return check.exit_code(rows)


@settings(max_examples=300, deadline=None)
@given(metric=NAMES, value=JSON, side=st.sampled_from(["baseline", "current"]))
def test_any_metric_value_gives_a_verdict_or_bad_input(metric, value, side):
    changed = {**BASE_METRICS, metric: value}
    baseline, current = (changed, BASE_METRICS) if side == "baseline" else (BASE_METRICS, changed)
    assert gate(baseline, current) in (0, 1, 2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=JSON.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=64))
def test_any_baseline_file_gives_a_verdict_or_bad_input(tmp_path, content):
    path = tmp_path / "baseline.json"
    path.write_bytes(content)
    try:
        baseline = check.read_baseline_file(path)
    except CheckError as error:
        assert str(path) in str(error)
        return
    assert gate(baseline.metrics, BASE_METRICS) in (0, 1, 2)
