"""The report stage: scikit-learn metrics, the seed's figures, and clean failures on bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_module, snapshot, stage_env, write_params
from sklearn.metrics import f1_score

from pipeline.report import accuracy_figure, confusion_figure, confusion_rows, cross_entropy_figure, png_bytes, score

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_score_matches_hand_computed_values():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.full((4, 10), 0.01)
    for row, predicted in enumerate([0, 1, 2, 1]):
        probabilities[row, predicted] = 0.91
    metrics = score(labels, probabilities)
    assert metrics["test_accuracy"] == 0.75
    # Two images give their true class 0.91, one gives it 0.91 and one 0.01.
    assert metrics["test_cross_entropy"] == pytest.approx(-(3 * np.log(0.91) + np.log(0.01)) / 4)
    assert metrics["per_class_recall"]["2"] == 0.5 and metrics["per_class_recall"]["0"] == 1.0
    assert metrics["per_class_recall"]["7"] == 0.0
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probabilities.argmax(1), average="macro"))


def test_score_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected probabilities of shape"):
        score(np.array([1, 2]), np.ones((3, 10)))


def test_confusion_rows_pair_actual_and_predicted():
    frame = confusion_rows(np.array([3, 4]), np.array([3, 9]))
    assert frame.to_dict("records") == [{"actual": 3, "predicted": 3}, {"actual": 4, "predicted": 9}]


def sample_history(steps: int = 300, eval_interval: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    step = np.arange(1, steps + 1)
    test_steps = step % eval_interval == 0
    return pd.DataFrame(
        {
            "step": step,
            "train_accuracy": rng.uniform(0.8, 1.0, steps),
            "train_cross_entropy": rng.uniform(10, 60, steps),
            "test_accuracy": np.where(test_steps, 0.92, np.nan),
            "test_cross_entropy": np.where(test_steps, 2800.0, np.nan),
        }
    )


def test_figures_are_drawn_as_png():
    history = sample_history()
    labels = np.array([0, 1, 2, 2, 9])
    for figure in (
        accuracy_figure(history),
        cross_entropy_figure(history),
        confusion_figure(labels, np.array([0, 1, 2, 1, 9])),
    ):
        image = png_bytes(figure)
        assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000
    # The seed's cross-entropy figure shows the test curve per 100 images: 2800 / 100.
    figure = cross_entropy_figure(history)
    test_line = [line for line in figure.axes[0].lines if line.get_label() == "test set"][0]
    assert test_line.get_ydata().tolist() == [28.0, 28.0, 28.0]
    assert figure.axes[1].get_ylim() == (0, 70)


REPORT_OUTPUTS = {
    "--metrics": "metrics/metrics.json",
    "--confusion": "metrics/confusion.csv",
    "--classification-report": "metrics/report.txt",
    "--accuracy-plot": "metrics/accuracy.png",
    "--cross-entropy-plot": "metrics/cross_entropy.png",
    "--confusion-plot": "metrics/confusion_matrix.png",
}


def report_args(probabilities: str = "models/p.npy") -> list[str]:
    args = ["--data", "processed", "--test-probabilities", probabilities, "--history", "metrics/history.csv"]
    for option, path in REPORT_OUTPUTS.items():
        args += [option, path]
    return args


@pytest.fixture
def report_project(tmp_path):
    """A project where preprocess has run and train's outputs are faked by hand (no TensorFlow needed)."""
    from idx_fixtures import write_mnist

    write_mnist(tmp_path / "raw", train_count=60, test_count=20, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 10})
    assert run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path).returncode == 0
    (tmp_path / "models").mkdir()
    (tmp_path / "metrics").mkdir()
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=20).astype(np.float32)
    np.save(tmp_path / "models/p.npy", probabilities)
    sample_history().to_csv(tmp_path / "metrics/history.csv", index=False)
    (tmp_path / "metrics/metrics.json").write_text('{"test_accuracy": 0.5}\n')
    return tmp_path


def training_run(project, probabilities: str = "models/p.npy"):
    """A finished run tagged as train tags it, so that report finds it by the probabilities' digest."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.record import TEST_PROBABILITIES_TAG, sha256

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment_id = client.create_experiment("mnist-softmax", artifact_location=(project / "art").as_uri())
    run_id = client.create_run(
        experiment_id, tags={TEST_PROBABILITIES_TAG: sha256((project / probabilities).read_bytes())}
    ).info.run_id
    client.set_terminated(run_id)
    return client, run_id


def run_report(project):
    return run_module(
        "pipeline.report",
        *report_args(),
        cwd=project,
        env=stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
    )


def test_report_logs_into_the_run_that_trained_the_model_once(report_project):
    client, run_id = training_run(report_project)
    before = client.get_run(run_id).info
    result = run_report(report_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((report_project / "metrics/metrics.json").read_text())
    labels = np.load(report_project / "processed/test_labels.npy").argmax(1)
    predicted = np.load(report_project / "models/p.npy").argmax(1)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(labels == predicted))
    assert len(pd.read_csv(report_project / "metrics/confusion.csv")) == 20
    run = client.get_run(run_id)
    assert run.data.metrics["macro_f1"] == pytest.approx(metrics["macro_f1"])
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "report")}
    assert {"report/accuracy.png", "report/confusion_matrix.png", "report/metrics.json"} <= artifacts
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # A rerun on the same inputs (or after DVC restores train from its run cache) finds the report
    # already there: no second value, and the finished run keeps its status and times.
    outputs = snapshot(report_project / "metrics")
    again = run_report(report_project)
    assert again.returncode == 0, again.stderr
    assert "already holds this report" in again.stderr
    assert len(client.get_metric_history(run_id, "macro_f1")) == 1
    after = client.get_run(run_id).info
    assert (after.status, after.start_time, after.end_time) == (before.status, before.start_time, before.end_time)
    assert snapshot(report_project / "metrics") == outputs


def test_report_without_a_training_run_changes_nothing(report_project):
    before = snapshot(report_project / "metrics")
    result = run_report(report_project)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no finished MLflow run" in " ".join(result.stderr.split())
    assert snapshot(report_project / "metrics") == before


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda project: (project / "models/p.npy").unlink(), "p.npy does not exist; run the train stage first"),
        (lambda project: (project / "models/p.npy").write_bytes(b"not numpy"), "p.npy is corrupt"),
        (
            lambda project: np.save(project / "models/p.npy", np.ones((19, 10), np.float32)),
            "holds probabilities of shape (19, 10) but there are 20 test labels",
        ),
        (
            lambda project: (project / "metrics/history.csv").write_text("step,nonsense\n1,2\n"),
            "history.csv must have the columns step, train_accuracy",
        ),
    ],
)
def test_bad_inputs_give_clear_errors_and_keep_earlier_metrics(report_project, break_it, expected):
    break_it(report_project)
    before = snapshot(report_project / "metrics")
    result = run_report(report_project)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert expected in " ".join(result.stderr.split())
    assert snapshot(report_project / "metrics") == before
