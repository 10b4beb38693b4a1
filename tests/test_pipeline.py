"""End to end, as a user runs it: ``dvc repro`` of the tiny project (conftest's ``reproduced_template``), read
back; stopped by a signal. (Reruns: test_experiments.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_project import REPORT_OUTPUTS, TRAIN_OUTPUTS, VENV_BIN
from test_train import STOP_SECONDS, runs

pytestmark = pytest.mark.slow

EVALUATIONS = [10, 20, 30, 40, 50]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_repro_runs_every_stage_and_writes_every_output(reproduced_template, tmp_path):
    project, first = reproduced_template, reproduced_template.reproduced
    assert ran_stages(first.stdout) == ["fetch", "preprocess", "train", "report"]
    outputs = ["data/raw/train-images-idx3-ubyte", "data/processed/train_images.npy", *TRAIN_OUTPUTS, *REPORT_OUTPUTS]
    assert [path for path in outputs if not (project.root / path).is_file()] == []
    # TensorFlow's C++ start-up lines ("I0000 … oneDNN custom operations are on", absl's notice) stay out.
    output = first.stdout + first.stderr
    assert not re.search(r"^[IWE]0000 |oneDNN|absl::InitializeLog", output, re.MULTILINE), output

    # The files' columns: test_train.py.
    assert pd.read_csv(project.root / "metrics/train_history.csv")["step"].tolist() == list(range(1, 51))
    tests = pd.read_csv(project.root / "metrics/test_history.csv")
    assert tests["step"].tolist() == EVALUATIONS
    # No file leaves a cell empty, which DVC's charts would draw as 0.
    for name in ("train_history.csv", "test_history.csv", "parameter_percentiles.csv"):
        assert not pd.read_csv(project.root / "metrics" / name).isna().any().any(), name
    metrics = json.loads((project.root / "metrics/metrics.json").read_text())
    assert set(metrics) == {"test_accuracy", "test_cross_entropy", "macro_precision", "macro_recall", "macro_f1"}
    assert metrics["test_accuracy"] == pytest.approx(tests["test_accuracy"].iloc[-1])
    # The report's cross-entropy is per image; the history's is summed over the 60 test images.
    assert metrics["test_cross_entropy"] == pytest.approx(tests["test_cross_entropy_sum"].iloc[-1] / 60, rel=1e-4)
    assert len(pd.read_csv(project.root / "metrics/confusion.csv")) == 60
    # Outputs stay out of git; the small metrics files are committed.
    assert project.git("check-ignore", "data/raw", "models/model.keras").split() == ["data/raw", "models/model.keras"]
    assert project.git("check-ignore", "metrics/metrics.json", check=False) == ""
    # dvc.yaml declares the metrics and the plots.
    shown = project.dvc("metrics", "show", "--json").stdout
    assert "test_accuracy" in shown and "final_train_accuracy" in shown
    project.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert "confusion" in (tmp_path / "plots/index.html").read_text().lower()


def test_one_mlflow_run_holds_params_histories_artifacts_and_the_registered_model(reproduced_template, monkeypatch):
    import mlflow

    from pipeline.tracking import registry

    project = reproduced_template
    client, (run,) = runs(project.root)
    assert run.info.status == "FINISHED" and run.info.run_name == "lr=0.003 bs=20 it=50 seed=0"
    params = run.data.params
    assert params["train.learning_rate"] == "0.003" and params["train.batch_size"] == "20"
    assert params["train.iterations"] == "50" and params["data.train_examples"] == "200"
    # Every step's measurement, with its step, equal to the history DVC plots.
    for key in ("train_accuracy", "test_accuracy"):
        rows = pd.read_csv(project.root / f"metrics/{key.split('_')[0]}_history.csv")
        history = client.get_metric_history(run.info.run_id, f"history/{key}")
        logged = sorted((metric.step, metric.value) for metric in history)
        assert [step for step, _ in logged] == rows["step"].tolist(), key
        assert [value for _, value in logged] == pytest.approx(rows[key].tolist(), rel=1e-6), key
    # The run holds the report's figures under metrics.json's names (a sweep ranks its runs by them).
    report_metrics = json.loads((project.root / "metrics/metrics.json").read_text())
    for name in ("test_accuracy", "test_cross_entropy", "macro_precision", "macro_recall", "macro_f1"):
        assert run.data.metrics[name] == pytest.approx(report_metrics[name]), name
    # The processed data is the run's dataset: its path the source, DVC's hash (as dvc.lock has it) the digest.
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    (processed,) = [out for out in lock["stages"]["preprocess"]["outs"] if out["path"] == "data/processed"]
    (dataset,) = [data_input.dataset for data_input in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("data/processed", processed["md5"])
    assert json.loads(dataset.source) == {"uri": "data/processed"}
    # params.yaml and the sources are those of HEAD.
    assert run.data.tags["git.commit"] == project.git("rev-parse", "HEAD") and run.data.tags["git.dirty"] == "false"

    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"dvc.lock", "train_history.csv", "test_history.csv", "parameter_percentiles.csv", "report"} <= artifacts
    report = {Path(artifact.path).name for artifact in client.list_artifacts(run.info.run_id, "report")}
    assert {Path(path).name for path in REPORT_OUTPUTS} - {"classification_report.txt"} <= report
    # Artifacts sit beside the store at the project root, not wherever a stage happened to run.
    assert run.info.artifact_uri.startswith((project.root / "mlartifacts").as_uri())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.root / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"runs:/{run.info.run_id}/model")).read_text()
    registered = Path(mlflow.artifacts.download_artifacts("models:/mnist-softmax/1"))
    # pipeline.serving's model, with an input example and pinned requirements (its answers to raw pixels, the
    # scaling inside it, and what it refuses: test_serving).
    assert pyfunc.metadata.get_input_schema() is None and pyfunc.metadata.saved_input_example_info is not None
    assert all("==" in line for line in requirements.split()), requirements
    # The model names the run as its source, is READY, and carries the run's final metrics.
    (output,) = run.outputs.model_outputs
    logged_model = client.get_logged_model(output.model_id)
    assert logged_model.source_run_id == run.info.run_id and str(logged_model.status) == "READY"
    assert logged_model.params["train.learning_rate"] == "0.003"
    linked = {metric.key: metric.value for metric in logged_model.metrics}
    assert linked["test_accuracy"] == pytest.approx(report_metrics["test_accuracy"]) and "train_seconds" in linked
    # Each figure once: train.json's final_* are the history's last points (test_accuracy is metrics.json's, above).
    assert [key for key in run.data.metrics if key.startswith("final_")] == []

    # The run registers its model as version 1, tagged with its run, commit, data and file digest.
    (version,) = client.search_model_versions("name = 'mnist-softmax'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    tags = version.tags
    assert tags[registry.RUN_ID_TAG] == run.info.run_id and tags["git.commit"] == run.data.tags["git.commit"]
    lock = (project.root / "dvc.lock").read_text()
    assert {key: value for key, value in tags.items() if key.startswith("data.")} == project.data_tags(lock)
    model_file = project.root / "models/model.keras"
    assert tags[registry.MODEL_SHA256_TAG] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert version.description.startswith(f"Test accuracy {report_metrics['test_accuracy']:.4f} on 60 test images")
    # The registry's model holds the very file DVC tracks.
    assert (registered / "artifacts/model.keras").read_bytes() == model_file.read_bytes()


@pytest.mark.parametrize(
    ("model", "shell", "whole_group", "seconds"),
    [
        # Supervisors often signal only the process they started: DVC then ends at once without passing
        # the signal on (through the shell it runs the stage with, which some shells keep as the stage's
        # parent); the stage notices within a second that dvc has gone and stops as if signalled.
        ("softmax", "/bin/sh", False, 1 + STOP_SECONDS),
        ("softmax", "/bin/bash", False, 1 + STOP_SECONDS),
        # Ctrl-C in a terminal signals dvc's process group. conv_batchnorm takes ~0.1 s a step here, so
        # a chunk of a thousand steps would hold the stop for minutes; chunks sized by time do not.
        ("conv_batchnorm", "/bin/sh", True, STOP_SECONDS),
    ],
)
def test_a_signal_stops_training_within_seconds_with_no_outputs_and_the_run_failed(
    reproduced_project, model, shell, whole_group, seconds
):
    from pipeline.tracking.record import PROCESS_TAG

    project = reproduced_project
    project.set_params(train={"model": model, "batch_size": 200, "iterations": 2_000_000, "eval_interval": 1000})
    log_path = project.root.parent / "dvc.log"
    command = [str(VENV_BIN / "dvc"), "repro"]
    env = {**project.env, "SHELL": shell}
    with open(log_path, "w") as log:
        dvc = subprocess.Popen(
            command, cwd=project.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        client, found = runs(project.root)
        while not (len(found) == 2 and client.get_metric_history(found[1].info.run_id, "history/train_accuracy")):
            assert dvc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
            client, found = runs(project.root)
        run = found[1]
        time.sleep(1)
        if whole_group:
            os.killpg(dvc.pid, signal.SIGINT)
        else:
            dvc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        dvc.wait(timeout=60)
        train = f"/proc/{run.data.tags[PROCESS_TAG].rpartition(':')[2]}"
        while os.path.exists(train) and time.monotonic() < signalled + 60:
            time.sleep(0.2)
        took = time.monotonic() - signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)
    assert took < seconds, f"the train stage took {took:.1f} s to stop"
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert f"MLflow run {run.info.run_id} was marked FAILED" in " ".join(log_path.read_text().split())
    assert not [path for path in TRAIN_OUTPUTS if (project.root / path).exists()]
    assert not [path for path in project.root.rglob("*") if ".tmp" in path.name and path.is_file()]
