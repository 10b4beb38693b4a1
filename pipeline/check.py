"""The metric gate (``mnist-check``): the metrics dvc.yaml declares against a baseline, by check.yaml's rules.
The baseline: the merge base with main (or ``--rev``), ``--baseline-file`` or the registry's champion. Prints
Markdown or ``--json``; exits 0 pass, 1 regression, 2 bad input (docs/gate.md)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import math
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

from pipeline import files
from pipeline.cli import PipelineError, redact, run
from pipeline.params import RULES_FILE, CheckRule, load_rules
from pipeline.tracking import registry

EXIT_PASS, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
# 0.9213 - 0.9193 is 0.0020000000000000018: a change of exactly max_worsening must pass.
TOLERANCE = 1e-9
ENVIRONMENT = {"uv_lock_sha256": "uv.lock changed", "cpu": "the baseline came from another CPU ({old})"}
Metrics = dict[str, dict[str, Any]]  # metrics file → metric, nested keys joined by dots, as DVC names them → value


class CheckError(PipelineError):
    """Bad input: the gate cannot run."""


def git(*args: str) -> str | None:
    """The output of a git command, None when it fails."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise CheckError("the gate needs git to find its baseline, and no git command is installed.") from None
    return result.stdout.rstrip() if result.returncode == 0 else None


def dvc_json(what: str, *args: str) -> tuple[Any, str]:
    """What this interpreter's ``dvc <args> --json`` prints, parsed, and its warnings."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        errors = [line[7:] for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
        raise CheckError(f"cannot read {what}: {' '.join(errors) or result.stderr.strip()}.")
    return json.loads(result.stdout or "{}"), result.stderr


def dvc_yaml() -> tuple[Path, dict[str, Any]]:
    here = Path.cwd().resolve()
    root = next((path for path in (here, *here.parents) if (path / ".dvc").is_dir()), None)
    if root is None:
        raise CheckError("cannot read the current metrics: not inside of a DVC repository (no .dvc folder here).")
    return root, ((root / "dvc.yaml").exists() and yaml.safe_load(files.read_bytes(root / "dvc.yaml"))) or {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def current_metrics() -> tuple[Metrics, dict[str, Any]]:
    """The workspace's metrics, as DVC shows them, and the environment they record."""
    environment = environment_at(None)  # First: its bounded reads spare DVC a FIFO, on which it would wait forever.
    shown = dvc_json("the current metrics", "metrics", "show")[0].get("", {}).get("data", {})
    for path, error in ((path, entry["error"]) for path, entry in shown.items() if "error" in entry):
        reason = {
            "FileNotFoundError": "it does not exist; run the pipeline first (dvc repro)",
            "RecursionError": "its JSON nests too deeply to parse",
        }.get(error["type"], error["msg"])
        raise CheckError(f"cannot read the current metrics: {path}: {re.sub('^unable to read: .*?, ', '', reason)}.")
    if not shown:
        raise CheckError("DVC finds no metrics; declare the metrics files in dvc.yaml and run dvc repro.")
    return {path: flatten(entry["data"]) for path, entry in shown.items()}, environment


def recorded_environment(metrics: dict[str, Any]) -> dict[str, Any]:
    """train.json's ``environment``: [name, value] pairs, a list DVC's tables leave out."""
    found: dict[str, Any] = {}
    for names in metrics.values():
        with contextlib.suppress(AttributeError, TypeError, ValueError):  # Not [name, value] pairs: no environment.
            found |= dict(names.get("environment") or ())
    return found


def environment_at(commit: str | None) -> dict[str, Any]:
    """The environment the metrics files record at ``commit`` (None: the workspace)."""
    root, declared = dvc_yaml()
    recorded = {}
    entries = (entry for stage in declared.get("stages", {}).values() for entry in stage.get("metrics", []))
    for path in (entry if isinstance(entry, str) else next(iter(entry)) for entry in entries):
        try:
            text = git("-C", str(root), "show", f"{commit}:./{path}") if commit else files.read_bytes(root / path)
        except FileNotFoundError:
            continue  # DVC says so, as it reads the metrics themselves.
        except OSError as problem:
            raise CheckError(f"cannot read the current metrics: {path}: {problem}.") from None
        with contextlib.suppress(ValueError, RecursionError):  # DVC reports a broken file.
            recorded[path] = json.loads(text or "{}")
    return recorded_environment(recorded)


def origin(label: str, reason: str = "", rev: str | None = None, commit: str | None = None, path: str | None = None):
    return {"label": label, "missing_reason": reason or None, "rev": rev, "commit": commit, "path": path}


def git_baseline(rev: str | None) -> tuple[dict, Metrics | None]:
    """The metrics at ``rev`` (None: the merge base of HEAD with main or origin/main, else HEAD)."""
    if rev is not None:
        if (commit := git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")) is None:
            raise CheckError(
                f"unknown git revision {rev!r}: no branch, tag or commit by that name. In CI, check out "
                "the full history (actions/checkout with fetch-depth: 0) so the base branch exists."
            )
        label = rev if commit.startswith(rev) else f"{rev} ({commit[:7]})"
    elif (commit := git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")) is None:
        return origin("HEAD", "HEAD has no commits yet"), None
    else:
        label = f"HEAD ({commit[:7]}), as there is no merge base with main"
        for branch in ("main", "origin/main"):
            if base := git("merge-base", "HEAD", branch):
                commit, label = base, f"the merge base with {branch} ({base[:7]})"
                break
    diff, warnings = dvc_json(f"the baseline metrics at {label}", "metrics", "diff", "--all", commit)
    old = {path: {k: v["old"] for k, v in names.items() if v.get("old") is not None} for path, names in diff.items()}
    # DVC warns alike of a metrics file missing at the revision and of one it cannot parse, the latter bad input.
    broken = [path for path, names in old.items() if not names and git("cat-file", "-e", f"{commit}:./{path}") == ""]
    if "failed to load" in warnings and broken:
        raise CheckError(f"cannot read the baseline metrics at {label}: DVC could not load {', '.join(broken)}.")
    found = {path: names for path, names in old.items() if names} or None
    return origin(label, "" if found else f"no metrics file exists at {label}", rev, commit), found


def file_baseline(path: Path) -> tuple[dict, Metrics | None]:
    """A JSON object of metrics: one metrics file, or all of them merged."""
    try:
        data = json.loads(files.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise CheckError(f"the baseline file {path} does not exist; pass an existing metrics file.") from None
    except (OSError, ValueError, RecursionError) as problem:  # ValueError: not UTF-8, not JSON, over 4,300 digits.
        reason = "its JSON nests too deeply to parse" if isinstance(problem, RecursionError) else problem
        raise CheckError(f"cannot read the baseline file {path}: {reason}.") from None
    if not isinstance(data, dict):
        raise CheckError(f"the baseline file {path} must hold a JSON object of metrics, got {type(data).__name__}.")
    return origin(str(path), path=str(path)), {str(path): flatten(data)}


def values(metrics: Metrics, rules: dict[str, CheckRule], source: str, required: bool) -> dict[str, float]:
    """Each rule's metric (``metric`` in any file, or ``file:metric``) as a finite number within its range."""
    found, problems = {}, []
    for metric, rule in rules.items():
        held = {p: v for p, names in metrics.items() for name, v in names.items() if metric in (name, f"{p}:{name}")}
        value: Any = next(iter(held.values()), None)
        low, high = rule.range or (None, None)
        if len({repr(value) for value in held.values()}) > 1:
            clash = ", ".join(f"{path} has {value!r}" for path, value in held.items())
            problems.append(f"{metric} differs between the metrics files ({clash}); rename one of them")
        elif not held and required:
            numbers = sorted({k for names in metrics.values() for k, v in names.items() if type(v) in (int, float)})
            close = difflib.get_close_matches(metric, numbers, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "it has " + ", ".join(numbers)
            problems.append(f"{metric} is not in it ({hint})")
        elif not held:
            continue
        elif type(value) not in (int, float):
            problems.append(f"{metric} is {value!r}, not a number")
        elif isinstance(value, int) and abs(value) > sys.float_info.max:
            problems.append(f"{metric} is a {len(str(abs(value)))}-digit number, too large to compare")
        elif not math.isfinite(value):
            problems.append(f"{metric} is {value}, not a finite number")
        elif (low is not None and value < low) or (high is not None and value > high):
            bounds = ", ".join("null" if end is None else text(end) for end in (low, high))
            problems.append(f"{metric} is {text(value)}, outside its range [{bounds}] in {RULES_FILE}")
        else:
            found[metric] = float(value)
    if problems:
        raise CheckError(
            f"the rules in {RULES_FILE} name metrics that cannot be checked against {source}: "
            f"{'; '.join(problems)}. Fix the rule in {RULES_FILE} or rerun the pipeline (dvc repro)."
        )
    return found


def check(metric: str, old: float | None, new: float, rule: CheckRule, note: str) -> dict[str, Any]:
    worsening = 0.0 if old is None else old - new if rule.better == "higher" else new - old
    if not math.isfinite(worsening):
        raise CheckError(f"the change in {metric} from {old} to {new} is too large to compute.")
    reasons = []
    if worsening > rule.max_worsening + TOLERANCE:
        moved = "fell" if rule.better == "higher" else "rose"
        reasons.append(f"{moved} by {text(worsening)}, more than the {text(rule.max_worsening)} allowed")
    if rule.floor is not None and new < rule.floor:
        reasons.append(f"below the floor of {text(rule.floor)}")
    if rule.ceiling is not None and new > rule.ceiling:
        reasons.append(f"above the ceiling of {text(rule.ceiling)}")
    return {
        "metric": metric,
        "baseline": old,
        "current": new,
        "change": None if old is None else round(new - old, 12),
        "rule": {key: getattr(rule, key) for key in ("better", "max_worsening", "floor", "ceiling", "range")},
        "status": "fail" if reasons else "pass",
        "reasons": reasons,
        "note": None if old is not None else note,
    }


def environment_difference(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs in the recorded environments (train.json's ``environment``); information, never a failure."""
    changes = [
        ENVIRONMENT.get(key, "{key} {old} → {new}").format(
            key=key, old=was.get(key, "(none)"), new=now.get(key, "(none)")
        )
        for key in dict.fromkeys([*was, *now])
        if was.get(key) != now.get(key)
    ]
    return f"Environment differs from the baseline's: {', '.join(changes)}." if was and now and changes else None


def text(value: float | None, sign: str = "") -> str:
    # Six significant digits show a 0.0001 change in an accuracy of 0.92 without float noise.
    return "—" if value is None else "0" if value == 0 else format(value, f"{sign}.6g")


def render_markdown(rows: list[dict[str, Any]], baseline: dict, environment: str | None, promotion: dict | None) -> str:
    failed = [row["metric"] for row in rows if row["reasons"]]
    head = f"### ❌ Metric check failed: {len(failed)} of {len(rows)} metrics broke their rules ({', '.join(failed)})"
    if not failed:
        head = f"### ✅ Metric check passed: {len(rows)} of {len(rows)} metrics within their rules"
    if reason := baseline["missing_reason"]:
        head += f"; no baseline, as {reason}, so only floors and ceilings were checked"
    else:
        head += f", against {baseline['label']}"
    table = []
    for row in rows:
        rule = row["rule"]
        move = "fall" if rule["better"] == "higher" else "rise"
        bounds = [f"{name} {text(rule[name])}" for name in ("floor", "ceiling") if rule[name] is not None]
        described = ", ".join([f"{rule['better']} is better", f"may {move} ≤ {text(rule['max_worsening'])}", *bounds])
        verdict = f"✅ pass ({row['note']})" if row["note"] else "✅ pass"
        if row["reasons"]:
            verdict = "❌ fail: " + "; ".join(row["reasons"])
        numbers = [text(row["baseline"]), text(row["current"]), text(row["change"], "+")]
        table.append([f"`{' '.join(row['metric'].split())}`".replace("|", "\\|"), *numbers, described, verdict])
    # What pandas' to_markdown calls, without pandas' second of import time.
    headers = ["metric", "baseline", "current", "change", "rule", "verdict"]
    align = ["left", "right", "right", "right", "left", "left"]
    parts = [head, environment, tabulate(table, headers, "pipe", disable_numparse=True, colalign=align)]
    if promotion and promotion["promoted"]:
        name, previous = promotion["model"], promotion["previous"]
        former = f"; version {previous}, the former champion, is now `{registry.alias_uri(name, registry.PREVIOUS)}`"
        former = former if previous else " (there was no champion)"
        champion = f"`{registry.alias_uri(name, registry.CHAMPION)}`{former}"
        parts.append(f"🏆 Promoted {name} version {promotion['version']} to {champion}.")
    elif promotion:
        parts.append(f"Not promoted: {promotion['reason']}.")
    return "".join(f"{part}\n\n" for part in parts if part)


def append_summary(path: str, markdown: str) -> None:
    try:
        # Opened without blocking, as opening a FIFO that nothing reads would wait forever.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        os.set_blocking(descriptor, True)
        with open(descriptor, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as error:
        reason = "it is a FIFO that nothing reads" if error.errno == errno.ENXIO else error.strerror or error
        raise CheckError(f"cannot append the report to the summary file {path}: {reason}") from None


def model_artifact() -> Path:
    """The file of the one ``type: model`` artifact in dvc.yaml: what ``--promote`` promotes."""
    root, declared = dvc_yaml()
    models = [root / a["path"] for a in declared.get("artifacts", {}).values() if a.get("type") == "model"]
    if len(models) != 1:
        raise CheckError(f"--promote needs exactly one artifact of type model in dvc.yaml, found {len(models)}.")
    return models[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-check", description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, help=f"the rules' file (default: {RULES_FILE})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rev", help="baseline git revision (default: merge base of HEAD and main, else HEAD)")
    source.add_argument("--baseline-file", type=Path, help="a JSON file of baseline metrics, instead of git")
    source.add_argument("--champion", action="store_true", help="baseline: the registered model's champion")
    parser.add_argument("--promote", action="store_true", help="when every rule holds, make this model the champion")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    summary = os.environ.get("GITHUB_STEP_SUMMARY", "")
    parser.add_argument("--summary-file", default=summary, help="append the Markdown here ($GITHUB_STEP_SUMMARY)")
    args = parser.parse_args(argv)
    try:
        if not (rules := load_rules(args.rules)):
            raise CheckError(
                f"{args.rules or RULES_FILE} has no rules, so the gate would check nothing; add "
                "one per metric, e.g. test_accuracy: {better: higher, max_worsening: 0.002}."
            )
        current, now = current_metrics()
        new = values(current, rules, "the current metrics", required=True)
        store = registry.Registry.open() if args.champion or args.promote else None
        if args.baseline_file:
            baseline, old = file_baseline(args.baseline_file)
        elif store and args.champion:
            label, recorded, reason = store.champion(rules)
            baseline, old = origin(label, reason), None if recorded is None else {"registry": recorded}
        else:
            baseline, old = git_baseline(args.rev)
        before = values(old or {}, rules, "the baseline", required=False)
        note = "no baseline" if old is None else "new metric, not in the baseline"
        rows = [check(metric, before.get(metric), new[metric], rule, note) for metric, rule in rules.items()]
        failed = any(row["reasons"] for row in rows)
        promotion = store.promote_file(model_artifact(), rules, failed) if store and args.promote else None
    except PipelineError as error:
        if args.summary_file:
            try:
                append_summary(args.summary_file, f"### ⚠️ Metric check could not run\n\n{redact(str(error))}\n\n")
            except CheckError as also:
                raise CheckError(f"{error} (Also, {also}.)") from None
        raise
    was = environment_at(baseline["commit"]) if baseline["commit"] else recorded_environment(old or {})
    environment = environment_difference(was, now)
    markdown = render_markdown(rows, baseline, environment, promotion)
    report: dict[str, Any] = {"status": "fail" if failed else "pass", "baseline": baseline | {"found": old is not None}}
    report |= {"environment_difference": environment, "metrics": rows, "promotion": promotion}
    # The report first: a summary file that cannot take it must not hide the verdict.
    sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n" if args.json else markdown)
    sys.stdout.flush()
    if args.summary_file:
        append_summary(args.summary_file, markdown)
    return EXIT_REGRESSION if failed else EXIT_PASS


def cli() -> None:
    """``mnist-check``; a crash exits 2, never 1, which would read as a regression."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # A console without ✅ gets a replacement, not a crash.
    try:
        run(lambda: sys.exit(main(sys.argv[1:])), error_exit_code=EXIT_BAD_INPUT)
    except Exception:
        traceback.print_exc()
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    cli()
