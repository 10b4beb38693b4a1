"""The project's own promise about itself: CI runs the README's test command, from the lock."""

from __future__ import annotations

import re

from conftest import ROOT


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(uv run [^#\n]*?)\s*(?:#.*)?$", quick_start, re.MULTILINE)
    assert commands[:2] == ["uv run dvc repro", "uv run pytest -n 2"], commands
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert ci_lines[-1] == "uv run pytest -n 2", "the last thing .ci/run does is the README's test command"
    assert "uv sync --locked" in ci_lines
