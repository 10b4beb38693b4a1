"""The project's own promises about itself: CI runs the README's test command, from the lock."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(uv run [^#\n]*?)\s*(?:#.*)?$", quick_start, re.MULTILINE)
    assert commands[:2] == ["uv run dvc repro", "uv run pytest -n 2"], commands
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert ci_lines[-1] == "uv run pytest -n 2", "the last thing .ci/run does is the README's test command"
    assert "uv sync --locked" in (ROOT / ".ci/run").read_text()


def test_python_is_pinned_in_both_places():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = (ROOT / ".python-version").read_text().strip()
    assert project["requires-python"] == f"=={pinned}.*"
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert lock["requires-python"] == f"=={pinned}.*"
