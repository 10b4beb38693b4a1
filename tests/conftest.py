"""Shared fixtures: the project's location, the real MNIST mirror, editable params files, and one tiny
project reproduced once per session (``reproduced_template``) that tests copy (``reproduced_project``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "mnist"


def stage_env(**extra: str) -> dict[str, str]:
    """The environment a stage subprocess runs in: this checkout importable, no stray tracking URI."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_", "MNIST_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run ``python -m module args`` the way DVC would, returning the completed process."""
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=cwd, env=env or stage_env(), capture_output=True, text=True, timeout=timeout)


def write_params(directory: Path, **sections: dict) -> Path:
    """Copy the project's params.yaml into ``directory``, overriding the given keys per section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path = Path(directory) / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password`` as its user information, put together here so that no committed line
    spells out a URI with a password (the password is generated at run time)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}" + "@" + rest


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, to prove that a failed run changed nothing."""
    files = sorted(path for path in Path(directory).rglob("*") if path.is_file())
    return {str(path.relative_to(directory)): path.read_bytes() for path in files}


@pytest.fixture
def shared_mnist() -> Path:
    from pipeline.data import FILES

    if not all((SHARED_MNIST / f"{name}.gz").exists() for name in FILES):
        pytest.skip(f"the real MNIST mirror {SHARED_MNIST} is absent on this machine")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory):
    """The tiny project after one ``dvc repro`` (``.reproduced``), outputs uncommitted: read it, never change it."""
    from pipeline_project import make_project

    # oneDNN forced on, as TensorFlow does by default on CPUs with AVX-512, where it announces itself.
    project = make_project(tmp_path_factory.mktemp("reproduced"), env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    project.reproduced = project.dvc("repro", timeout=900)
    return project


@pytest.fixture
def reproduced_project(reproduced_template, tmp_path):
    """A test's own copy of ``reproduced_template`` (git, DVC cache, MLflow store), to run or change."""
    return reproduced_template.copy_to(tmp_path / "reproduced")


# Fixtures that build a git + DVC repository or run a stage as a subprocess: seconds per test, so
# the tests that use them belong to the slow set (`pytest -m "not slow"` leaves them out).
SLOW_FIXTURES = {"repo", "processed_project", "report_project", "reproduced_template", "reproduced_project"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 KiB, too small for the synthetic training images; skips the test where mounting needs root."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mountpoint)]
    if shutil.which("mount") is None:
        pytest.skip("there is no mount command to make a small file system with")
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=True)


@pytest.fixture(scope="session")
def processed_data(tmp_path_factory):
    """data/processed of 250 training and 50 test images, preprocessed once per session."""
    from idx_fixtures import write_mnist

    root = tmp_path_factory.mktemp("processed-data")
    write_mnist(root / "raw", train_count=300, test_count=50, gz=False)
    write_params(root, preprocess={"validation_size": 50})
    assert run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=root).returncode == 0
    return root / "processed"


@pytest.fixture
def processed_project(tmp_path, processed_data):
    """A folder to run the train stage in: that data, and params.yaml with 60 steps of 10 images."""
    shutil.copytree(processed_data, tmp_path / "processed")
    train = {"batch_size": 10, "iterations": 60, "eval_interval": 20}
    write_params(tmp_path, preprocess={"validation_size": 50}, train=train)
    return tmp_path


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright (skips, saying why, where either is missing)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium is not installed (bash scripts/install_test_services.sh installs Debian's chromium)")
    pytest.importorskip("playwright", reason="playwright is missing: uv sync installs the dev group")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()
