"""Metric-regression gate: fail CI when a change makes the model's metrics worse than allowed.

Reads the current metrics (``--metrics``, default ``metrics/metrics.json``), a baseline copy of the
same file (from a git revision with ``git show REV:<path>``, or from ``--baseline-file``) and the
rules in the ``check`` section of params.yaml (``--params``). Nested metrics are named with dots
(``per_class_recall.3``), as ``dvc metrics show`` names them.

Writes a Markdown report (a one-line summary and a table) to stdout, or JSON with ``--json``, and
appends the Markdown to ``--summary-file``, which defaults to ``$GITHUB_STEP_SUMMARY`` so that the
table shows up on the GitHub Actions run page. Writes nothing else.

Exits 0 when every rule holds, 1 when any metric regressed, and 2 on bad input (a missing or
malformed metrics file, an unknown revision, a rule for a metric that does not exist, bad params).
When the baseline revision has no metrics file, for instance before the first pipeline run was
committed, there is nothing to regress from: the gate passes and says so, but still enforces every
floor and ceiling on the current values.

    python -m pipeline.check                      # against the merge base with main
    python -m pipeline.check --rev origin/main    # against another revision
    python -m pipeline.check --baseline-file old/metrics.json --json
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.cli import PipelineError, configure_logging, format_error
from pipeline.params import CheckRule, load_params

logger = logging.getLogger(__name__)

METRICS_FILE = Path("metrics/metrics.json")
MAIN_BRANCHES = ("main", "origin/main")
EXIT_PASS, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
# Metrics are differences of floats that print as round numbers (0.9213 - 0.9193 is
# 0.0020000000000000018), so a change exactly at max_worsening must not fail on rounding noise.
TOLERANCE = 1e-9
TABLE_HEADER = "| metric | baseline | current | change | rule | verdict |"


class CheckError(PipelineError):
    """The gate cannot run: a metrics file, revision or rule is unusable."""


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
        if self.baseline is None:
            return None
        return self.current - self.baseline


@dataclass(frozen=True)
class Baseline:
    """The baseline metrics (None when there are none) and where they came from, for the report."""

    label: str
    metrics: dict[str, Any] | None
    missing_reason: str = ""
    rev: str | None = None
    commit: str | None = None
    path: str | None = None


# ---------------------------------------------------------------------------------------------
# Pure functions: parsing, comparing and rendering.


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested objects into dotted names, so {"a": {"b": 1}} becomes {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def parse_metrics(text: str, source: str) -> dict[str, Any]:
    """Parse a metrics file's text into flat metrics, raising CheckError naming ``source`` if it is malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckError(f"{source} is not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise CheckError(f"{source} must hold a JSON object of metric names to values, got {type(data).__name__}.")
    return flatten(data)


def _is_number(value: Any) -> bool:
    # JSON true/false load as bool, a subclass of int, and are never a metric.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _missing_metric_problem(metric: str, metrics: dict[str, Any]) -> str:
    group = sorted(name for name in metrics if name.startswith(f"{metric}."))
    if group:
        return f"{metric} is a group of metrics, not one; name one of them, like {group[0]}"
    close = difflib.get_close_matches(metric, list(metrics), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"it has {', '.join(sorted(metrics)) or 'no metrics'}"
    return f"{metric} is not in it ({hint})"


def check_rule_names(current: dict[str, Any], rules: dict[str, CheckRule], source: str = "the current metrics") -> None:
    """Raise one CheckError listing every rule whose metric is missing from, or not a number in, ``current``."""
    problems = []
    for metric in rules:
        if metric not in current:
            problems.append(_missing_metric_problem(metric, current))
        elif not _is_number(current[metric]):
            problems.append(f"{metric} is {current[metric]!r}, not a number")
    if problems:
        raise CheckError(
            f"the check rules in params.yaml name metrics that cannot be checked against {source}: "
            f"{'; '.join(problems)}. Fix the rule's name in params.yaml or rerun the report stage."
        )


def check_metric(metric: str, baseline: float | None, current: float, rule: CheckRule) -> Row:
    """Check one metric against its rule; ``baseline`` None means there is nothing to compare with."""
    failures = []
    note = ""
    if not math.isfinite(current):
        # A NaN or infinite loss is what a diverged training run produces, so it is a regression of
        # the model rather than a malformed file.
        failures.append(f"current value is {current}, not a finite number")
    elif baseline is None:
        note = "no baseline"
    elif not math.isfinite(baseline):
        note = "baseline is not a finite number"
    else:
        worsening = baseline - current if rule.better == "higher" else current - baseline
        if worsening > rule.max_worsening + TOLERANCE:
            direction = "fell" if rule.better == "higher" else "rose"
            failures.append(f"{direction} by {_number(worsening)}, more than the {_number(rule.max_worsening)} allowed")
    if math.isfinite(current):
        if rule.floor is not None and current < rule.floor:
            failures.append(f"below the floor of {_number(rule.floor)}")
        if rule.ceiling is not None and current > rule.ceiling:
            failures.append(f"above the ceiling of {_number(rule.ceiling)}")
    return Row(metric, baseline, current, rule, tuple(failures), note)


def compare(
    baseline: dict[str, Any] | None,
    current: dict[str, Any],
    rules: dict[str, CheckRule],
    current_source: str = "the current metrics",
) -> list[Row]:
    """Check every rule, in params.yaml's order, comparing ``current`` with ``baseline`` (None: no baseline).

    Both may be nested or already flat. A metric the baseline lacks (one added by this change) is
    checked against its floor and ceiling only. Raises CheckError when a rule cannot be checked.
    """
    current = flatten(current)
    check_rule_names(current, rules, current_source)
    baseline = flatten(baseline) if baseline is not None else None
    rows = []
    for metric, rule in rules.items():
        old = None
        if baseline is not None and metric in baseline:
            old = baseline[metric]
            if not _is_number(old):
                raise CheckError(f"the baseline's {metric} is {old!r}, not a number; the baseline metrics file is malformed.")
        row = check_metric(metric, None if old is None else float(old), float(current[metric]), rule)
        if baseline is not None and metric not in baseline:
            row = replace(row, note="new metric, not in the baseline")
        rows.append(row)
    return rows


def overall_status(rows: list[Row]) -> str:
    return "pass" if all(row.passed for row in rows) else "fail"


def exit_code(rows: list[Row]) -> int:
    return EXIT_PASS if overall_status(rows) == "pass" else EXIT_REGRESSION


def _number(value: float | None, signed: bool = False) -> str:
    # Six significant digits show a 0.0001 change in an accuracy of 0.92 without float noise.
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    return format(value, "+.6g" if signed else ".6g")


def describe_rule(rule: CheckRule) -> str:
    """Say a rule in words, e.g. 'higher is better, may fall ≤ 0.002, floor 0.915'."""
    move = "fall" if rule.better == "higher" else "rise"
    parts = [f"{rule.better} is better", f"may {move} ≤ {_number(rule.max_worsening)}"]
    if rule.floor is not None:
        parts.append(f"floor {_number(rule.floor)}")
    if rule.ceiling is not None:
        parts.append(f"ceiling {_number(rule.ceiling)}")
    return ", ".join(parts)


def verdict(row: Row) -> str:
    if row.failures:
        return "❌ fail: " + "; ".join(row.failures)
    return f"✅ pass ({row.note})" if row.note else "✅ pass"


def summary_line(rows: list[Row], baseline: Baseline | None = None) -> str:
    """The one-line heading above the table: the overall verdict and what it was compared with."""
    failed = [row.metric for row in rows if not row.passed]
    if failed:
        head = f"### ❌ Metric check failed: {len(failed)} of {len(rows)} metrics broke their rules ({', '.join(failed)})"
    else:
        head = f"### ✅ Metric check passed: {len(rows)} of {len(rows)} metrics within their rules"
    if baseline is None:
        return head
    if baseline.missing_reason:
        return f"{head}; no baseline, as {baseline.missing_reason}, so only floors and ceilings were checked"
    return f"{head}, against {baseline.label}"


def _cell(text: str) -> str:
    # A pipe would end the cell early; a newline would end the table.
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[Row], baseline: Baseline | None = None) -> str:
    """Render the summary line and a Markdown table of ``rows``, ending with a blank line."""
    lines = [summary_line(rows, baseline), "", TABLE_HEADER, "|---|--:|--:|--:|---|---|"]
    for row in rows:
        cells = [
            f"`{row.metric}`",
            _number(row.baseline),
            _number(row.current),
            _number(row.change, signed=True),
            describe_rule(row.rule),
            verdict(row),
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n\n"


def _json_number(value: float | None) -> float | None:
    # Standard JSON has no NaN or Infinity; null keeps the output parseable by every tool, and the
    # row's reasons say what the value was. Rounding drops float noise such as -0.12129999999999996.
    return round(value, 12) if value is not None and math.isfinite(value) else None


def render_json(rows: list[Row], baseline: Baseline | None = None) -> str:
    """Render the rows, the overall status and the baseline's origin as JSON, for scripts."""
    baseline = baseline or Baseline("the baseline", {})
    report = {
        "status": overall_status(rows),
        "baseline": {
            "label": baseline.label,
            "rev": baseline.rev,
            "commit": baseline.commit,
            "path": baseline.path,
            "found": baseline.metrics is not None,
            "missing_reason": baseline.missing_reason or None,
        },
        "metrics": [
            {
                "metric": row.metric,
                "baseline": _json_number(row.baseline),
                "current": _json_number(row.current),
                "change": _json_number(row.change),
                "rule": {
                    "better": row.rule.better,
                    "max_worsening": row.rule.max_worsening,
                    "floor": row.rule.floor,
                    "ceiling": row.rule.ceiling,
                },
                "status": "pass" if row.passed else "fail",
                "reasons": list(row.failures),
                "note": row.note or None,
            }
            for row in rows
        ],
    }
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def render_error(message: str) -> str:
    """The Markdown appended to the summary file when the gate cannot run, so the run page says why."""
    return f"### ⚠️ Metric check could not run\n\n{' '.join(message.split())}\n\n"


# ---------------------------------------------------------------------------------------------
# Git: the only place that runs commands.


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    logger.debug("git %s", " ".join(args))
    try:
        return subprocess.run(["git", *args], capture_output=True, check=False)
    except FileNotFoundError:
        raise CheckError("git is not installed or not on PATH; install it or pass --baseline-file.") from None


def _git_stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "replace").strip()


def _commit(rev: str) -> str | None:
    """The full hash of the commit ``rev`` names, or None when it names none."""
    # A revision starting with "-" would be read as an option.
    if rev.startswith("-"):
        return None
    result = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return result.stdout.decode().strip() if result.returncode == 0 else None


def _repo_path(path: Path) -> str:
    """``path`` relative to the repository root, in the form ``git show REV:<path>`` expects."""
    result = _git("rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise CheckError(
            f"cannot read the baseline from git: {_git_stderr(result) or 'not a git repository'}. "
            "Run inside the project's git checkout, or compare with a file using --baseline-file."
        )
    root = Path(result.stdout.decode().strip()).resolve()
    # Resolve the directory only: the file itself may be missing at HEAD or be a symlink.
    absolute = path.absolute().parent.resolve() / path.name
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        raise CheckError(f"{path} is outside the git repository at {root}; pass --baseline-file instead.") from None


def default_revision() -> tuple[str | None, str]:
    """The merge base of HEAD with main (or origin/main), else HEAD: (commit or None, label)."""
    if _commit("HEAD") is None:
        return None, "HEAD"
    for branch in MAIN_BRANCHES:
        if _commit(branch) is None:
            continue
        result = _git("merge-base", "HEAD", branch)
        if result.returncode == 0:
            commit = result.stdout.decode().strip()
            return commit, f"the merge base with {branch} ({commit[:7]})"
    # Without a main branch (or with unrelated histories) the last commit is the best baseline: the
    # gate then catches a working tree that makes the committed metrics worse.
    commit = _commit("HEAD")
    return commit, f"HEAD ({commit[:7]}), as there is no merge base with main"


def baseline_from_git(rev: str | None, metrics_path: Path) -> Baseline:
    """Read the baseline metrics at ``rev`` (None: the default revision) with ``git show``."""
    relative = _repo_path(metrics_path)
    if rev is None:
        commit, label = default_revision()
        if commit is None:
            return Baseline("HEAD", None, "HEAD has no commits yet", path=relative)
    else:
        commit = _commit(rev)
        if commit is None:
            raise CheckError(
                f"unknown git revision {rev!r}: no branch, tag or commit by that name. In CI, check out "
                "the full history (actions/checkout with fetch-depth: 0) so the base branch exists."
            )
        label = rev if commit.startswith(rev) else f"{rev} ({commit[:7]})"
    # rev stays None for the default, so scripts reading --json can tell the two apart.
    origin = {"rev": rev, "commit": commit, "path": relative}
    result = _git("show", f"{commit}:{relative}")
    if result.returncode != 0:
        # The commit exists (checked above), so the file is what is missing there.
        return Baseline(label, None, f"{relative} does not exist at {label}", **origin)
    source = f"the baseline {relative} at {label}"
    try:
        text = result.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckError(f"{source} is not UTF-8 text.") from None
    return Baseline(label, parse_metrics(text, source), **origin)


def read_metrics_file(path: Path, what: str, hint: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckError(f"{what} {path} does not exist; {hint}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckError(f"cannot read {what} {path}: {error}") from None
    return parse_metrics(text, f"{what} {path}")


def append_summary(path: str, markdown: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as error:
        raise CheckError(f"cannot append the report to the summary file {path}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check",
        description="Compare the current metrics with a baseline, using the rules in params.yaml's check section. "
        "Exits 0 when every rule holds, 1 on a regression, 2 on bad input.",
    )
    parser.add_argument("--metrics", type=Path, default=METRICS_FILE, help="current metrics file (default: %(default)s)")
    parser.add_argument("--params", type=Path, help="params file holding the rules (default: $PIPELINE_PARAMS or params.yaml)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--rev",
        help="git revision holding the baseline metrics file, at the same path as --metrics "
        "(default: the merge base of HEAD and main, or origin/main, else HEAD)",
    )
    source.add_argument("--baseline-file", type=Path, help="a metrics file to use as the baseline instead of git")
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
        rules = load_params(args.params).check
        if not rules:
            raise CheckError(
                "params.yaml has no rules in its check section, so the gate would check nothing; "
                "add one per metric, e.g. test_accuracy: {better: higher, max_worsening: 0.002}."
            )
        current = read_metrics_file(args.metrics, "the metrics file", "run the pipeline first (dvc repro) or pass --metrics.")
        if args.baseline_file is not None:
            baseline = Baseline(
                str(args.baseline_file),
                read_metrics_file(args.baseline_file, "the baseline file", "pass an existing metrics file to --baseline-file."),
                path=str(args.baseline_file),
            )
        else:
            baseline = baseline_from_git(args.rev, args.metrics)
        rows = compare(baseline.metrics, current, rules, str(args.metrics))
    except PipelineError as error:
        if args.summary_file:
            append_summary(args.summary_file, render_error(str(error)))
        raise

    markdown = render_markdown(rows, baseline)
    if args.summary_file:
        append_summary(args.summary_file, markdown)
    sys.stdout.write(render_json(rows, baseline) if args.json else markdown)
    return exit_code(rows)


def cli() -> None:
    """Entry point of ``mnist-check`` and ``python -m pipeline.check``: exits with the gate's code."""
    configure_logging()
    # A Windows console's code page has no ✅ or ❌; a replacement character beats a crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        code = main(sys.argv[1:])
    except PipelineError as error:
        print(format_error(str(error)), file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    cli()
