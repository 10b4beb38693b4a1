"""The team set-up: a shared MLflow server on PostgreSQL, a shared DVC remote, and a server that fails.

* A real PostgreSQL cluster (Debian's ``postgresql`` package, started by the test in a temporary
  directory) backs a real ``mlflow server --artifacts-destination``; the whole pipeline runs with
  ``MLFLOW_TRACKING_URI`` pointing at it, and everything is read back through the REST API: params,
  per-step metric histories, artifacts, and the model, loaded with mlflow.pyfunc
  and predicting. Only these tests skip, saying why, where PostgreSQL is not installed or will not
  start (scripts/install_test_services.sh installs it).
* An unreachable or misconfigured server stops the train stage within seconds, before any
  training, with a one-paragraph error naming the URI and no output file touched.
* ``dvc push`` to a local-directory remote, then ``dvc pull`` in a fresh clone, restores the data
  and the model with nothing rerun.
"""

from __future__ import annotations

import glob
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_project import REPORT_OUTPUTS, TRAIN_OUTPUTS, VENV_BIN, Project, base_env, make_project, server_env

pytestmark = pytest.mark.slow

EXPERIMENT = "mnist-softmax"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started in its own session, with all its worker processes."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def postgres_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or in Debian's versioned directory (newest first)."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(path) for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1; yields its ``mlflow`` database URI."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl); run scripts/install_test_services.sh")
    # PostgreSQL refuses to run as root; Debian's package brings the postgres user for this.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser, so PostgreSQL cannot be started as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    directory = Path(tempfile.mkdtemp(prefix="mlflow-test-postgres."))
    if as_user:
        try:
            shutil.chown(directory, "postgres", "postgres")
        except (LookupError, PermissionError) as error:
            shutil.rmtree(directory, ignore_errors=True)
            pytest.skip(f"cannot run PostgreSQL as the postgres user: {error}")
    data, log, port = directory / "data", directory / "postgres.log", free_port()

    def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*as_user, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )

    started = False
    try:
        init = run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr[-1000:]}")
        # fsync off: a test database need not survive a power cut, and this keeps MLflow's schema
        # migrations quick. The socket goes into the test's own directory, not /var/run.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off"
        start = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        if start.returncode != 0:
            pytest.skip(
                f"PostgreSQL did not start: {start.stdout[-500:]} {log.read_text()[-1500:] if log.exists() else ''}"
            )
        started = True
        create = run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        assert create.returncode == 0, create.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on PostgreSQL, proxying artifacts to a local directory; yields (url, that directory)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[dev]'")
    directory = tmp_path_factory.mktemp("mlflow-server")
    artifacts, log_path, port = directory / "artifacts", directory / "server.log", free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                postgres,
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=directory,
            # Its own session, so that stopping it also stops the web workers it forks.
            start_new_session=True,
        )
    try:
        wait_for_http(f"{url}/health", process, timeout=180, log=log_path)
        yield url, artifacts
    finally:
        stop(process)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Project:
    """A project whose pipeline ran against its local SQLite store, with the results committed."""
    project = make_project(tmp_path_factory.mktemp("reproduced"))
    project.dvc("repro", timeout=600)
    project.commit("Reproduce the pipeline")
    return project


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


@pytest.mark.postgres
def test_pipeline_logs_everything_to_a_shared_server_on_postgresql(mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    url, artifacts = mlflow_server
    project = make_project(tmp_path, env={"MLFLOW_TRACKING_URI": url})
    project.dvc("repro", timeout=600)

    # Nothing went to a local store.
    assert not (project.root / "mlflow.db").exists() and not (project.root / "mlartifacts").exists()

    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    params = project.params()
    from pipeline.model import SERIES

    softmax = SERIES["softmax"]
    assert run.data.params == {
        **{f"train.{key}": str(value) for key, value in params["train"].items()},
        "data.train_examples": "200",
        "data.test_examples": "60",
        "model": softmax.description,
        "model.script": softmax.script,
        "loss": "cross-entropy summed over the batch",
        "optimizer": softmax.optimizer_description,
    }
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]
    tags = run.data.tags
    assert run.info.run_name == "lr=0.003 bs=20 it=50 seed=0"
    assert tags["git.commit"] == project.git("rev-parse", "HEAD") and tags["git.dirty"] == "false"
    data_tags = project.data_tags((project.root / "dvc.lock").read_text())
    assert {key: value for key, value in tags.items() if key.startswith("data.")} == data_tags

    # Every step's measurement, with its step, equal to the history DVC plots.
    history = pd.read_csv(project.root / "metrics/train_history.csv")
    tests = pd.read_csv(project.root / "metrics/test_history.csv")
    for key, rows in (
        ("train_accuracy", history),
        ("train_cross_entropy_sum", history),
        ("test_accuracy", tests),
        ("test_cross_entropy_sum", tests),
    ):
        logged = client.get_metric_history(run.info.run_id, f"history/{key}")
        assert [metric.step for metric in logged] == rows["step"].tolist(), key
        assert [metric.value for metric in logged] == pytest.approx(rows[key].tolist(), rel=1e-6), key
    final = json.loads((project.root / "metrics/train.json").read_text())
    report = json.loads((project.root / "metrics/metrics.json").read_text())
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(final["final_test_accuracy"])
    assert run.data.metrics["macro_f1"] == pytest.approx(report["macro_f1"])

    # Artifacts, fetched back through the server, are the files the stages wrote.
    logged = set(artifact_paths(client, run.info.run_id))
    assert {
        "train_history.csv",
        "test_history.csv",
        "parameter_percentiles.csv",
        "dvc.lock",
        "report/metrics.json",
        "report/accuracy.png",
        "report/mistakes.png",
        "report/weight_maps.png",
    } <= logged
    downloads = tmp_path / "downloads"
    for name in ("accuracy.png", "mistakes.png", "weight_maps.png"):
        path = Path(client.download_artifacts(run.info.run_id, f"report/{name}", str(downloads)))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.read_bytes() == (project.root / "metrics" / name).read_bytes()
    logged_lock = yaml.safe_load(
        Path(client.download_artifacts(run.info.run_id, "dvc.lock", str(downloads))).read_text()
    )
    assert logged_lock["stages"]["train"] == lock["train"]
    # The server kept them in its --artifacts-destination, not beside the project.
    assert any(artifacts.rglob("accuracy.png")) and any(artifacts.rglob("MLmodel"))

    # The model: loadable as pyfunc, predicting what train predicted from raw pixels.
    (output,) = run.outputs.model_outputs
    images = np.load(project.root / "data/processed/test_images.npy")[:8]
    expected = np.load(project.root / "models/test_probabilities.npy")[:8]
    mlflow.set_tracking_uri(url)
    try:
        pyfunc_model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
        predicted = np.array([answer["probabilities"] for answer in pyfunc_model.predict(images)])
        assert predicted.shape == (8, 10) and np.allclose(predicted, expected, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)

    # The registry on the server: the run's model is version 1, tagged and described.
    name = "mnist-softmax"  # The default of $MNIST_REGISTERED_MODEL.
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id and version.tags["git.commit"] == tags["git.commit"]
    assert {key: value for key, value in version.tags.items() if key.startswith("data.")} == data_tags
    assert version.description.startswith(f"Test accuracy {report['test_accuracy']:.4f} on 60 test images")
    # The gate promotes it there (the synthetic data's accuracy is far below the floor, so the rules
    # are loosened for this run), and the champion loads through the server.
    loose = {"test_accuracy": {"better": "higher", "max_worsening": 0.002}}
    (project.root / "loose.yaml").write_text(yaml.safe_dump({**params, "check": loose}))
    check = project.python(
        "-m", "pipeline.check", "--params", "loose.yaml", "--champion", "--promote", env={"MLFLOW_TRACKING_URI": url}
    )
    assert f"Promoted {name} version 1 to `models:/{name}@champion` (there was no champion)" in check.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    mlflow.set_tracking_uri(url)
    try:
        champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        predicted = np.array([answer["probabilities"] for answer in champion.predict(images)])
        assert np.allclose(predicted, expected, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


class SilentServer:
    """Accepts connections and never answers: a hung server or a firewall that swallows packets."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        self.socket.close()


class FakeServer:
    """An HTTP server on 127.0.0.1 that answers ``/health`` with one status and everything else with another."""

    def __init__(self, health_status: int, other_status: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                status = health_status if self.path.rstrip("/").endswith("/health") else other_status
                body = b"OK" if status == 200 else b"<html><body>Internal error</body></html>"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["closed-port", "silent", "not-mlflow", "api-fails"])
def bad_server(request):
    """A tracking URI that cannot be used, and the phrase its error must contain."""
    if request.param == "closed-port":
        yield f"http://127.0.0.1:{free_port()}", "cannot be reached"
        return
    server = {
        "silent": SilentServer,
        "not-mlflow": lambda: FakeServer(health_status=404, other_status=404),
        # A server whose health check passes but whose database is down.
        "api-fails": lambda: FakeServer(health_status=200, other_status=500),
    }[request.param]()
    phrase = {
        "silent": "cannot be reached",
        "not-mlflow": "does not look like an MLflow tracking server",
        "api-fails": "failed",
    }[request.param]
    try:
        yield server.url, phrase
    finally:
        server.close()


def fingerprint(project: Project) -> dict[str, tuple[int, str]]:
    """Modification time and content hash of every train and report output."""
    found = {}
    for name in (*TRAIN_OUTPUTS, *REPORT_OUTPUTS):
        path = project.root / name
        found[name] = (
            (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) if path.exists() else None
        )
    return found


def check_fails_fast(result: subprocess.CompletedProcess, uri: str, phrase: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert uri in output and phrase in output, output
    # It failed before any run or training began (how long that took is the benchmark's business).
    assert "MLflow run " not in output and "trained " not in output, output


def test_unreachable_server_stops_dvc_repro_before_training(tmp_path):
    project = make_project(tmp_path)
    project.dvc("repro", "preprocess", timeout=300)
    uri = f"http://127.0.0.1:{free_port()}"

    result = project.dvc("repro", env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120)

    check_fails_fast(result, uri, "cannot be reached")
    assert "Nothing was trained" in result.stderr
    assert fingerprint(project) == dict.fromkeys((*TRAIN_OUTPUTS, *REPORT_OUTPUTS))
    assert not (project.root / "mlflow.db").exists()


def test_failing_server_leaves_existing_outputs_untouched(reproduced, bad_server):
    from mlflow.tracking import MlflowClient

    uri, phrase = bad_server
    before = fingerprint(reproduced)
    store = MlflowClient(f"sqlite:///{reproduced.root / 'mlflow.db'}")
    runs_before = len(store.search_runs([store.get_experiment_by_name(EXPERIMENT).experiment_id]))

    # The train stage's own command, as dvc.yaml runs it (dvc repro would first delete the outputs).
    result = reproduced.run(
        *reproduced.stage_command("train"), env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120
    )

    check_fails_fast(result, uri, phrase)
    assert fingerprint(reproduced) == before
    assert len(store.search_runs([store.get_experiment_by_name(EXPERIMENT).experiment_id])) == runs_before
    assert not list((reproduced.root / "models").glob(".*.tmp*"))


def test_tracking_uri_with_an_unknown_scheme_is_a_clear_error(reproduced):
    before = fingerprint(reproduced)
    result = reproduced.run(
        *reproduced.stage_command("train"),
        env={"MLFLOW_TRACKING_URI": "htp://127.0.0.1:5000"},
        check=False,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "MLFLOW_TRACKING_URI" in result.stderr and "htp://127.0.0.1:5000" in result.stderr
    assert fingerprint(reproduced) == before


def test_dvc_remote_push_then_pull_in_a_fresh_clone_restores_everything_without_rerunning(reproduced, tmp_path):
    remote = tmp_path / "remote"
    reproduced.dvc("remote", "add", "-d", "storage", str(remote))
    reproduced.commit("Add the team's DVC remote")
    pushed = reproduced.dvc("push", timeout=300)
    assert remote.is_dir() and any(path.is_file() for path in remote.rglob("*")), pushed.stdout

    clone = tmp_path / "clone"
    reproduced.run("git", "clone", "-q", str(reproduced.root), str(clone))
    # A fresh clone has no DVC cache and none of the outputs, only what git holds.
    assert not (clone / "data/raw").exists() and not (clone / "models/model.keras").exists()
    env = base_env(clone)
    pulled = subprocess.run(
        [str(VENV_BIN / "dvc"), "pull"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr

    for name in (
        "data/raw/train-images-idx3-ubyte",
        "data/processed/train_images.npy",
        "models/model.keras",
        "models/test_probabilities.npy",
    ):
        assert (clone / name).read_bytes() == (reproduced.root / name).read_bytes(), name
    status = subprocess.run(
        [str(VENV_BIN / "dvc"), "status"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
    # Nothing ran: no stage wrote an MLflow store in the clone.
    assert "Running stage" not in pulled.stdout
    assert not (clone / "mlflow.db").exists() and not (clone / "mlartifacts").exists()


# The password in the tracking URI of the tests below: found nowhere the pipeline writes or prints.
SECRET = "Pw-" + hashlib.sha256(b"test_tracking_server").hexdigest()[:20]


@pytest.fixture(scope="module")
def server_with_password(tmp_path_factory):
    """``mlflow server`` on SQLite; yields its URL with a user and password in it, and its folder.

    The server does not check the password: its basic-auth app needs Flask-WTF (``mlflow[auth]``),
    which the project does not install. What matters here is what the pipeline does with the URI.
    """
    directory = tmp_path_factory.mktemp("mlflow-server-with-password")
    log_path, port = directory / "server.log", free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
             "--artifacts-destination", str(directory / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(), cwd=directory,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout=180, log=log_path)
        yield f"http://admin:{SECRET}@127.0.0.1:{port}", directory
    finally:
        stop(process)


def files_holding(secret: str, *folders: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``folders`` whose bytes contain ``secret``."""
    return [
        str(path)
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and path.name not in skip and secret.encode() in path.read_bytes()
    ]


def test_a_password_in_the_tracking_uri_works_and_is_never_written_or_printed(server_with_password, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    url, server_folder = server_with_password
    masked = url.replace(SECRET, "***")
    project = make_project(tmp_path, env={"MLFLOW_TRACKING_URI": url})
    printed = [project.dvc("repro", timeout=600)]
    # The gate, against the registry on that server: no champion yet, then a promotion (the rules
    # loosened for the synthetic data, as above), then a comparison with the champion, as JSON.
    (project.root / "loose.yaml").write_text(
        yaml.safe_dump({**project.params(), "check": {"test_accuracy": {"better": "higher", "max_worsening": 0.002}}})
    )
    gate = ["-m", "pipeline.check", "--params", "loose.yaml", "--summary-file", "summary.md"]
    printed.append(project.python(*gate, "--champion", "--json", check=False))
    assert printed[-1].returncode == 0, printed[-1].stdout + printed[-1].stderr
    assert (
        json.loads(printed[-1].stdout)["baseline"]["missing_reason"] == f"mnist-softmax has no champion yet in {masked}"
    )
    printed.append(project.python(*gate, "--champion", "--promote"))
    assert "Promoted mnist-softmax version 1" in printed[-1].stdout
    printed.append(project.python(*gate, "--champion", "--json"))
    # mnist-predict through the registry: an answer, and an error that names the store.
    images = np.load(project.root / "data/processed/test_images.npy")
    Image.fromarray(images[0].reshape(28, 28)).save(project.root / "digit.png")
    predict = ["-m", "pipeline.predict", "digit.png", "--model"]
    printed.append(project.python(*predict, "models:/mnist-softmax@champion"))
    printed.append(project.python(*predict, "models:/no-such-model@champion", check=False))
    assert printed[-1].returncode == 1 and masked in " ".join(printed[-1].stderr.split()), printed[-1].stderr

    output = "".join(result.stdout + result.stderr for result in printed)
    assert SECRET not in output
    # Every file of the project (dvc.lock, DVC's cache and run cache, metrics/, the summary, git's
    # objects), and the server's store and artifacts, which hold what the pipeline sent.
    assert (project.root / ".dvc/cache/runs").is_dir() and (project.root / "summary.md").is_file()
    assert files_holding(SECRET, tmp_path, server_folder, skip=("server.log",)) == []
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    versions = client.search_model_versions("name = 'mnist-softmax'")
    assert len(runs) == 1 and len(versions) == 1
    for entity in (*[run.data for run in runs], *versions):
        assert SECRET not in json.dumps([entity.params if hasattr(entity, "params") else {}, entity.tags])


@pytest.mark.postgres
def test_the_gate_prints_no_database_password(postgres, reproduced, tmp_path):
    # PostgreSQL's trust authentication accepts any password, so the URI works with one in it.
    uri = postgres.replace("postgresql://postgres@", f"postgresql+psycopg://postgres:{SECRET}@")
    loose = tmp_path / "loose.yaml"
    loose.write_text(
        yaml.safe_dump(
            {**reproduced.params(), "check": {"test_accuracy": {"better": "higher", "max_worsening": 0.002}}}
        )
    )
    summary = tmp_path / "summary.md"
    result = reproduced.python(
        "-m", "pipeline.check", "--params", str(loose), "--champion", "--json", "--summary-file", str(summary),
        env={"MLFLOW_TRACKING_URI": uri, "MNIST_REGISTERED_MODEL": "gate-password-test"},
    )  # fmt: skip
    masked = uri.replace(SECRET, "***")
    assert (
        json.loads(result.stdout)["baseline"]["missing_reason"] == f"gate-password-test has no champion yet in {masked}"
    )
    assert masked in summary.read_text()
    assert SECRET not in result.stdout + result.stderr + summary.read_text()
