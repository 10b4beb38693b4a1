"""Every stage depends on exactly the project code it runs, so a code change reruns exactly those stages. The
modules are derived: ``dvc repro`` with ``PYTHONPROFILEIMPORTTIME=1`` makes every Python process (a stage and what
it starts) print each module it imports after DVC's "Running stage" line; they are compared with dvc.yaml's deps."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pipeline_project import VENV_BIN, make_project

pytestmark = pytest.mark.slow

STAGES = ("fetch", "preprocess", "train", "report")
# Command-line tools that are no stage: the metric gate, mnist-predict, mnist-reproduce and mnist-sweep.
TOOLS = {"pipeline/check.py", "pipeline/predict.py", "pipeline/reproduce.py", "pipeline/sweep.py"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s*(pipeline\S*)\s*$", re.MULTILINE)
MODULES = {path.relative_to(ROOT).as_posix() for path in (ROOT / "pipeline").rglob("*.py")}


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    return (path / "__init__.py").as_posix() if (ROOT / path).is_dir() else f"{path.as_posix()}.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, set[str]]:
    """For each stage, the project files its process (and any process it starts) imported."""
    project = make_project(tmp_path_factory.mktemp("deps"))
    # One stream, so each stage's imports follow the line announcing it.
    result = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**project.env, "PYTHONPROFILEIMPORTTIME": "1"},
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    parts = re.split(r"^Running stage '(\w+)':$", result.stdout, flags=re.MULTILINE)[1:]
    # `python -m pipeline.<stage>` runs that module as __main__, so its own name is not in the list.
    found = {
        stage: {module_file(name) for name in {f"pipeline.{stage}", *IMPORT_LINE.findall(output)}}
        for stage, output in zip(parts[::2], parts[1::2])
    }
    assert set(found) == set(STAGES) and all(len(modules) > 1 for modules in found.values()), result.stdout[-5000:]
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_every_module_the_stage_runs_and_no_other(runs, stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    # A dependency is a file, or a folder and everything in it.
    listed = {path for path in MODULES if any(Path(path).is_relative_to(dep) for dep in deps)}
    assert runs[stage] - listed == set(), f"stage {stage} runs these, but its deps in dvc.yaml do not list them"
    assert listed - runs[stage] == set(), f"stage {stage} lists these in its deps in dvc.yaml, but never runs them"
    # uv.lock pins every library the stages run, so a dependency upgrade reruns the whole pipeline.
    assert "uv.lock" in deps


def test_every_module_is_run_by_a_stage_or_is_a_command_line_tool(runs):
    assert MODULES - set().union(*runs.values()) <= TOOLS
