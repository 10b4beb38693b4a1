"""End to end, as a user runs it: ``dvc repro`` in a fresh git repository, then MLflow read back.

The project is copied into a temporary git repository with tiny synthetic MNIST files behind
``MNIST_MIRROR``; everything else is real: the DVC CLI, TensorFlow, and MLflow's default store,
the SQLite file at the project root.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_project import REPORT_OUTPUTS, TRAIN_OUTPUTS, make_project
from test_train import STOP_SECONDS

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    # oneDNN forced on, as TensorFlow does by default on CPUs with AVX-512, where it announces itself.
    project = make_project(tmp_path_factory.mktemp("e2e"), env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    first = project.dvc("repro", timeout=600)
    return project, first


def mlflow_client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")


def only_runs(project):
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("mnist-softmax")
    assert experiment is not None, "the default experiment was not created"
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_repro_runs_every_stage_and_writes_every_output(repro):
    project, first = repro
    assert ran_stages(first.stdout) == ["fetch", "preprocess", "train", "report"]
    for path in (
        "data/raw/train-images-idx3-ubyte",
        "data/processed/train_images.npy",
        *TRAIN_OUTPUTS,
        *REPORT_OUTPUTS,
    ):
        assert (project.root / path).is_file(), path
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "preprocess", "train", "report"}
    # TensorFlow's C++ start-up lines ("I0000 … oneDNN custom operations are on", absl's notice) stay out.
    output = first.stdout + first.stderr
    assert not re.search(r"^[IWE]0000 |oneDNN|absl::InitializeLog", output, re.MULTILINE), output

    history = pd.read_csv(project.root / "metrics/train_history.csv")
    assert list(history.columns) == ["step", "train_accuracy", "train_cross_entropy_sum"]
    assert history["step"].tolist() == list(range(1, 51))
    tests = pd.read_csv(project.root / "metrics/test_history.csv")
    assert list(tests.columns) == ["step", "test_accuracy", "test_cross_entropy_sum"]
    assert tests["step"].tolist() == [10, 20, 30, 40, 50]
    # No file leaves a cell empty, which DVC's charts would draw as 0.
    for name in ("train_history.csv", "test_history.csv", "parameter_percentiles.csv"):
        assert not pd.read_csv(project.root / "metrics" / name).isna().any().any(), name

    metrics = json.loads((project.root / "metrics/metrics.json").read_text())
    assert set(metrics) == {
        "test_accuracy",
        "test_cross_entropy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "per_class_recall",
    }
    assert metrics["test_accuracy"] == pytest.approx(tests["test_accuracy"].iloc[-1])
    # The report's cross-entropy is per image; the history's is summed over the 60 test images.
    assert metrics["test_cross_entropy"] == pytest.approx(tests["test_cross_entropy_sum"].iloc[-1] / 60, rel=1e-4)
    assert len(pd.read_csv(project.root / "metrics/confusion.csv")) == 60
    # Outputs stay out of git; the small metrics files are committed.
    ignored = project.git("check-ignore", "data/raw", "models/model.keras")
    assert "data/raw" in ignored and "models/model.keras" in ignored
    assert project.git("check-ignore", "metrics/metrics.json", check=False) == ""


def test_one_mlflow_run_holds_params_histories_artifacts_and_model(repro):
    project, _ = repro
    client, runs = only_runs(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lr=0.003 bs=20 it=50 seed=0"
    params = run.data.params
    assert params["train.learning_rate"] == "0.003" and params["train.batch_size"] == "20"
    assert params["train.iterations"] == "50" and params["data.train_examples"] == "200"

    train_history = client.get_metric_history(run.info.run_id, "history/train_accuracy")
    assert sorted(metric.step for metric in train_history) == list(range(1, 51))
    test_history = client.get_metric_history(run.info.run_id, "history/test_accuracy")
    assert sorted(metric.step for metric in test_history) == [10, 20, 30, 40, 50]
    history = pd.read_csv(project.root / "metrics/train_history.csv")
    logged = {metric.step: metric.value for metric in train_history}
    assert logged[37] == pytest.approx(history.loc[36, "train_accuracy"])
    # The run holds the report's figures under metrics.json's names (a sweep ranks its runs by them).
    report_metrics = json.loads((project.root / "metrics/metrics.json").read_text())
    for name in ("test_accuracy", "test_cross_entropy", "macro_precision", "macro_recall", "macro_f1"):
        assert run.data.metrics[name] == pytest.approx(report_metrics[name]), name

    tags = run.data.tags
    assert tags["git.commit"] == project.git("rev-parse", "HEAD")
    assert tags["git.dirty"] in ("true", "false")
    assert any(key.startswith("data.") for key in tags)

    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"dvc.lock", "train_history.csv", "test_history.csv", "parameter_percentiles.csv", "report"} <= artifacts
    report = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "report")}
    assert {
        "report/accuracy.png",
        "report/mistakes.png",
        "report/weight_maps.png",
        "report/confusion.csv",
        "report/metrics.json",
    } <= report
    # Artifacts sit beside the store at the project root, not wherever a stage happened to run.
    assert (project.root / "mlartifacts").is_dir()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    # The logged model takes raw pixels, as the IDX files hold them (the scaling travels inside it),
    # and answers each image with its digit and probabilities: pipeline.serving's model.
    images = np.load(project.root / "data/processed/test_images.npy")[:4]
    assert images.dtype == np.uint8 and images.max() > 1
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    answers = pyfunc.predict(images)
    probabilities = np.array([answer["probabilities"] for answer in answers])
    stored = np.load(project.root / "models/test_probabilities.npy")[:4]
    assert probabilities.shape == (4, 10) and np.allclose(probabilities, stored, atol=1e-6)
    assert [answer["digit"] for answer in answers] == stored.argmax(axis=1).tolist()
    with pytest.raises(mlflow.exceptions.MlflowException, match="integer pixels 0-255"):
        pyfunc.predict(images / 255)
    assert pyfunc.metadata.get_input_schema() is None and pyfunc.metadata.saved_input_example_info is not None
    # Its requirements are the locked versions, pinned.
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"runs:/{run.info.run_id}/model"))
    assert all("==" in line for line in requirements.read_text().split()), requirements.read_text()

    # The run lists the model among its outputs; the model names the run as its source, is READY,
    # and carries the final metrics, which are also the run's own.
    (output,) = run.outputs.model_outputs
    logged_model = client.get_logged_model(output.model_id)
    assert logged_model.source_run_id == run.info.run_id and str(logged_model.status) == "READY"
    assert logged_model.params["train.learning_rate"] == "0.003"
    final = json.loads((project.root / "metrics/train.json").read_text())
    linked = {metric.key: metric.value for metric in logged_model.metrics}
    assert linked["final_test_accuracy"] == pytest.approx(final["final_test_accuracy"]) and "train_seconds" in linked
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(final["final_test_accuracy"])


def test_the_run_registers_its_model_as_a_tagged_described_version(repro):
    import keras
    import mlflow

    from pipeline.tracking import registry

    project, _ = repro
    client, (run,) = only_runs(project)
    name = "mnist-softmax"  # The default of $MNIST_REGISTERED_MODEL.
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    tags = version.tags
    assert tags[registry.RUN_ID_TAG] == run.info.run_id
    assert tags["git.commit"] == run.data.tags["git.commit"] == project.git("rev-parse", "HEAD")
    assert {key: value for key, value in tags.items() if key.startswith("data.")} == project.data_tags(
        (project.root / "dvc.lock").read_text()
    )
    # The version names the very file DVC tracks.
    model_file = project.root / "models/model.keras"
    assert tags[registry.MODEL_SHA256_TAG] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    accuracy = json.loads((project.root / "metrics/metrics.json").read_text())["test_accuracy"]
    assert version.description.startswith(f"Test accuracy {accuracy:.4f} on 60 test images")
    # The registry's model holds the very file DVC tracks, which Keras loads, taking raw pixels.
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    try:
        registered = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    finally:
        mlflow.set_tracking_uri(None)
    assert (registered / "artifacts/model.keras").read_bytes() == model_file.read_bytes()
    images = np.load(project.root / "data/processed/test_images.npy")
    local = keras.saving.load_model(model_file)
    assert np.array_equal(np.asarray(local(images)), np.load(project.root / "models/test_probabilities.npy"))
    # dvc.yaml declares the same file as its model artifact.
    (artifact,) = yaml.safe_load((project.root / "dvc.yaml").read_text())["artifacts"].values()
    assert artifact["path"] == "models/model.keras" and artifact["type"] == "model"


def test_metrics_and_plots_commands_work(repro):
    project, _ = repro
    shown = project.dvc("metrics", "show", "--json").stdout
    assert "test_accuracy" in shown and "final_train_accuracy" in shown
    plots = project.dvc("plots", "show", "-o", "dvc_plots").stdout
    html = (project.root / "dvc_plots" / "index.html").read_text()
    assert "index.html" in plots and "confusion" in html.lower()


def test_changing_a_setting_changes_no_stage(repro):
    """Where data comes from and where runs go are settings, not parameters: changing them reruns nothing."""
    project, _ = repro
    settings = {
        "MNIST_MIRROR": str(project.root / "no-such-mirror"),
        "MNIST_FETCH_TIMEOUT": "5",
        "MLFLOW_EXPERIMENT_NAME": "another-experiment",
        "MNIST_REGISTERED_MODEL": "another-model",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    }
    status = project.dvc("status", env=settings)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    assert ran_stages(project.dvc("repro", env=settings).stdout) == []
    assert mlflow_client(project).get_experiment_by_name("another-experiment") is None


def test_second_repro_runs_nothing_and_a_learning_rate_change_reruns_only_train_and_report(repro):
    project, _ = repro
    second = project.dvc("repro")
    assert ran_stages(second.stdout) == []
    project.commit("pipeline outputs")

    project.set_params(train={"learning_rate": 0.01})
    third = project.dvc("repro")
    assert ran_stages(third.stdout) == ["train", "report"]
    _, runs = only_runs(project)
    assert [run.data.params["train.learning_rate"] for run in runs] == ["0.003", "0.01"]
    assert runs[-1].info.run_name == "lr=0.01 bs=20 it=50 seed=0"
    assert runs[-1].data.tags["git.dirty"] == "true", "params.yaml differs from the commit"


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_sigterm_to_dvc_alone_stops_the_stage_with_no_outputs_and_the_run_failed(tmp_path, shell):
    """Supervisors often signal only the process they started. DVC then ends at once without passing
    the signal on (through the shell DVC runs the command with, which some shells keep as the
    stage's parent); the stage notices that dvc has gone and stops as if it had been signalled."""
    import os
    import signal
    import subprocess
    import time

    from pipeline.tracking.record import PROCESS_TAG

    project = make_project(tmp_path, params={"train": {"iterations": 2_000_000, "eval_interval": 1000}})
    project.dvc("repro", "preprocess")
    dvc = subprocess.Popen(
        [project.env["PATH"].split(os.pathsep)[0] + "/dvc", "repro"],
        cwd=project.root,
        env={**project.env, "SHELL": shell},
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    assert dvc.stderr is not None
    for line in dvc.stderr:
        seen.append(line)
        if "step 2000:" in line:
            break
    assert any("step 2000:" in line for line in seen), "".join(seen)
    dvc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    dvc.wait(timeout=30)

    client, runs = only_runs(project)
    (run,) = runs
    train_pid = int(run.data.tags[PROCESS_TAG].rpartition(":")[2])
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{train_pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{train_pid}"), "the train stage went on after dvc had gone"
    # The stage checks on dvc every second, then stops as promptly as when signalled itself.
    took = time.monotonic() - signalled
    assert took < 1 + STOP_SECONDS, f"the train stage took {took:.1f} s to stop after dvc had gone"
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert not [path for path in TRAIN_OUTPUTS if (project.root / path).exists()]
    leftovers = [path.name for path in project.root.rglob("*") if ".tmp" in path.name and path.is_file()]
    assert leftovers == []


def test_ctrl_c_in_the_terminal_stops_a_slow_model_within_seconds(tmp_path):
    """Ctrl-C in a terminal signals dvc's whole process group: dvc and the stage. conv_batchnorm on
    200 images a batch takes ~0.1 s a step, so a chunk of a thousand steps would hold the stop for
    minutes; chunks sized by time end it within seconds."""
    import os
    import signal
    import subprocess
    import time

    train = {"model": "conv_batchnorm", "batch_size": 200, "iterations": 2_000_000, "eval_interval": 1000}
    project = make_project(tmp_path, params={"train": train})
    project.dvc("repro", "preprocess")
    dvc = subprocess.Popen(
        [project.env["PATH"].split(os.pathsep)[0] + "/dvc", "repro"],
        cwd=project.root,
        env=project.env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    assert dvc.stderr is not None
    seen = []
    for line in dvc.stderr:
        seen.append(line)
        if "MLflow run " in line:
            break
    client, (run,) = only_runs(project)
    deadline = time.monotonic() + 120
    while not client.get_metric_history(run.info.run_id, "history/train_accuracy") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_metric_history(run.info.run_id, "history/train_accuracy"), "".join(seen)
    time.sleep(1)
    os.killpg(dvc.pid, signal.SIGINT)
    signalled = time.monotonic()
    stderr = dvc.communicate(timeout=120)[1]
    took = time.monotonic() - signalled
    message = " ".join(stderr.split())
    assert dvc.returncode != 0
    assert took < STOP_SECONDS, f"dvc repro took {took:.1f} s to stop after Ctrl-C"
    assert f"MLflow run {run.info.run_id} was marked FAILED" in message, message
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert not [path for path in TRAIN_OUTPUTS if (project.root / path).exists()]
