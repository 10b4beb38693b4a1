"""A tracking server that fails mid-run: restarted, gone for good, or hung (stopped, not dead).

Each test runs the real train stage against a real ``mlflow server`` (SQLite behind it) on
127.0.0.1, and does to the server what happens to servers: its processes are killed and it is
started again on the same port, killed for good, or stopped with SIGSTOP so that it takes
connections but never answers. What must hold: a brief outage costs nothing (every value logged
meanwhile arrives), a lasting one or a hang stops the stage within the configured time with a clear
error and no output written, and no run is left RUNNING once the server is back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_module, stage_env, write_params
from idx_fixtures import write_mnist
from pipeline_project import VENV_BIN, server_env
from test_tracking_server import free_port, wait_for_http
from test_train import TRAIN_ARGS

pytestmark = pytest.mark.slow

EXPERIMENT = "mnist-softmax"
# Every path the train stage is given but its input.
OUTPUTS = tuple(path for flag, path in zip(TRAIN_ARGS[::2], TRAIN_ARGS[1::2]) if flag != "--data")


class Server:
    """``mlflow server`` in its own session, restartable on the same port with the same store."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.directory / "server.log"
        env = server_env()
        with open(log, "a") as handle:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
                 "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.directory,
                start_new_session=True,
            )  # fmt: skip
        wait_for_http(f"{self.url}/health", self.process, timeout=180, log=log)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def server(tmp_path):
    directory = tmp_path / "server"
    directory.mkdir()
    running = Server(directory)
    running.start()
    yield running
    running.close()


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    write_mnist(root / "raw", train_count=300, test_count=50, gz=False)
    write_params(root, preprocess={"validation_size": 50})
    assert run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=root).returncode == 0
    return root


def start_training(project: Path, server: Server, retries: int, timeout: int) -> subprocess.Popen:
    """Train against ``server`` with MLflow's HTTP settings: ``retries`` (backoff factor 1) and ``timeout`` seconds."""
    write_params(project, preprocess={"validation_size": 50},
                 train={"batch_size": 10, "iterations": 3000, "eval_interval": 100})  # fmt: skip
    env = stage_env(MLFLOW_TRACKING_URI=server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries),
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))  # fmt: skip
    command = [sys.executable, "-m", "pipeline.train", *TRAIN_ARGS]
    return subprocess.Popen(command, cwd=project, env=env, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, phrase: str, timeout: float = 300) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if phrase in line or time.monotonic() > deadline:
            break
    assert any(phrase in line for line in seen), "".join(seen)
    return seen


def runs(server: Server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_server_restarted_mid_run_loses_nothing(project, server):
    # A generous request timeout: the restarted server, with one worker, takes every queued request at once.
    # Seven retries wait 126 s in all.
    process = start_training(project, server, retries=7, timeout=60)
    wait_for_line(process, "MLflow run ")
    server.kill()
    time.sleep(2)  # Requests sent meanwhile are refused, and retried.
    server.start()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    client, (run,) = runs(server)
    assert run.info.status == "FINISHED"
    for metric in ("history/train_accuracy", "history/train_cross_entropy_sum"):
        steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(1, 3001)), f"{metric}: {len(steps)} of 3000 points arrived"
    assert all((project / name).is_file() for name in OUTPUTS)


def test_a_server_gone_for_good_stops_the_stage_and_its_run_is_closed_later(project, server):
    # Three retries wait 6 s in all.
    process = start_training(project, server, retries=3, timeout=10)
    wait_for_line(process, "MLflow run ")
    server.kill()
    gone = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    took = time.monotonic() - gone
    message = " ".join(stderr.split())
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert server.url in message and "wrote no output" in message, message
    assert not any((project / name).exists() for name in OUTPUTS)
    # The bound is the retry time, plus a health check's interval and the exit; not minutes.
    assert took < 60, f"the stage took {took:.0f} s to give up"

    server.start()
    client, (abandoned,) = runs(server)
    assert abandoned.info.status == "RUNNING"
    second = start_training(project, server, retries=5, timeout=60)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    client, (first, _) = runs(server)
    assert first.info.status == "FAILED" and "pipeline.closed_because" in first.data.tags


def test_a_hung_server_stops_the_stage_within_the_request_timeout(project, server):
    process = start_training(project, server, retries=3, timeout=3)
    wait_for_line(process, "MLflow run ")
    server.signal(signal.SIGSTOP)
    hung = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=300)
        took = time.monotonic() - hung
    finally:
        server.signal(signal.SIGCONT)
    message = " ".join(stderr.split())
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert "stopped answering" in message and "within 3 s" in message, message
    assert not any((project / name).exists() for name in OUTPUTS)
    # Found by a health check (every 2 s) with no answer in 3 s. The stage then exits once the
    # requests already in flight have spent their retries: 3 retries of 3 s each, plus
    # 6 s of backoff, so about 20 s at most, against 125 s before.
    assert took < 45, f"the stage took {took:.0f} s to give up on a hung server"
    client, (run,) = runs(server)
    assert run.info.status in ("RUNNING", "FAILED")
