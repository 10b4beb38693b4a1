"""Every stage depends on exactly the project code it runs, so a code change reruns exactly those stages.

The modules a stage runs are derived, not listed: each stage's dvc.yaml command is run for real in a
small reproduced project with ``PYTHONPROFILEIMPORTTIME=1``, which makes every Python process (the
stage and anything it starts) print each module it imports. The project modules among them are
compared with the stage's ``deps`` in dvc.yaml, in both directions. Then each module under
``pipeline/`` is changed in turn and ``dvc status`` must name exactly the stages that run it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pipeline_project import make_project

pytestmark = pytest.mark.slow

STAGES = ("fetch", "preprocess", "train", "report")
# Command-line tools that are no stage: the metric gate, mnist-predict and mnist-sweep.
TOOLS = {"pipeline/check.py", "pipeline/predict.py", "pipeline/reproduce.py", "pipeline/sweep.py"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s*(\S+)\s*$", re.MULTILINE)


def module_file(module: str) -> str:
    """The project file a module name comes from: pipeline.tracking.store → pipeline/tracking/store.py."""
    path = Path(*module.split("."))
    return (path / "__init__.py").as_posix() if (ROOT / path).is_dir() else f"{path.as_posix()}.py"


def stage_deps(stage: str) -> list[str]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]


def covered(path: str, deps: list[str]) -> bool:
    """Whether a dvc.yaml dependency (a file, or a folder and everything in it) covers ``path``."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def pipeline_modules() -> list[str]:
    return sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "pipeline").rglob("*.py"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("deps"))
    project.dvc("repro", timeout=900)
    project.commit("reproduced")
    return project


@pytest.fixture(scope="module")
def runs(project) -> dict[str, set[str]]:
    """For each stage, the project files its process (and any process it starts) imported."""
    found = {}
    for stage in STAGES:
        command = project.stage_command(stage)
        # Bytecode caches are written, as in a user's run (the tests' environment turns them off).
        result = project.run(*command, env={"PYTHONPROFILEIMPORTTIME": "1", "PYTHONDONTWRITEBYTECODE": ""}, timeout=600)
        modules = {name for name in IMPORT_LINE.findall(result.stderr) if name.split(".")[0] == "pipeline"}
        # `python -m pipeline.train` runs that module as __main__, so its own name is not imported.
        modules |= {command[index + 1] for index, word in enumerate(command[:-1]) if word == "-m"}
        assert modules, f"no project module was imported by {stage}; is PYTHONPROFILEIMPORTTIME honoured?"
        found[stage] = {module_file(module) for module in modules}
    # Running the stages again changed no output (same inputs, same bytes) and no dependency (the
    # __pycache__ folders they left are ignored), so DVC still sees the project as reproduced.
    assert "up to date" in project.dvc("status").stdout
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_every_module_the_stage_runs_and_no_other(runs, stage):
    deps = stage_deps(stage)
    missing = sorted(path for path in runs[stage] if not covered(path, deps))
    assert not missing, f"stage {stage} runs {', '.join(missing)} but dvc.yaml does not list it in its deps"
    for module in pipeline_modules():
        if covered(module, deps):
            assert module in runs[stage], f"stage {stage} lists {module} in its deps but never runs it"


def test_the_derived_table_covers_every_module(runs):
    """Every module under pipeline/ is run by some stage, or is a command-line tool outside the pipeline."""
    run_by_some_stage = set().union(*runs.values())
    outside = {module for module in pipeline_modules() if module not in run_by_some_stage}
    assert outside <= TOOLS, f"modules no stage runs: {sorted(outside)}"


@pytest.mark.parametrize("module", pipeline_modules())
def test_changing_a_module_marks_exactly_the_stages_that_run_it(project, runs, module):
    path = project.root / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# changed by test_dependencies\n")
        status = json.loads(project.dvc("status", "--json").stdout)
    finally:
        path.write_bytes(original)
    changed = {
        stage
        for stage, entries in status.items()
        if any("changed deps" in entry for entry in entries if isinstance(entry, dict))
    }
    expected = {stage for stage in STAGES if module in runs[stage]}
    assert changed == expected, f"changing {module}: dvc status names {sorted(changed)}, expected {sorted(expected)}"


def test_changing_the_lock_file_marks_every_stage(project):
    """uv.lock pins every library the stages run, so a dependency upgrade reruns the whole pipeline."""
    path = project.root / "uv.lock"
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n")
        status = json.loads(project.dvc("status", "--json").stdout)
    finally:
        path.write_bytes(original)
    assert set(status) == set(STAGES)


def test_the_table_of_modules_and_stages(runs, capsys):
    """Prints the derived table (pytest -s shows it); fails only if a stage ran no module of its own."""
    for stage in STAGES:
        assert f"pipeline/{stage}.py" in runs[stage]
    rows = ["| module | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for module in pipeline_modules():
        rows.append(f"| {module} | " + " | ".join("x" if module in runs[stage] else "" for stage in STAGES) + " |")
    print("\n" + "\n".join(rows))
