"""The MLflow plumbing: the run recorder and its helper process, against real SQLite stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, stage_env
from pipeline import tracking
from pipeline.cli import PipelineError

EXPERIMENT = "recorder-tests"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project directory as the working directory, with its own default SQLite store."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    for key in [key for key in os.environ if key.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path


def client_for(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def test_recorder_logs_a_whole_run_in_order(project):
    rng = np.random.default_rng(0)
    values = rng.random(3000)
    (project / "notes.txt").write_text("an artifact\n")
    with tracking.RunRecorder("", EXPERIMENT, run_name="first", tags={"team": "vision"},
                              params={"train.learning_rate": 0.003, "train.batch_size": 100}) as recorder:
        # Thirty chunks queued at once, most of them before the helper has even opened the store.
        for start in range(0, 3000, 100):
            steps = range(start + 1, start + 101)
            recorder.log_series({"train_accuracy": (steps, values[start:start + 100]),
                                 "test_accuracy": ([start + 100], [float(start) / 3000])})
        recorder.log_metrics({"final_test_accuracy": 0.92})
        recorder.log_artifact(project / "notes.txt")
        info = recorder.wait_ready()
    assert recorder.process.returncode == 0

    client = client_for(project)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert client.get_experiment(info["experiment_id"]).name == EXPERIMENT
    assert run.data.params == {"train.learning_rate": "0.003", "train.batch_size": "100"}
    assert run.data.tags["team"] == "vision"
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(0.92)
    history = sorted(client.get_metric_history(info["run_id"], "train_accuracy"), key=lambda metric: metric.step)
    assert [metric.step for metric in history] == list(range(1, 3001))
    assert np.allclose([metric.value for metric in history], values)
    assert [metric.step for metric in client.get_metric_history(info["run_id"], "test_accuracy")] == list(range(100, 3001, 100))
    assert [artifact.path for artifact in client.list_artifacts(info["run_id"])] == ["notes.txt"]
    assert info["tracking_uri"].startswith(f"sqlite:///{project}/mlflow.db")


def test_an_error_in_the_stage_marks_the_run_failed(project):
    with pytest.raises(RuntimeError, match="training diverged"):
        with tracking.RunRecorder("", EXPERIMENT, run_name="doomed") as recorder:
            recorder.log_metrics({"loss": 1.0})
            run_id = recorder.wait_ready()["run_id"]
            raise RuntimeError("training diverged")
    assert recorder.process.returncode == 0
    run = client_for(project).get_run(run_id)
    assert run.info.status == "FAILED"


def test_resuming_adds_to_the_run_and_a_failed_resume_keeps_its_status(project):
    with tracking.RunRecorder("", EXPERIMENT, run_name="trained") as recorder:
        run_id = recorder.wait_ready()["run_id"]

    with tracking.RunRecorder("", EXPERIMENT, run_id=run_id) as recorder:
        recorder.log_metrics({"macro_f1": 0.91})
    client = client_for(project)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["macro_f1"] == pytest.approx(0.91)

    # A later stage that fails does not turn the training run into a failed one.
    with pytest.raises(ValueError):
        with tracking.RunRecorder("", EXPERIMENT, run_id=run_id) as recorder:
            recorder.wait_ready()
            raise ValueError("bad history file")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resuming_a_run_that_is_not_in_the_store_is_a_clear_error(project):
    with pytest.raises(PipelineError, match="is not in the tracking store") as raised:
        with tracking.RunRecorder("", EXPERIMENT, run_id="0" * 32) as recorder:
            recorder.wait_ready()
    assert "dvc repro -f train" in str(raised.value)


def test_a_helper_that_dies_is_reported_instead_of_hanging(project):
    with pytest.raises(PipelineError, match="helper process stopped unexpectedly"):
        with tracking.RunRecorder("", EXPERIMENT) as recorder:
            recorder.wait_ready()
            os.kill(recorder.process.pid, signal.SIGKILL)
            recorder.process.wait(timeout=30)
            for chunk in range(100):
                recorder.log_series({"train_accuracy": ([chunk + 1], [0.5])})


def test_a_stage_killed_outright_leaves_its_run_failed(project):
    script = (
        "import json, time\n"
        "from pipeline import tracking\n"
        "recorder = tracking.RunRecorder('', 'recorder-tests', run_name='killed')\n"
        "info = recorder.wait_ready()\n"
        "print(json.dumps({'run_id': info['run_id'], 'helper': recorder.process.pid}), flush=True)\n"
        "time.sleep(600)\n"
    )
    stage = subprocess.Popen([sys.executable, "-c", script], cwd=project, env=stage_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(stage.stdout.readline())
    finally:
        stage.kill()
        stage.wait(timeout=30)
    # With its stage gone, the helper ends the run itself and exits.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(started["helper"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(started["helper"], signal.SIGKILL)
        pytest.fail("the helper kept running after its stage was killed")
    assert client_for(project).get_run(started["run_id"]).info.status == "FAILED"


def test_an_unusable_server_fails_before_the_helper_starts(project):
    # Port 9 on localhost: nothing listens there. The health check fails in the stage itself.
    with pytest.raises(PipelineError, match="cannot be reached"):
        tracking.RunRecorder("http://127.0.0.1:9", EXPERIMENT)
    assert not (project / "mlflow.db").exists()


def test_stage_exit_keeps_what_was_printed_and_the_exit_code(tmp_path):
    script = (
        "import logging, sys\n"
        "from pipeline.cli import PipelineError, run\n"
        "def main():\n"
        "    print('printed to stdout')\n"
        "    logging.getLogger('stage').info('logged to stderr')\n"
        "    if sys.argv[1] == 'fail':\n"
        "        raise PipelineError('the input is bad')\n"
        "run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, "ok"], cwd=tmp_path, env=stage_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == "printed to stdout\n" and "logged to stderr" in done.stderr
    failed = subprocess.run([sys.executable, "-c", script, "fail"], cwd=tmp_path, env=stage_env(),
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stdout == "printed to stdout\n"
    assert "error: the input is bad" in failed.stderr and "Traceback" not in failed.stderr
