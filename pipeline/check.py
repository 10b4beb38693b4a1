"""Metric-regression gate: fail CI when a change makes the model's metrics worse than allowed.

DVC reads the metrics of every metrics file dvc.yaml declares: the current ones from the working
tree, the baseline from a git revision (or a JSON file, ``--baseline-file``). This module adds only
the rules DVC lacks, from params.yaml's ``check`` section; they name metrics as ``dvc metrics show``
does (``per_class_recall.3``). It prints a Markdown report, or JSON with ``--json``, appends the
Markdown to ``--summary-file`` (default ``$GITHUB_STEP_SUMMARY``), and exits 0 when every rule
holds, 1 on a regression and 2 on bad input, including any value the rules cannot compare.

    python -m pipeline.check                      # against the merge base with main
    python -m pipeline.check --rev origin/main    # against another revision
    python -m pipeline.check --baseline-file old/metrics.json --json
    python -m pipeline.check --champion --promote # against the registry's champion; promote if it holds

With ``--champion`` the baseline is the metrics of the registered model's ``champion`` version (those
its run recorded), read from the MLflow registry the pipeline logs to. With ``--promote``, when
every rule holds, the model in the working tree (the ``type: model`` artifact dvc.yaml declares,
found in the registry by its SHA-256) becomes the champion and the former champion ``previous``.
Neither the champion nor the version to promote may lack a metric that a rule names (bad input).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import dropwhile
from pathlib import Path, PurePath
from typing import Any

import dvc.api
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.utils.flatten import flatten
from dvc.utils.serialize import ParseError

from pipeline import files
from pipeline.cli import PipelineError, redact, run
from pipeline.params import CheckRule, TrackingSettings, load_params, tracking_settings
from pipeline.tracking import record, registry, store

MAIN_BRANCHES = ("main", "origin/main")
EXIT_PASS, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
# Metrics are differences of floats that print as round numbers (0.9213 - 0.9193 is
# 0.0020000000000000018), so a change exactly at max_worsening must not fail on rounding noise.
TOLERANCE = 1e-9
TABLE_HEADER = "| metric | baseline | current | change | rule | verdict |"
# The train stage records the versions it ran with under this key of its metrics file. They are
# strings, which DVC keeps (it drops only lists and nulls), so they arrive with the metrics.
ENVIRONMENT = "environment"
ENVIRONMENT_NAMES = {"uv_lock_sha256": "uv.lock changed", "cpu": "the baseline came from another CPU ({old})"}


class CheckError(PipelineError):
    """The gate cannot run: a metrics file, value, revision or rule is unusable."""


@dataclass(frozen=True)
class Row:
    """One checked metric: its values, its rule and why it failed (no reasons means it passed)."""

    metric: str
    baseline: float | None
    current: float
    rule: CheckRule
    failures: tuple[str, ...] = ()
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def change(self) -> float | None:
        return None if self.baseline is None else self.current - self.baseline


@dataclass(frozen=True)
class Baseline:
    """The baseline metrics (None when there are none) and where they came from, for the report."""

    label: str
    metrics: dict[str, Any] | None
    missing_reason: str = ""
    rev: str | None = None
    commit: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Promotion:
    """What ``--promote`` did: the candidate's version, the former champion's, or why nothing moved."""

    model: str
    version: str | None = None
    previous: str | None = None
    reason: str = ""

    @property
    def promoted(self) -> bool:
        return not self.reason


# ---------------------------------------------------------------------------------------------
# Pure functions: finding metrics, comparing and rendering.


def _is_number(value: Any) -> bool:
    # JSON true/false load as bool, a subclass of int, and are never a metric.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _name(key: str) -> str:
    # When two metrics files hold the same top-level key, DVC names each "<file>:<key>".
    return key.partition(":")[2] or key


def _missing(metric: str, metrics: dict[str, Any]) -> str:
    # Only numbers are metrics: the environment's strings must neither be suggested nor listed.
    numbers = sorted({_name(key) for key, value in metrics.items() if _is_number(value)})
    group = [name for name in numbers if name.startswith(f"{metric}.")]
    if group:
        return f"{metric} is a group of metrics, not one; name one of them, like {group[0]}"
    if any(_name(key).startswith(f"{metric}.") for key in metrics):
        return f"{metric} holds text, not metrics"
    close = difflib.get_close_matches(metric, numbers, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"it has {', '.join(numbers) or 'no metrics'}"
    return f"{metric} is not in it ({hint})"


def comparable(metric: str, value: Any, rule: CheckRule) -> float:
    """``value`` as a float the rules can compare.

    Raises CheckError when it is not a finite number within ``rule.range``.
    """
    if not _is_number(value):
        raise CheckError(f"{metric} is {value!r}, not a number")
    try:
        number = float(value)
    except OverflowError:
        raise CheckError(f"{metric} is a {len(str(abs(value)))}-digit number, too large to compare") from None
    if not math.isfinite(number):
        raise CheckError(f"{metric} is {number}, not a finite number")
    low, high = rule.range or (None, None)
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = ", ".join("null" if end is None else _number(end) for end in (low, high))
        raise CheckError(f"{metric} is {_number(number)}, outside its range [{bounds}] in params.yaml")
    return number


def find_metric(metrics: dict[str, Any], metric: str, rule: CheckRule, required: bool) -> float | None:
    """``metric``'s value in flat ``metrics``, from whichever metrics file holds it; None if none does."""
    found = {key: value for key, value in metrics.items() if metric in (key, _name(key))}
    if len({repr(value) for value in found.values()}) > 1:
        held = ", ".join(f"{key.partition(':')[0]} has {value!r}" for key, value in found.items())
        raise CheckError(f"{metric} differs between the metrics files ({held}); rename one of them")
    if not found and required:
        raise CheckError(_missing(metric, metrics))
    return comparable(metric, next(iter(found.values())), rule) if found else None


def find_metrics(metrics: dict[str, Any], rules: dict[str, CheckRule], source: str, required: bool) -> dict[str, float]:
    """Every rule's value in ``metrics`` (a ``required`` source must hold all).

    Raises one CheckError that lists every problem.
    """
    values, problems = {}, []
    for metric, rule in rules.items():
        try:
            values[metric] = find_metric(metrics, metric, rule, required)
        except CheckError as problem:
            problems.append(str(problem))
    if problems:
        raise CheckError(
            f"the check rules in params.yaml name metrics that cannot be checked against {source}: "
            f"{'; '.join(problems)}. Fix the rule in params.yaml or rerun the pipeline (dvc repro)."
        )
    return {metric: value for metric, value in values.items() if value is not None}


def check_metric(metric: str, baseline: float | None, current: float, rule: CheckRule) -> Row:
    """Check one metric against its rule; ``baseline`` None means there is nothing to compare with."""
    failures = []
    if baseline is not None:
        worsening = baseline - current if rule.better == "higher" else current - baseline
        if not math.isfinite(worsening):
            # Two finite values near the largest float can still differ by more than it.
            raise CheckError(f"the change in {metric} from {baseline} to {current} is too large to compute.")
        if worsening > rule.max_worsening + TOLERANCE:
            direction = "fell" if rule.better == "higher" else "rose"
            failures.append(f"{direction} by {_number(worsening)}, more than the {_number(rule.max_worsening)} allowed")
    if rule.floor is not None and current < rule.floor:
        failures.append(f"below the floor of {_number(rule.floor)}")
    if rule.ceiling is not None and current > rule.ceiling:
        failures.append(f"above the ceiling of {_number(rule.ceiling)}")
    return Row(metric, baseline, current, rule, tuple(failures), "" if baseline is not None else "no baseline")


def compare(baseline: dict[str, Any] | None, current: dict[str, Any], rules: dict[str, CheckRule]) -> list[Row]:
    """Check every rule, in params.yaml's order, comparing ``current`` with ``baseline`` (None: no baseline).

    Both may be nested or already flat. A metric the baseline lacks (one added by this change) is
    checked against its floor and ceiling only. Raises CheckError when a rule cannot be checked.
    """
    now = find_metrics(flatten(current), rules, "the current metrics", required=True)
    old = None if baseline is None else find_metrics(flatten(baseline), rules, "the baseline", required=False)
    rows = [check_metric(metric, (old or {}).get(metric), now[metric], rule) for metric, rule in rules.items()]
    new = "new metric, not in the baseline"
    return [replace(row, note=new) if old is not None and row.baseline is None else row for row in rows]


def environment_difference(baseline: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """One sentence naming what differs between the environments, None when nothing does or one has none.

    An older baseline without an environment has nothing to compare. The environment is
    information for the reader and never fails the gate.
    """
    prefix = f"{ENVIRONMENT}."
    old, new = (
        {k.removeprefix(prefix): v for k, v in flatten(m or {}).items() if k.startswith(prefix)}
        for m in (baseline, current)
    )
    changes = [
        ENVIRONMENT_NAMES[key].format(old=old.get(key, "(none)"))
        if key in ENVIRONMENT_NAMES
        else f"{key} {old.get(key, '(none)')} → {new.get(key, '(none)')}"
        for key in dict.fromkeys([*old, *new])
        if old.get(key) != new.get(key)
    ]
    return f"Environment differs from the baseline's: {', '.join(changes)}." if old and new and changes else None


def overall_status(rows: list[Row]) -> str:
    return "pass" if all(row.passed for row in rows) else "fail"


def exit_code(rows: list[Row]) -> int:
    return EXIT_PASS if overall_status(rows) == "pass" else EXIT_REGRESSION


def _number(value: float | None, signed: bool = False) -> str:
    # Six significant digits show a 0.0001 change in an accuracy of 0.92 without float noise.
    if value is None:
        return "—"
    return "0" if value == 0 else format(value, "+.6g" if signed else ".6g")


def describe_rule(rule: CheckRule) -> str:
    """Say a rule in words, e.g. 'higher is better, may fall ≤ 0.002, floor 0.915'."""
    move = "fall" if rule.better == "higher" else "rise"
    bounds = [
        f"{name} {_number(value)}"
        for name, value in (("floor", rule.floor), ("ceiling", rule.ceiling))
        if value is not None
    ]
    return ", ".join([f"{rule.better} is better", f"may {move} ≤ {_number(rule.max_worsening)}", *bounds])


def verdict(row: Row) -> str:
    if row.failures:
        return "❌ fail: " + "; ".join(row.failures)
    return f"✅ pass ({row.note})" if row.note else "✅ pass"


def summary_line(rows: list[Row], baseline: Baseline | None = None) -> str:
    """The one-line heading above the table: the overall verdict and what it was compared with."""
    failed = [row.metric for row in rows if not row.passed]
    head = f"### ✅ Metric check passed: {len(rows)} of {len(rows)} metrics within their rules"
    if failed:
        head = (
            f"### ❌ Metric check failed: {len(failed)} of {len(rows)} metrics broke their rules ({', '.join(failed)})"
        )
    if baseline is None:
        return head
    if baseline.missing_reason:
        return f"{head}; no baseline, as {baseline.missing_reason}, so only floors and ceilings were checked"
    return f"{head}, against {baseline.label}"


def _cell(text: str) -> str:
    # A pipe would end the cell early; a newline would end the table.
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[Row], baseline: Baseline | None = None, environment: str | None = None) -> str:
    """Render the summary line, the environment's difference if any, and a Markdown table of ``rows``."""
    lines = [summary_line(rows, baseline), ""]
    if environment:
        lines += [environment, ""]
    lines += [TABLE_HEADER, "|---|--:|--:|--:|---|---|"]
    for row in rows:
        cells = [f"`{row.metric}`", _number(row.baseline), _number(row.current), _number(row.change, signed=True)]
        cells += [describe_rule(row.rule), verdict(row)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n\n"


def _json_number(value: float | None) -> float | None:
    # Rounding drops float noise such as -0.12129999999999996.
    return None if value is None else round(value, 12)


def render_json(
    rows: list[Row],
    baseline: Baseline | None = None,
    environment: str | None = None,
    promotion: Promotion | None = None,
) -> str:
    """Render the rows, the overall status, the baseline's origin and the environment's difference as JSON."""
    baseline = baseline or Baseline("the baseline", {})
    report = {
        "status": overall_status(rows),
        # Where the baseline came from (rev, commit, path), null for what does not apply, but not its metrics.
        "baseline": {key: value or None for key, value in asdict(baseline).items() if key != "metrics"}
        | {"found": baseline.metrics is not None},
        "environment_difference": environment,
        "metrics": [
            {
                "metric": row.metric,
                "baseline": _json_number(row.baseline),
                "current": _json_number(row.current),
                "change": _json_number(row.change),
                "rule": asdict(row.rule),
                "status": "pass" if row.passed else "fail",
                "reasons": list(row.failures),
                "note": row.note or None,
            }
            for row in rows
        ],
    }
    if promotion is not None:
        report["promotion"] = {**asdict(promotion), "promoted": promotion.promoted, "reason": promotion.reason or None}
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def render_promotion(promotion: Promotion) -> str:
    """One Markdown line saying which version became the champion, or why none did."""
    if not promotion.promoted:
        return f"Not promoted: {promotion.reason}.\n\n"
    champion = f"`{registry.alias_uri(promotion.model, registry.CHAMPION)}`"
    if promotion.previous is None:
        return f"🏆 Promoted {promotion.model} version {promotion.version} to {champion} (there was no champion).\n\n"
    previous = f"`{registry.alias_uri(promotion.model, registry.PREVIOUS)}`"
    return (
        f"🏆 Promoted {promotion.model} version {promotion.version} to {champion}; "
        f"version {promotion.previous}, the former champion, is now {previous}.\n\n"
    )


def render_error(message: str) -> str:
    """The Markdown appended to the summary file when the gate cannot run, so the run page says why."""
    return f"### ⚠️ Metric check could not run\n\n{' '.join(redact(message).split())}\n\n"


# ---------------------------------------------------------------------------------------------
# Reading: DVC reads the metrics; git only names the baseline's commit.


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn every way ``what`` can be unreadable into a CheckError; a missing file's FileNotFoundError passes."""
    try:
        yield
    except FileNotFoundError:
        raise
    except RecursionError:
        raise CheckError(f"cannot read {what}: its JSON nests too deeply to parse.") from None
    except ParseError as error:
        # DVC names the file relative to the working directory as if the repository's root were
        # "/" (../../metrics/metrics.json), so dropping the leading ".." leaves its repository path.
        path = PurePath(*dropwhile(lambda part: part == "..", PurePath(error.path).parts)).as_posix()
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        raise CheckError(f"cannot read {what}: {str(error).replace(error.path, path)}{cause}.") from None
    except (DvcException, OSError, ValueError) as error:
        # ValueError also covers bytes that are not UTF-8 and numbers of more than 4,300 digits.
        raise CheckError(f"cannot read {what}: {error}.") from None


def read_metrics(rev: str | None = None) -> dict[str, Any]:
    """Every metric in the metrics files dvc.yaml declares, at ``rev`` (None: the working tree), flattened."""
    root = Repo.find_root()
    if rev is None:
        # DVC reads a metrics file whole, and waits forever on a FIFO: in the working tree, where
        # one can be a FIFO or a link to /dev/zero, each must pass the bounded reader first.
        with Repo(root) as repo:
            paths = [out.fs_path for stage in repo.index.stages for out in stage.outs if out.metric]
        for path in paths:
            try:
                files.read_bytes(path)
            except FileNotFoundError:
                pass  # DVC names a missing metrics file itself.
            except OSError as error:
                raise OSError(f"{os.path.relpath(path, root)}: {error}") from None
    return flatten(dvc.api.metrics_show(repo=root, rev=rev))


def _git(*args: str) -> str | None:
    """The output of a git command, None when it fails (an unknown revision, no shared history)."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise CheckError("git is not installed or not on PATH; install it or pass --baseline-file.") from None
    return result.stdout.strip() if result.returncode == 0 else None


def baseline_from_git(rev: str | None) -> Baseline:
    """Read the baseline metrics with DVC at ``rev`` (None: the merge base of HEAD with main, else HEAD)."""
    # rev stays None for the default, so scripts reading --json can tell the two apart.
    if rev is not None:
        commit = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
        if commit is None:
            raise CheckError(
                f"unknown git revision {rev!r}: no branch, tag or commit by that name. In CI, check out "
                "the full history (actions/checkout with fetch-depth: 0) so the base branch exists."
            )
        label = rev if commit.startswith(rev) else f"{rev} ({commit[:7]})"
    elif (commit := _git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")) is None:
        return Baseline("HEAD", None, "HEAD has no commits yet")
    else:
        # Without a main branch the last commit is the best baseline: the gate then catches a working
        # tree that makes the committed metrics worse.
        label = f"HEAD ({commit[:7]}), as there is no merge base with main"
        for branch in MAIN_BRANCHES:
            if base := _git("merge-base", "HEAD", branch):
                commit, label = base, f"the merge base with {branch} ({base[:7]})"
                break
    try:
        with reading(f"the baseline metrics at {label}"):
            metrics = read_metrics(commit)
    except FileNotFoundError as error:
        return Baseline(label, None, f"{error.filename} does not exist at {label}", rev=rev, commit=commit)
    if not metrics:
        return Baseline(label, None, f"dvc.yaml declares no metrics at {label}", rev=rev, commit=commit)
    return Baseline(label, metrics, rev=rev, commit=commit)


def read_baseline_file(path: Path) -> Baseline:
    """A JSON object of metrics, such as a copy of a metrics file or what dvc.api.metrics_show returns."""
    try:
        with reading(f"the baseline file {path}"):
            data = json.loads(files.read_bytes(path).decode("utf-8"))
            metrics = flatten(data) if isinstance(data, dict) else None
    except FileNotFoundError:
        raise CheckError(f"the baseline file {path} does not exist; pass an existing metrics file.") from None
    if metrics is None:
        raise CheckError(f"the baseline file {path} must hold a JSON object of metrics, got {type(data).__name__}.")
    return Baseline(str(path), metrics, path=str(path))


def append_summary(path: str, markdown: str) -> None:
    try:
        # Opened without blocking, because opening a FIFO that nothing reads would wait forever;
        # then written normally.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        os.set_blocking(descriptor, True)
        with open(descriptor, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as error:
        reason = "it is a FIFO that nothing reads" if error.errno == errno.ENXIO else error.strerror or error
        raise CheckError(f"cannot append the report to the summary file {path}: {reason}") from None


# ---------------------------------------------------------------------------------------------
# The registry: the champion's metrics as a baseline, and promotion.


@contextmanager
def registry_access(uri: str) -> Iterator[None]:
    """Turn MLflow's failures into a CheckError naming the store."""
    import mlflow

    try:
        yield
    except mlflow.exceptions.MlflowException as error:
        raise CheckError(f"the MLflow registry at {redact(uri)} failed: {store.short(error.message)}") from None


def open_registry(tracking: TrackingSettings) -> tuple[Any, str]:
    """A client of the store the pipeline logs to ($MLFLOW_TRACKING_URI, or mlflow.db), and its URI."""
    uri = store.tracking_uri(tracking.uri, store.store_root())
    store.check_reachable(uri)
    store.require_existing(uri)
    import mlflow

    return mlflow.MlflowClient(uri), uri


def recorded_metrics(client, version, label: str, rules: dict[str, CheckRule]) -> tuple[dict[str, Any], Any]:
    """The final metrics a version's run recorded (train logs those the rules name: pipeline.score), and the run.

    They live in the store itself, not in artifact files, so nothing but the store can take them
    away. A version without a metric that a rule names could never be compared with: bad input,
    never a check of floors alone.
    """
    run = client.get_run(version.run_id)
    metrics = {key: value for key, value in run.data.metrics.items() if not key.startswith(record.HISTORY_PREFIX)}
    if missing := [metric for metric in rules if metric not in metrics]:
        raise CheckError(
            f"{label}, run {str(version.run_id)[:7]}, recorded no {', '.join(missing)}, which the check rules need, "
            "so it can be neither the baseline nor the champion. This happens to a version registered by an older "
            "pipeline, which left these metrics to the report stage, when DVC restored that stage from its cache. "
            "Retrain with this "
            "pipeline (dvc repro -f train registers a version that has them) and promote that version against the "
            "committed metrics: mnist-check --promote."
        )
    return metrics, run


def baseline_from_champion(client, uri: str, name: str, rules: dict[str, CheckRule]) -> Baseline:
    """The metrics the champion's run recorded, and its environment from the run's tags."""
    label = registry.alias_uri(name, registry.CHAMPION)
    with registry_access(uri):
        version = registry.version_by_alias(client, name, registry.CHAMPION)
        if version is None:
            return Baseline(label, None, f"{name} has no champion yet in {redact(uri)}")
        label = f"{label} (version {version.version}, run {str(version.run_id)[:7]})"
        metrics, run = recorded_metrics(client, version, f"the champion, version {version.version} of {name}", rules)
    environment_tags = {
        key.removeprefix("env."): value for key, value in run.data.tags.items() if key.startswith("env.")
    }
    metrics.update(flatten({ENVIRONMENT: environment_tags}))
    return Baseline(label, metrics)


def model_artifact() -> Path:
    """The file of the one ``type: model`` artifact dvc.yaml declares."""
    root = Path(Repo.find_root())
    with reading("dvc.yaml's artifacts"), Repo(str(root)) as repo:
        models = [
            root / Path(dvcfile).parent / artifact.path
            for dvcfile, artifacts in repo.artifacts.read().items()
            for artifact in artifacts.values()
            if artifact.type == "model"
        ]
    if len(models) != 1:
        raise CheckError(
            f"--promote needs exactly one artifact of type model in dvc.yaml to know which model to promote, "
            f"found {len(models)}."
        )
    return models[0]


def promote(client, uri: str, name: str, model_path: Path, rules: dict[str, CheckRule]) -> Promotion:
    """Make the registry's version of the file at ``model_path`` the champion, if it has every rule's metric."""
    try:
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise CheckError(f"{model_path} does not exist; run the pipeline first (dvc repro).") from None
    with registry_access(uri):
        version = registry.version_of_model(client, name, digest)
        if version is None:
            raise CheckError(
                f"{model_path.name} (SHA-256 {digest[:12]}…) is no version of {name} in {redact(uri)}: it was trained "
                "against another tracking store. Rerun the train stage against this one (dvc repro -f train)."
            )
        number = str(version.version)
        recorded_metrics(client, version, f"version {number} of {name} ({model_path.name})", rules)
        current = registry.version_by_alias(client, name, registry.CHAMPION)
        if current is not None and str(current.version) == number:
            return Promotion(name, number, reason=f"version {number} already is the champion")
        previous = registry.promote(client, name, number)
    return Promotion(name, number, previous)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check",
        description="Compare the metrics files dvc.yaml declares with a baseline, using the rules in params.yaml's "
        "check section. Exits 0 when every rule holds, 1 on a regression, 2 on bad input.",
    )
    parser.add_argument("--params", type=Path, help="the rules' params file (default: $PIPELINE_PARAMS or params.yaml)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rev", help="baseline git revision (default: merge base of HEAD and main, else HEAD)")
    source.add_argument("--baseline-file", type=Path, help="a JSON file of baseline metrics, instead of git")
    source.add_argument(
        "--champion",
        action="store_true",
        help="baseline: the metrics of the registered model's champion, from the MLflow registry, instead of git",
    )
    parser.add_argument(
        "--promote",
        action="store_true",
        help="when every rule holds, make the working tree's model the registered model's champion "
        "(the former champion becomes 'previous')",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument(
        "--summary-file",
        default=os.environ.get("GITHUB_STEP_SUMMARY", ""),
        help="also append the Markdown report to this file; an empty value appends nowhere "
        "(default: $GITHUB_STEP_SUMMARY when set)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the gate and return its exit code; raises PipelineError on bad input."""
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        rules = params.check
        if not rules:
            raise CheckError(
                "params.yaml has no rules in its check section, so the gate would check nothing; "
                "add one per metric, e.g. test_accuracy: {better: higher, max_worsening: 0.002}."
            )
        try:
            with reading("the current metrics"):
                current = read_metrics()
        except FileNotFoundError as error:
            raise CheckError(f"{error.filename} does not exist; run the pipeline first (dvc repro).") from None
        if not current:
            raise CheckError("DVC finds no metrics; declare the metrics files in dvc.yaml and run dvc repro.")
        client, uri, name = None, "", ""
        if args.champion or args.promote:
            tracking = tracking_settings()
            client, uri = open_registry(tracking)
            name = tracking.registered_model
        if args.baseline_file:
            baseline = read_baseline_file(args.baseline_file)
        elif args.champion:
            baseline = baseline_from_champion(client, uri, name, rules)
        else:
            baseline = baseline_from_git(args.rev)
        rows = compare(baseline.metrics, current, rules)
        promotion = None
        if args.promote:
            model_path = model_artifact()
            if exit_code(rows) == EXIT_PASS:
                promotion = promote(client, uri, name, model_path, rules)
            else:
                promotion = Promotion(name, reason="the metrics broke their rules")
    except PipelineError as error:
        if args.summary_file:
            try:
                append_summary(args.summary_file, render_error(str(error)))
            except CheckError as summary_error:
                # The error that stopped the gate matters more than the summary that could not say so.
                raise CheckError(f"{error} (Also, {summary_error}.)") from None
        raise

    environment = environment_difference(baseline.metrics, current)
    markdown = render_markdown(rows, baseline, environment)
    if promotion is not None:
        markdown += render_promotion(promotion)
    # The report first: a summary file that cannot take it must not hide the verdict.
    sys.stdout.write(render_json(rows, baseline, environment, promotion) if args.json else markdown)
    sys.stdout.flush()
    if args.summary_file:
        append_summary(args.summary_file, markdown)
    return exit_code(rows)


def cli() -> None:
    """Entry point of ``mnist-check`` and ``python -m pipeline.check``: exits with the gate's code."""
    # A Windows console's code page has no ✅ or ❌; a replacement character beats a crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        run(lambda: sys.exit(main(sys.argv[1:])), error_exit_code=EXIT_BAD_INPUT)
    except Exception:
        # Python exits 1 after an uncaught exception, which is the gate's code for a regression: a
        # crash (a bug, or input nothing checked yet) must never read as a verdict.
        traceback.print_exc()
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
