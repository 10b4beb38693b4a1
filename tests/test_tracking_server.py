"""Tracking servers: a shared one on PostgreSQL (skipped, saying why, where it is missing), one that fails before
or during a run (one paragraph, no output touched, the run closed later), and a password never written or printed."""

from __future__ import annotations

import glob
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import snapshot, stage_env, with_credentials
from pipeline_project import TRAIN_OUTPUTS, MlflowServer, free_port, make_project
from test_train import OUTPUTS, runs, start_training

pytestmark = pytest.mark.slow

EXPERIMENT = NAME = "mnist-softmax"
# The rules loosened for the synthetic data, whose accuracy is far below the gate's floor.
LOOSE = yaml.safe_dump({"test_accuracy": {"better": "higher", "max_worsening": 0.002}})
# The password in the tracking URIs of the tests: found nowhere the pipeline writes or prints.
SECRET = secrets.token_hex(10)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1; yields its ``postgres`` database URI."""
    on_path = [Path(found).resolve().parent] if (found := shutil.which("pg_ctl")) else []
    candidates = on_path + [Path(path) for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    bin_dir = next((path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl); run scripts/install_test_services.sh")
    # PostgreSQL refuses to run as root; Debian's package brings the postgres user for this. Not
    # under pytest's tmp_path, which is private to root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 and shutil.which("runuser") else []
    directory = Path(tempfile.mkdtemp(prefix="mlflow-test-postgres."))
    if as_user:
        shutil.chown(directory, "postgres", "postgres")
    data, log, port = directory / "data", directory / "postgres.log", free_port()

    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        command = [*as_user, str(bin_dir / tool), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=directory)

    try:
        init = run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr[-1000:]}")
        # fsync off: a test database need not survive a power cut. The socket goes in its own folder.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off"
        start = run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        if start.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {start.stdout[-500:]} {log.read_text()[-1500:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")  # Refused if it never started.
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on PostgreSQL; yields its URL and its artifacts folder (test_sweep uses it too)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: uv sync")
    directory = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(directory, postgres).running() as server:
        yield server.url, directory / "artifacts"


@pytest.mark.postgres
def test_a_shared_server_on_postgresql_gets_everything_and_no_password(postgres, mlflow_server, tmp_path):
    """What test_pipeline checks on the local store, here through a server (params, histories, artifacts, registry,
    gate, predict) with a password in its URI, which is found nowhere the pipeline writes or prints. The server does
    not check it (its basic-auth app needs ``mlflow[auth]``, which the project does not install)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    url, artifacts = mlflow_server
    with_password = with_credentials(url, "admin", SECRET)
    masked = with_password.replace(SECRET, "***")
    project = make_project(tmp_path, env={"MLFLOW_TRACKING_URI": with_password})
    printed = [project.dvc("repro", timeout=600)]
    # Nothing went to a local store.
    assert not (project.root / "mlflow.db").exists() and not (project.root / "mlartifacts").exists()
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "lr=0.003 bs=20 it=50 seed=0"
    train_params = {f"train.{key}": str(value) for key, value in project.params()["train"].items()}
    described = {"data.train_examples", "data.test_examples", "model", "model.script", "loss", "optimizer"}
    assert run.data.params.keys() == train_params.keys() | described
    assert train_params.items() <= run.data.params.items() and run.data.params["data.train_examples"] == "200"
    assert run.data.tags["git.commit"] == project.git("rev-parse", "HEAD")

    # Every step's measurement, with its step, equal to the history DVC plots.
    for key in ("train_accuracy", "train_cross_entropy_sum", "test_accuracy", "test_cross_entropy_sum"):
        rows = pd.read_csv(project.root / f"metrics/{key.split('_')[0]}_history.csv")
        logged = client.get_metric_history(run.info.run_id, f"history/{key}")
        assert [metric.step for metric in logged] == rows["step"].tolist(), key
        assert [metric.value for metric in logged] == pytest.approx(rows[key].tolist(), rel=1e-6), key

    # Artifacts, fetched back through the server, are the files the stages wrote.
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloads")))
    for name in ("train_history.csv", "test_history.csv", "parameter_percentiles.csv", "report/metrics.json"):
        assert (downloaded / name).is_file(), name
    for name in ("accuracy.png", "mistakes.png", "weight_maps.png"):
        assert (downloaded / "report" / name).read_bytes() == (project.root / "metrics" / name).read_bytes()
    lock = (project.root / "dvc.lock").read_text()
    logged_lock = (downloaded / "dvc.lock").read_text()
    assert yaml.safe_load(logged_lock)["stages"]["train"] == yaml.safe_load(lock)["stages"]["train"]
    # The server kept them in its --artifacts-destination, not beside the project.
    assert any(artifacts.rglob("accuracy.png"))

    # The registry on the server: the run's model is version 1; the gate finds no champion, promotes that
    # version, then compares with it.
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert str(version.version) == "1" and version.run_id == version.tags["run_id"] == run.info.run_id
    (project.root / "loose.yaml").write_text(LOOSE)
    gate = ["-m", "pipeline.check", "--rules", "loose.yaml", "--summary-file", "summary.md", "--champion"]
    printed.append(project.python(*gate, "--json", check=False))
    assert json.loads(printed[-1].stdout)["baseline"]["missing_reason"] == f"{NAME} has no champion yet in {masked}"
    printed += [project.python(*gate, "--promote"), project.python(*gate, "--json")]
    assert f"Promoted {NAME} version 1 to `models:/{NAME}@champion` (there was no champion)" in printed[-2].stdout
    # The model loads through the server, by id and as champion; mnist-predict answers, or names the store.
    images = np.load(project.root / "data/processed/test_images.npy")[:8]
    expected_probabilities = np.load(project.root / "models/test_probabilities.npy")[:8]
    mlflow.set_tracking_uri(url)
    try:
        for model_uri in (f"models:/{run.outputs.model_outputs[0].model_id}", f"models:/{NAME}@champion"):
            predicted = [answer["probabilities"] for answer in mlflow.pyfunc.load_model(model_uri).predict(images)]
            assert np.array(predicted).shape == (8, 10) and np.allclose(predicted, expected_probabilities, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)
    Image.fromarray(images[0].reshape(28, 28)).save(project.root / "digit.png")
    predict = ["-m", "pipeline.predict", "digit.png", "--model"]
    printed.append(project.python(*predict, f"models:/{NAME}@champion"))
    printed.append(project.python(*predict, "models:/no-such-model@champion", check=False))
    assert printed[-1].returncode == 1 and masked in " ".join(printed[-1].stderr.split()), printed[-1].stderr

    # The gate on the database itself, with a password (PostgreSQL's trust authentication accepts any).
    database = with_credentials(postgres.replace("postgresql://postgres@", "postgresql+psycopg://"), "postgres", SECRET)
    env = {"MLFLOW_TRACKING_URI": database, "MNIST_REGISTERED_MODEL": "gate-password-test"}
    printed.append(project.python(*gate, "--json", env=env))
    masked_database = database.replace(SECRET, "***")
    assert json.loads(printed[-1].stdout)["baseline"]["missing_reason"] == (
        f"gate-password-test has no champion yet in {masked_database}"
    )
    assert masked_database in (project.root / "summary.md").read_text() and (project.root / ".dvc/cache/runs").is_dir()
    assert SECRET not in "".join(result.stdout + result.stderr for result in printed)
    # Every file of the project (dvc.lock, DVC's cache and run cache, metrics/, the summary, git's objects)
    # and the server's artifacts, which hold what the pipeline sent.
    holding = [path for path in (*tmp_path.rglob("*"), *artifacts.rglob("*")) if path.is_file()]
    assert [str(path) for path in holding if SECRET.encode() in path.read_bytes()] == []
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert SECRET not in json.dumps([client.get_run(run.info.run_id).data.tags, run.data.params, version.tags])


class FakeServer:
    """An HTTP server on 127.0.0.1 that answers ``/health`` with one status and everything else with another."""

    def __init__(self, health_status: int, other_status: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # An HTML page whatever the status, as a proxy sends; the health check reads the status alone.
                self.send_error(health_status if self.path.rstrip("/").endswith("/health") else other_status)

            do_POST = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind", ["silent", "not-mlflow", "api-fails", "unknown-scheme"])
def test_a_failing_server_stops_the_stage_before_training_and_leaves_the_outputs_untouched(reproduced_project, kind):
    silent = socket.create_server(("127.0.0.1", 0))  # Takes connections, never answers: a hung server.
    fake = {"not-mlflow": (404, 404), "api-fails": (200, 500)}.get(kind)  # The health check's status, the API's.
    fake = fake and FakeServer(*fake)
    uri, phrase = {
        "silent": (f"http://127.0.0.1:{silent.getsockname()[1]}", "cannot be reached"),
        "not-mlflow": (fake and fake.url, "does not look like an MLflow tracking server"),
        "api-fails": (fake and fake.url, "failed"),
        "unknown-scheme": ("htp://127.0.0.1:5000", "MLFLOW_TRACKING_URI"),
    }[kind]
    before = snapshot(reproduced_project.root)  # The outputs, the MLflow store, git and DVC's files.
    try:  # The stage's own command (dvc repro would first delete the outputs).
        command = reproduced_project.stage_command("train")
        result = reproduced_project.run(*command, env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120)
    finally:
        silent.close()
        fake and fake.close()
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and "Traceback" not in output and uri in output and phrase in output, output
    assert "MLflow run " not in output and "trained " not in output, output
    assert snapshot(reproduced_project.root) == before


@pytest.fixture
def server(tmp_path):
    (tmp_path / "server").mkdir()
    with MlflowServer(tmp_path / "server").running() as running:
        yield running


def train_against(server: MlflowServer, project: Path, retries: int, timeout: int) -> subprocess.Popen:
    """3,000 steps logged to ``server`` with MLflow's ``retries`` (backoff factor 1) and ``timeout`` seconds."""
    env = stage_env(
        MLFLOW_TRACKING_URI=server.url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout),
    )
    process = start_training(project, env, iterations=3000, eval_interval=100)
    assert process.stderr is not None and any("MLflow run " in line for line in process.stderr), "no run started"
    return process


def test_a_server_restarted_mid_run_loses_nothing(processed_project, server):
    # A generous timeout (the restarted one-worker server takes every queued request at once); 7 retries wait 126 s.
    process = train_against(server, processed_project, retries=7, timeout=60)
    server.stop()
    time.sleep(2)  # Requests sent meanwhile are refused, and retried.
    server.start()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    client, (run,) = runs(server.url)
    assert run.info.status == "FINISHED"
    for metric in ("history/train_accuracy", "history/train_cross_entropy_sum"):
        steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(1, 3001)), f"{metric}: {len(steps)} of 3000 points arrived"
    assert all((processed_project / path).is_file() for path in OUTPUTS.values())


@pytest.mark.parametrize("fault", ["gone", "hung"])
def test_a_server_gone_for_good_or_hung_stops_the_stage_and_its_run_is_closed_later(processed_project, server, fault):
    # Gone: 3 retries wait 6 s, then the health check gives up. Hung: a health check gets no answer
    # within the 3 s timeout; the stage then tries to mark the run FAILED (3 retries of 3 s, 6 s of
    # backoff): about 25 s in all, against the 125 s MLflow's retries alone would take.
    process = train_against(server, processed_project, retries=3, timeout=10 if fault == "gone" else 3)
    server.stop() if fault == "gone" else server.signal(signal.SIGSTOP)
    failed = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    took, message = time.monotonic() - failed, " ".join(stderr.split())
    assert process.returncode == 1 and "Traceback" not in stderr and "wrote no output" in message, stderr
    assert server.url in message and (fault == "gone" or "stopped answering" in message and "within 3 s" in message)
    assert not any((processed_project / path).exists() for path in OUTPUTS.values())
    assert took < 45, f"the stage took {took:.0f} s to give up"
    server.stop()
    server.start()
    client, (abandoned,) = runs(server.url)
    assert abandoned.info.status in ("RUNNING", "FAILED")
    second = train_against(server, processed_project, retries=5, timeout=60)
    assert second.wait(timeout=600) == 0
    client, (first, _) = runs(server.url)
    assert first.info.status == "FAILED" and (fault == "hung" or "pipeline.closed_because" in first.data.tags)


def test_dvc_remote_push_then_pull_in_a_fresh_clone_restores_everything_without_rerunning(reproduced_project, tmp_path):
    reproduced, remote, clone = reproduced_project, tmp_path / "remote", tmp_path / "clone"
    reproduced.commit("Reproduce the pipeline")
    reproduced.dvc("remote", "add", "-d", "storage", str(remote))
    reproduced.commit("Add the team's DVC remote")
    reproduced.dvc("push", timeout=300)
    assert any(path.is_file() for path in remote.rglob("*"))
    reproduced.run("git", "clone", "-q", str(reproduced.root), str(clone))
    # A fresh clone has no DVC cache and none of the outputs, only what git holds.
    assert not (clone / "data/raw").exists() and not (clone / "models/model.keras").exists()
    pulled = reproduced.dvc("pull", cwd=clone, timeout=300)
    for name in ("data/raw/train-images-idx3-ubyte", "data/processed/train_images.npy", *TRAIN_OUTPUTS[:2]):
        assert (clone / name).read_bytes() == (reproduced.root / name).read_bytes(), name
    assert "Data and pipelines are up to date." in reproduced.dvc("status", cwd=clone, timeout=120).stdout
    # Nothing ran: no stage wrote an MLflow store in the clone.
    assert "Running stage" not in pulled.stdout and not (clone / "mlflow.db").exists()
