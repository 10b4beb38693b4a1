"""The metric gate (pipeline/check.py) and its CI workflow: the rules as functions, the command in copies of one
small git + DVC project whose main holds committed metrics and whose branch ``feature`` changes them."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_project import Project, base_env, make_project

from pipeline import check
from pipeline.check import CheckError, environment_difference, render_markdown
from pipeline.files import READ_LIMIT
from pipeline.params import CheckRule, load_rules

BASE = {
    "test_accuracy": 0.9213,
    "test_cross_entropy": 0.2845,
    "macro_f1": 0.9202,
}
WORSE = {**BASE, "test_accuracy": 0.80, "test_cross_entropy": 0.61, "macro_f1": 0.79}
BETTER = {**BASE, "test_accuracy": 0.93, "test_cross_entropy": 0.27, "macro_f1": 0.929}
ENVIRONMENT = {"python": "3.11.7", "tensorflow": "2.21.0", "numpy": "2.1.3", "uv_lock_sha256": "0" * 64}
TRAIN = {"final_train_accuracy": 0.95, "environment": [[name, value] for name, value in sorted(ENVIRONMENT.items())]}
HIGHER = CheckRule(better="higher", max_worsening=0.002, floor=0.915)
LOWER = CheckRule(better="lower", max_worsening=0.01, ceiling=0.3)
SCORE = CheckRule(better="higher", max_worsening=0.002, range=(0.0, 1.0))
LOSS = CheckRule(better="lower", max_worsening=0.01, range=(0.0, None))
RULES = load_rules(ROOT / "check.yaml")


def flat(metrics: dict, path: str = "metrics/metrics.json") -> dict:
    return {path: check.flatten(metrics)}


# ---------------------------------------------------------------------------------------------
# The rules.


@pytest.mark.parametrize(
    ("old", "new", "rule", "reasons"),
    [
        (0.9213, 0.9180, HIGHER, ["fell by 0.0033, more than the 0.002 allowed"]),
        (0.9213, 0.9193, HIGHER, []),  # 0.0020000000000000018 in floating point: exactly the allowed drop.
        (0.9213, 0.95, HIGHER, []),
        (0.916, 0.9145, HIGHER, ["below the floor of 0.915"]),  # An allowed drop, but below the floor.
        (None, 0.90, HIGHER, ["below the floor of 0.915"]),
        (0.2845, 0.2945, LOWER, []),
        (0.2845, 0.1, LOWER, []),
        (0.28, 0.2955, LOWER, ["rose by 0.0155, more than the 0.01 allowed"]),
        (0.299, 0.305, LOWER, ["above the ceiling of 0.3"]),
    ],
)
def test_a_rule_allows_max_worsening_and_holds_floor_and_ceiling(old, new, rule, reasons):
    row = check.check("m", old, new, rule, "no baseline")
    assert row["reasons"] == reasons and row["status"] == ("fail" if reasons else "pass")
    assert row["change"] == (None if old is None else pytest.approx(new - old))
    assert row["note"] == ("no baseline" if old is None else None)


CLASH = {"metrics/metrics.json": {"test_accuracy": 0.9213}, "metrics/train.json": {"test_accuracy": 0.5}}


@pytest.mark.parametrize(
    ("metrics", "rule", "phrase"),
    [
        (flat({"test_accuracy": math.nan}), SCORE, "test_accuracy is nan, not a finite number"),
        (flat({"test_accuracy": -math.inf}), SCORE, "test_accuracy is -inf, not a finite number"),
        (flat({"test_accuracy": 10**400}), SCORE, "test_accuracy is a 401-digit number, too large to compare"),
        (flat({"test_accuracy": 1e308}), SCORE, "test_accuracy is 1e+308, outside its range [0, 1] in check.yaml"),
        (flat({"test_accuracy": -0.1}), SCORE, "test_accuracy is -0.1, outside its range [0, 1] in check.yaml"),
        (flat({"test_accuracy": -0.5}), LOSS, "test_accuracy is -0.5, outside its range [0, null]"),
        (flat({"test_accuracy": "0.92"}), SCORE, "test_accuracy is '0.92', not a number"),
        (flat({"test_accuracy": True}), SCORE, "test_accuracy is True, not a number"),
        (CLASH, SCORE, "test_accuracy differs between the metrics files (metrics/metrics.json has 0.9213, "),
    ],
)
@pytest.mark.parametrize("side", ["the current metrics", "the baseline"])
def test_a_value_the_rules_cannot_compare_is_bad_input_on_either_side(metrics, rule, phrase, side):
    with pytest.raises(CheckError, match=f"cannot be checked against {side}") as raised:
        check.values(metrics, {"test_accuracy": rule}, side, required=True)
    assert phrase in str(raised.value)
    assert str(raised.value).endswith("Fix the rule in check.yaml or rerun the pipeline (dvc repro).")


@pytest.mark.parametrize(
    ("metric", "phrase"),
    [
        ("test_acuracy", "test_acuracy is not in it (did you mean test_accuracy?)"),
        ("f1", "f1 is not in it (it has final_train_accuracy, macro_f1, test_accuracy, test_cross_entropy)"),
        ("environment", "environment is [['numpy', '2.1.3'], ['python', '3.11.7'], "),
    ],
)
def test_a_rule_for_a_metric_that_is_not_there_says_what_is(metric, phrase):
    metrics = flat(BASE) | flat(TRAIN, "metrics/train.json")
    with pytest.raises(CheckError) as raised:
        check.values(metrics, {metric: HIGHER}, "the current metrics", required=True)
    assert phrase in str(raised.value) and "environment." not in str(raised.value).replace(f"{metric} is", "")
    assert check.values(metrics, {metric: HIGHER} if "not in it" in phrase else {}, "the baseline", False) == {}


def test_a_rule_finds_its_metric_in_any_file_or_the_one_it_names():
    same = CLASH | {"metrics/train.json": {"test_accuracy": 0.9213}}
    assert check.values(same, {"test_accuracy": SCORE}, "x", True) == {"test_accuracy": 0.9213}
    named = "metrics/train.json:test_accuracy"
    assert check.values(CLASH, {named: SCORE}, "x", True) == {named: 0.5}
    assert check.values(flat({"loss": 1e300}), {"loss": LOSS}, "x", True) == {"loss": 1e300}
    with pytest.raises(CheckError, match="the change in x from -1e.308 to 1e.308 is too large to compute"):
        check.check("x", -1e308, 1e308, LOWER, "")


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ({"tensorflow": "2.22.0", "uv_lock_sha256": "1" * 64}, {}, "tensorflow 2.22.0 → 2.21.0, uv.lock changed"),
        ({}, {"jax": "0.5.0"}, "jax (none) → 0.5.0"),
        ({"cpu": "CPU A (avx2)"}, {"cpu": "CPU B"}, "the baseline came from another CPU (CPU A (avx2))"),
        ({}, {}, None),
    ],
)
def test_the_environment_line_names_what_differs(old, new, line):
    expected = line and f"Environment differs from the baseline's: {line}."
    assert environment_difference(ENVIRONMENT | old, ENVIRONMENT | new) == expected
    # An older baseline, from before train recorded its environment, has none to compare.
    assert environment_difference({}, ENVIRONMENT | new) is None


PROMOTED = {"model": "mnist-softmax", "version": "3", "previous": "1", "promoted": True, "reason": None}


def test_the_markdown_report():
    rows = [
        check.check("test_accuracy", 0.9213, 0.80, HIGHER, ""),
        check.check("a|b", None, 0.2845, LOWER, "no baseline"),
    ]
    origin = check.origin("origin/main (1a2b3c4)")
    lines = [" ".join(line.split()) for line in render_markdown(rows, origin, "Env.", PROMOTED).splitlines()]
    assert lines[:5] + lines[6:] == [
        "### ❌ Metric check failed: 1 of 2 metrics broke their rules (test_accuracy), against origin/main (1a2b3c4)",
        "",
        "Env.",
        "",
        "| metric | baseline | current | change | rule | verdict |",
        "| `test_accuracy` | 0.9213 | 0.8 | -0.1213 | higher is better, may fall ≤ 0.002, floor 0.915 "
        "| ❌ fail: fell by 0.1213, more than the 0.002 allowed; below the floor of 0.915 |",
        "| `a\\|b` | — | 0.2845 | — | lower is better, may rise ≤ 0.01, ceiling 0.3 | ✅ pass (no baseline) |",
        "",
        "🏆 Promoted mnist-softmax version 3 to `models:/mnist-softmax@champion`; version 1, the former champion, "
        "is now `models:/mnist-softmax@previous`.",
        "",
    ]
    assert lines[5].startswith("|:-") and lines[5].count("-:|") == 3  # Numbers right-aligned.
    missing = check.origin("v1", "no metrics file exists at v1")
    first = render_markdown(rows[1:], missing, None, PROMOTED | {"previous": None})
    assert first.startswith(
        "### ✅ Metric check passed: 1 of 1 metrics within their rules; no baseline, as no metrics file exists "
        "at v1, so only floors and ceilings were checked\n\n|"
    )
    assert first.endswith(
        "|\n\n🏆 Promoted mnist-softmax version 3 to `models:/mnist-softmax@champion` (there was no champion).\n\n"
    )
    refused = render_markdown(rows, origin, None, PROMOTED | {"promoted": False, "reason": "the rules broke"})
    assert refused.endswith("|\n\nNot promoted: the rules broke.\n\n")


# ---------------------------------------------------------------------------------------------
# The command, in a copy of a small git + DVC project.


def write_metrics(project: Project, metrics: dict | str = BASE, train: dict | str = TRAIN) -> None:
    for name, content in (("metrics.json", metrics), ("train.json", train)):
        text = content if isinstance(content, str) else json.dumps(content)
        (project.root / "metrics" / name).write_text(text, encoding="utf-8")


def on_main(project: Project, metrics: dict | str) -> None:
    project.git("switch", "-q", "main")
    write_metrics(project, metrics)
    project.commit("metrics on main")
    project.git("switch", "-q", "feature")


@pytest.fixture(scope="session")
def gate_template(tmp_path_factory) -> Project:
    project = make_project(tmp_path_factory.mktemp("gate"))
    (project.root / "metrics").mkdir(exist_ok=True)
    write_metrics(project)
    project.commit("baseline pipeline run")
    project.git("switch", "-q", "-c", "feature")
    return project


@pytest.fixture
def repo(gate_template, tmp_path) -> Project:
    root = tmp_path / "project"
    shutil.copytree(gate_template.root, root, symlinks=True)
    return Project(root, base_env(root, {"GITHUB_STEP_SUMMARY": "", "PYTHONPATH": str(root)}))


def gate(project: Project, *args: str, cwd: Path | None = None, **env: str):
    result = project.run(
        sys.executable, "-m", "pipeline.check", *args, env=env, check=False, cwd=cwd or project.root, timeout=300
    )
    result.text = " ".join((result.stdout + result.stderr).split())  # type: ignore[attr-defined]
    return result


def assert_exit(result, code: int, *phrases: str) -> None:
    """The exit code and every phrase; bad input (2) as one short 'error:' paragraph alone, else a silent stderr."""
    assert result.returncode == code and all(phrase in result.text for phrase in phrases), result.text
    if code != 2:
        assert result.stderr == "", result.stderr
        return
    assert result.stdout == "" and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "\n\n" not in result.stderr.strip() and len(result.stderr) < 1000


def baseline_file(project: Project, baseline: dict, current: dict = BASE) -> None:
    (project.root / "b.json").write_text(json.dumps(baseline))
    write_metrics(project, current)


PASSED = "### ✅ Metric check passed: 3 of 3 metrics within their rules"
BEST = BASE | {"test_accuracy": 0.99}
OTHER_TENSORFLOW = BASE | {"environment": sorted((ENVIRONMENT | {"tensorflow": "2.22.0"}).items())}
FELL = BASE | {"test_accuracy": 0.95}
FILE = ["--baseline-file", "b.json"]
METRICS = "metrics/metrics.json"
READ = f"cannot read the current metrics: {METRICS}: "
NOT_A_NUMBER = json.dumps(BASE).replace("0.9213", "NaN")
INFINITE = json.dumps(BASE).replace("0.9213", "Infinity")


@pytest.mark.parametrize(
    ("setup", "args", "code", "phrases"),
    [
        # The baseline from git: the merge base, not main's tip, where main moved on to a better model.
        (lambda p: on_main(p, BEST), [], 0, [f"{PASSED}, against the merge base with main ("]),
        (lambda p: on_main(p, BEST), ["--rev", "main"], 1, ["against main ("]),
        # Without a main branch the last commit is the baseline.
        (
            lambda p: (p.git("branch", "-q", "-m", "main", "trunk"), write_metrics(p, WORSE)),
            [],
            1,
            ["as there is no merge base with main"],
        ),
        (
            lambda p: p.git("checkout", "-q", "--orphan", "fresh"),
            ["--json"],
            0,
            ['"label": "HEAD", "missing_reason": "HEAD has no commits yet",', '"found": false }'],
        ),
        # Floors still hold without a baseline.
        (
            lambda p: (p.git("rm", "-qr", "--cached", "metrics"), p.git("commit", "-qm", "-"), write_metrics(p, WORSE)),
            ["--rev", "HEAD"],
            1,
            ["no baseline, as no metrics file exists at HEAD (", "below the floor of 0.915"],
        ),
        # The baseline from a file: one metrics file, or those of every file merged as DVC shows them.
        (lambda p: baseline_file(p, BASE, BETTER), FILE, 0, ["| `test_accuracy` | 0.9213 | 0.93 | +0.0087 |"]),
        (lambda p: baseline_file(p, FELL), FILE, 1, ["metrics broke their rules (test_accuracy), against b.json"]),
        (lambda p: baseline_file(p, BASE | TRAIN), FILE, 0, [f"{PASSED}, against b.json"]),
        (lambda p: baseline_file(p, OTHER_TENSORFLOW), FILE, 0, ["baseline's: tensorflow 2.22.0 → 2.21.0. | metric |"]),
        # A metric not in the baseline (added by this change) checks only its floor and ceiling.
        (
            lambda p: baseline_file(p, {"macro_f1": 0.9}),
            FILE,
            0,
            [
                "| `test_accuracy` | — | 0.9213 | — | higher is better, may fall ≤ 0.002, floor 0.915 "
                "| ✅ pass (new metric, not in the baseline) |"
            ],
        ),
        # Bad input: exit 2 with one paragraph.
        (
            lambda p: (p.root / METRICS).unlink(),
            [],
            2,
            [READ + "it does not exist; run the pipeline first (dvc repro)"],
        ),
        (lambda p: (p.root / "dvc.yaml").write_text("stages: {}\n"), [], 2, ["DVC finds no metrics; declare the"]),
        (lambda p: write_metrics(p, '{"test_accuracy": 0.92,'), [], 2, [READ + "JSON file structure is corrupted"]),
        (lambda p: write_metrics(p, "1" * 5001), [], 2, [READ + "Exceeds the limit (4300 digits)"]),
        (lambda p: write_metrics(p, "[" * 100_000 + "]" * 100_000), [], 2, [READ + "its JSON nests too deeply"]),
        (lambda p: write_metrics(p, NOT_A_NUMBER), [], 2, ["test_accuracy is nan, not a finite number. Fix the rule"]),
        (
            lambda p: on_main(p, "{not json"),
            ["--rev", "main"],
            2,
            ["cannot read the baseline metrics at main (", "DVC could not load metrics/metrics.json"],
        ),
        (
            lambda p: on_main(p, INFINITE),
            ["--rev", "main"],
            2,
            ["cannot be checked against the baseline: test_accuracy is inf, not a finite number"],
        ),
        (lambda p: None, ["--rev", "no-such-branch"], 2, ["unknown git revision 'no-such-branch'", "fetch-depth: 0"]),
        (lambda p: None, ["--rev=--all"], 2, ["unknown git revision '--all'"]),
        (lambda p: None, ["--baseline-file", "gone.json"], 2, ["the baseline file gone.json does not exist"]),
        (lambda p: None, ["--rules", "missing.yaml"], 2, ["missing.yaml does not exist"]),
        (lambda p: (p.root / "check.yaml").write_text("{}\n"), [], 2, ["check.yaml has no rules"]),
        (lambda p: shutil.rmtree(p.root / ".dvc"), [], 2, ["the current metrics: not inside of a DVC repository"]),
        (
            lambda p: (p.root / METRICS).unlink() or os.mkfifo(p.root / METRICS),
            [],
            2,
            [READ + "it is a FIFO, not a regular file"],
        ),
        (
            lambda p: os.truncate(p.root / METRICS, READ_LIMIT + 1),
            [],
            2,
            [READ + "it holds more than the 67,108,864 bytes"],
        ),
        (lambda p: None, ["--promote"], 2, ["does not exist yet; run the pipeline first"]),  # No MLflow store yet.
    ],
)
def test_the_verdict_or_bad_input(repo, setup, args, code, phrases):
    setup(repo)
    assert_exit(gate(repo, *args), code, *phrases)


def test_the_json_report_of_uncommitted_metrics_from_a_subdirectory(repo):
    merge_base = repo.git("rev-parse", "main")
    write_metrics(repo, WORSE, TRAIN | {"environment": sorted((ENVIRONMENT | {"numpy": "2.2.0"}).items())})
    # Uncommitted, as dvc repro leaves them; and from a subdirectory, where DVC still finds them.
    result = gate(repo, "--json", "--rules", "../check.yaml", cwd=repo.root / "metrics")
    report = json.loads(result.stdout, parse_constant=pytest.fail)
    assert result.returncode == 1 and report["status"] == "fail" and report["promotion"] is None
    assert report["baseline"] == {
        "label": f"the merge base with main ({merge_base[:7]})",
        "missing_reason": None,
        "rev": None,
        "commit": merge_base,
        "path": None,
        "found": True,
    }
    assert report["environment_difference"] == "Environment differs from the baseline's: numpy 2.1.3 → 2.2.0."
    assert [row["metric"] for row in report["metrics"]] == list(RULES)
    assert report["metrics"][0] == {
        "metric": "test_accuracy",
        "baseline": 0.9213,
        "current": 0.8,
        "change": -0.1213,
        "rule": {"better": "higher", "max_worsening": 0.002, "floor": 0.915, "ceiling": None, "range": [0, 1]},
        "status": "fail",
        "reasons": ["fell by 0.1213, more than the 0.002 allowed", "below the floor of 0.915"],
        "note": None,
    }


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("list.json", "the baseline file list.json must hold a JSON object of metrics, got list"),
        ("latin1.json", "cannot read the baseline file latin1.json: 'utf-8' codec can't decode byte 0xe9"),
        ("nested.json", "cannot read the baseline file nested.json: its JSON nests too deeply to parse"),
        ("fifo.json", "cannot read the baseline file fifo.json: it is a FIFO, not a regular file"),
        ("/dev/zero", "cannot read the baseline file /dev/zero: it is a device, not a regular file"),
        ("folder", "cannot read the baseline file folder: it is a directory, not a regular file"),
    ],
)
def test_a_baseline_file_without_an_object_of_metrics_is_bad_input(tmp_path, monkeypatch, name, phrase):
    monkeypatch.chdir(tmp_path)
    Path("list.json").write_text("[0.92]")
    Path("latin1.json").write_bytes(b'{"test_accuracy": "\xe9"}')
    Path("nested.json").write_text("[" * 100_000)
    os.mkfifo("fifo.json")
    Path("folder").mkdir()
    with pytest.raises(CheckError) as raised:
        check.file_baseline(Path(name))
    assert phrase in str(raised.value)


def test_the_summary_file(repo, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    assert gate(repo, "--json", "--summary-file", str(summary)).returncode == 0
    assert summary.read_text(encoding="utf-8").startswith("earlier step\n### ✅ Metric check passed")
    # $GITHUB_STEP_SUMMARY is the default; an empty --summary-file turns it off.
    summary.unlink()
    assert gate(repo, "--summary-file", "", GITHUB_STEP_SUMMARY=str(summary)).returncode == 0 and not summary.exists()
    assert gate(repo, GITHUB_STEP_SUMMARY=str(summary)).returncode == 0 and "| metric" in summary.read_text()
    # Bad input is reported there too; a summary file that cannot take the report keeps the error and the verdict.
    assert_exit(gate(repo, "--rev", "nope", "--summary-file", str(summary)), 2, "unknown git revision 'nope'")
    assert "### ⚠️ Metric check could not run\n\nunknown git revision 'nope'" in summary.read_text(encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_exit(
        gate(repo, "--rev", "nope", "--summary-file", str(folder)),
        2,
        "unknown git revision 'nope'",
        f"(Also, cannot append the report to the summary file {folder}: Is a directory.)",
    )
    # A FIFO that nothing reads is bad input, not a hang.
    write_metrics(repo, WORSE)
    fifo = tmp_path / "summary.fifo"
    os.mkfifo(fifo)
    failed = gate(repo, "--summary-file", str(fifo))
    assert failed.returncode == 2 and failed.stdout.startswith("### ❌ Metric check failed")
    assert f"{fifo}: it is a FIFO that nothing reads" in failed.text and "Traceback" not in failed.stderr


def test_a_crash_exits_2_never_1_which_means_a_regression(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mnist-check", "--summary-file", ""])
    monkeypatch.setattr(check, "load_rules", lambda path: 1 / 0)
    with pytest.raises(SystemExit) as crashed:
        check.cli()
    assert crashed.value.code == 2 and "ZeroDivisionError" in capsys.readouterr().err


def test_a_registry_that_refuses_the_credentials_is_bad_input(repo):
    from test_tracking_server import FakeServer

    # Health checks pass and every API call answers 401, as MLflow's basic-auth app does for a wrong password.
    server = FakeServer(health_status=200, other_status=401)
    try:
        credentials = {"MLFLOW_TRACKING_USERNAME": "someone", "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(8)}
        result = gate(repo, "--champion", MLFLOW_TRACKING_URI=server.url, **credentials)
    finally:
        server.close()
    assert_exit(result, 2, f"the MLflow registry at {server.url} failed", "failed with error code 401")


# ---------------------------------------------------------------------------------------------
# The GitHub Actions workflow.

WORKFLOW = yaml.safe_load((ROOT / ".github/workflows/metrics-gate.yml").read_text(encoding="utf-8"))
JOB = WORKFLOW["jobs"]["metrics-gate"]


@pytest.mark.parametrize(("metrics", "code"), [(BETTER, 0), (WORSE, 1)])
def test_the_workflow_gates_pull_requests_and_promotes_on_main(repo, tmp_path, metrics, code):
    """Its gate step run in a clone whose pull-request branch has no local main, as actions/checkout leaves it."""
    assert "pull_request" in WORKFLOW[True] and WORKFLOW[True]["push"] == {"branches": ["main"]}  # YAML 1.1: on → True
    steps = {step.get("uses", step.get("run", "")).split("@")[0]: step for step in JOB["steps"]}
    assert list(steps).index("actions/cache") < list(steps).index("uv run --locked dvc repro")
    assert steps["actions/checkout"]["with"]["fetch-depth"] == 0  # The base branch, for the merge base.
    gate_step, promote_step = JOB["steps"][-2:]
    assert gate_step["if"] == "github.event_name == 'pull_request'"
    assert gate_step["env"]["BASE_REF"] == "${{ github.base_ref }}"  # Through the environment: no shell injection.
    assert promote_step["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert "--champion --promote" in promote_step["run"]
    assert not any("continue-on-error" in step for step in (gate_step, promote_step))
    assert JOB["env"]["MLFLOW_TRACKING_PASSWORD"] == "${{ secrets.MLFLOW_TRACKING_PASSWORD }}"
    repo.git("clone", "-q", "-b", "feature", str(repo.root), str(tmp_path / "checkout"))
    project = Project(tmp_path / "checkout", {**repo.env, "PYTHONPATH": str(tmp_path / "checkout"), "BASE_REF": "main"})
    write_metrics(project, metrics)  # As `dvc repro` leaves them, uncommitted.
    script = gate_step["run"].replace("uv run --locked python", sys.executable)
    summary = tmp_path / "summary.md"
    result = project.run("bash", "-e", "-c", script, env={"GITHUB_STEP_SUMMARY": str(summary)}, check=False)
    head = f"### {'❌ Metric check failed' if code else '✅ Metric check passed'}"
    assert result.returncode == code and summary.read_text(encoding="utf-8").startswith(head), result.stderr
    assert f"against origin/main ({project.git('rev-parse', '--short=7', 'origin/main')})" in summary.read_text()
    if code:  # Without --rev, the merge base with origin/main.
        assert "against the merge base with origin/main (" in gate(project).text


# ---------------------------------------------------------------------------------------------
# Whatever a metrics or baseline file holds, the gate gives a verdict (0, 1) or bad input (2).

EDGES = st.sampled_from([0, -0.0, 1e-320, 1e308, -1e308, 2**53 + 1, 10**400, math.nan, math.inf, -math.inf])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | EDGES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)


def verdict(old: dict | None, new: dict) -> int:
    """The gate after its reading: the rules, the report, and the exit code (2 for CheckError)."""
    try:
        now, before = check.values(new, RULES, "now", True), check.values(old or {}, RULES, "before", False)
        rows = [check.check(metric, before.get(metric), now[metric], rule, "") for metric, rule in RULES.items()]
    except CheckError as error:
        assert str(error)
        return 2
    environment = environment_difference(check.recorded_environment(old or {}), check.recorded_environment(new))
    render_markdown(rows, check.origin("x"), environment, None)
    return 1 if any(row["reasons"] for row in rows) else 0


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from([*RULES, "per_class_recall", "environment", ""]), value=JSON, baseline=st.booleans())
def test_any_metric_value_gives_a_verdict_or_bad_input(name, value, baseline):
    changed = flat(BASE | {name: value})
    assert (verdict(changed, flat(BASE)) if baseline else verdict(flat(BASE), changed)) in (0, 1, 2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=JSON.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=64))
def test_any_baseline_file_gives_a_verdict_or_bad_input(tmp_path, content):
    (tmp_path / "b.json").write_bytes(content)
    try:
        _, metrics = check.file_baseline(tmp_path / "b.json")
    except CheckError as error:
        assert "b.json" in str(error)
        return
    assert verdict(metrics, flat(BASE)) in (0, 1, 2)
