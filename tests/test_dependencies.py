"""Each stage's deps in dvc.yaml hold every project module it runs, and .dvcignore hides exactly the modules no stage
runs: the modules each stage imports, as ``PYTHONPROFILEIMPORTTIME=1`` makes a real ``dvc repro`` print them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pipeline_project import VENV_BIN, Project, make_project

pytestmark = pytest.mark.slow

STAGES = ("fetch", "preprocess", "train", "report")
IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s*(pipeline\S*)\s*$", re.MULTILINE)
MODULES = {path.relative_to(ROOT).as_posix() for path in (ROOT / "pipeline").rglob("*.py")}
FILE_OF_MODULE = {path.removesuffix(".py").removesuffix("/__init__").replace("/", "."): path for path in MODULES}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("deps"))


@pytest.fixture(scope="module")
def runs(project) -> dict[str, set[str]]:
    """For each stage, the project files its process (and any process it starts) imported."""
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
        stage: {FILE_OF_MODULE[name] for name in {f"pipeline.{stage}", *IMPORT_LINE.findall(output)}}
        for stage, output in zip(parts[::2], parts[1::2])
    }
    assert set(found) == set(STAGES) and all(len(modules) > 1 for modules in found.values()), result.stdout[-5000:]
    return found


@pytest.fixture(scope="module")
def ignored(project) -> set[str]:
    """The project's modules that DVC does not see."""
    return set(project.dvc("check-ignore", *sorted(MODULES), check=False).stdout.split())


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_runs_is_in_its_deps_and_seen_by_dvc(runs, ignored, stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    # A dependency is a file, or a folder and everything in it.
    listed = {path for path in MODULES if any(Path(path).is_relative_to(dep) for dep in deps)}
    assert runs[stage] - listed == set(), f"stage {stage} runs these, but its deps in dvc.yaml do not hold them"
    assert runs[stage] & ignored == set(), f"stage {stage} runs these, but .dvcignore hides them from DVC"
    # uv.lock pins every library the stages run, so a dependency upgrade reruns the whole pipeline.
    assert "uv.lock" in deps


def test_dvc_ignores_exactly_the_modules_no_stage_runs(project, runs, ignored):
    # The metric gate, mnist-predict, mnist-reproduce and mnist-sweep.
    assert ignored == MODULES - set().union(*runs.values()) and len(ignored) == 4, ignored
    for path in ignored:
        (project.root / path).write_text((project.root / path).read_text() + "# Edited.\n")
    assert "Data and pipelines are up to date." in project.dvc("status").stdout
