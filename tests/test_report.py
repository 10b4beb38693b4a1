"""The report stage: scikit-learn metrics, the seed's figures, and clean failures on bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_module, snapshot, stage_env, write_params

from pipeline.data import PERCENTILE_COLUMNS
from pipeline.report import (
    accuracy_figure,
    confusion_figure,
    confusion_rows,
    cross_entropy_figure,
    mistakes_figure,
    mistakes_order,
    percentiles_figure,
    png_bytes,
    weight_maps_figure,
)
from pipeline.tracking.record import REPORT_TAG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_confusion_rows_pair_actual_and_predicted():
    frame = confusion_rows(np.array([3, 4]), np.array([3, 9]))
    assert frame.to_dict("records") == [{"actual": 3, "predicted": 3}, {"actual": 4, "predicted": 9}]


def sample_histories(steps: int = 300, eval_interval: int = 100) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, test and percentile histories as train writes them."""
    rng = np.random.default_rng(0)
    test_steps = np.arange(eval_interval, steps + 1, eval_interval)
    train = pd.DataFrame(
        {
            "step": np.arange(1, steps + 1),
            "train_accuracy": rng.uniform(0.8, 1.0, steps),
            "train_cross_entropy_sum": rng.uniform(10, 60, steps),
        }
    )
    test = pd.DataFrame({"step": test_steps, "test_accuracy": 0.92, "test_cross_entropy_sum": 2800.0})
    spread = np.sort(rng.normal(size=(len(test_steps), 16)), axis=1)
    percentiles = pd.DataFrame(np.column_stack([test_steps, spread]), columns=PERCENTILE_COLUMNS)
    return train, test, percentiles


def test_figures_are_drawn_as_png():
    train, test, percentiles = sample_histories()
    labels = np.array([0, 1, 2, 2, 9])
    probabilities = np.eye(10)[[0, 1, 2, 1, 9]] * 0.9 + 0.01
    images = np.random.default_rng(0).integers(0, 256, size=(5, 784), dtype=np.uint8)
    for figure in (
        accuracy_figure(train, test),
        cross_entropy_figure(train, test),
        confusion_figure(labels, np.array([0, 1, 2, 1, 9])),
        mistakes_figure(images, labels, probabilities),
        weight_maps_figure(np.random.default_rng(0).normal(size=(10, 28, 28))),
        weight_maps_figure(np.zeros((0, 28, 28))),
        percentiles_figure(percentiles),
    ):
        image = png_bytes(figure)
        assert image.startswith(PNG_SIGNATURE) and len(image) > 5_000
    # The seed's cross-entropy figure shows the test curve per 100 images: 2800 / 100.
    figure = cross_entropy_figure(train, test)
    test_line = [line for line in figure.axes[0].lines if line.get_label() == "test set"][0]
    assert test_line.get_ydata().tolist() == [28.0, 28.0, 28.0]
    assert figure.axes[1].get_ylim() == (0, 70)


def test_mistakes_come_most_confident_first_and_are_labelled_actual_to_predicted():
    labels = np.array([3, 1, 4, 1, 5])
    probabilities = np.full((5, 10), 0.01)
    # Image 0 is right; images 1, 2 and 4 are wrong with 0.6, 0.9 and 0.6 on the wrong class.
    for row, (predicted, probability) in enumerate([(3, 0.9), (7, 0.6), (9, 0.9), (1, 0.8), (0, 0.6)]):
        probabilities[row, predicted] = probability
    assert mistakes_order(labels, probabilities).tolist() == [2, 1, 4]
    images = np.zeros((5, 784), np.uint8)
    figure = mistakes_figure(images, labels, probabilities)
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["4 → 9  0.90", "1 → 7  0.60", "5 → 0  0.60"]
    # A blank digit is all background, and the background is red.
    red, green, blue = figure.axes[0].get_images()[0].get_array()[0, 0]
    assert red == 1.0 and green == blue < 0.8


def test_percentile_bands_nest_from_the_median_outwards():
    _, _, percentiles = sample_histories()
    figure = percentiles_figure(percentiles)
    weights_axis, biases_axis = figure.axes[:2]
    assert weights_axis.get_title() == "Weights" and biases_axis.get_title() == "Biases"
    # Four bands per panel: p43-p57, p29-p71, p14-p86 and min-max.
    assert len(weights_axis.collections) == len(biases_axis.collections) == 4
    widest = weights_axis.collections[-1].get_paths()[0].vertices[:, 1]
    assert widest.min() == pytest.approx(percentiles["weights_p0"].min())
    assert widest.max() == pytest.approx(percentiles["weights_p100"].max())


REPORT_OUTPUTS = {
    "--metrics": "metrics/metrics.json",
    "--confusion": "metrics/confusion.csv",
    "--classification-report": "metrics/report.txt",
    "--accuracy-plot": "metrics/accuracy.png",
    "--cross-entropy-plot": "metrics/cross_entropy.png",
    "--confusion-plot": "metrics/confusion_matrix.png",
    "--mistakes-plot": "metrics/mistakes.png",
    "--weight-maps-plot": "metrics/weight_maps.png",
    "--percentiles-plot": "metrics/percentiles.png",
}


def report_args(probabilities: str = "models/p.npy") -> list[str]:
    args = ["--data", "processed", "--test-probabilities", probabilities, "--weight-maps", "models/maps.npy"]
    args += ["--train-history", "metrics/train.csv", "--test-history", "metrics/test.csv"]
    args += ["--parameter-percentiles", "metrics/percentiles.csv"]
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
    np.save(tmp_path / "models/maps.npy", np.random.default_rng(0).normal(size=(10, 28, 28)).astype(np.float32))
    for frame, name in zip(sample_histories(), ("train", "test", "percentiles")):
        frame.to_csv(tmp_path / f"metrics/{name}.csv", index=False)
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
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "report")}
    assert {"report/accuracy.png", "report/confusion_matrix.png", "report/metrics.json"} <= artifacts
    assert {"report/mistakes.png", "report/weight_maps.png", "report/percentiles.png"} <= artifacts
    # The metrics are train's to log (with the model, so that no registry version lacks them when DVC
    # restores report from its cache): report logs files only.
    assert run.data.metrics == {} and run.data.tags[REPORT_TAG]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # A rerun on the same inputs (or after DVC restores train from its run cache) finds the report
    # already there: no second value, and the finished run keeps its status and times.
    outputs = snapshot(report_project / "metrics")
    again = run_report(report_project)
    assert again.returncode == 0, again.stderr
    assert "already holds this report" in again.stderr
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
            lambda project: (project / "metrics/train.csv").write_text("step,nonsense\n1,2\n"),
            "train.csv must have the columns step, train_accuracy, train_cross_entropy_sum",
        ),
        (
            lambda project: (project / "metrics/test.csv").write_text(
                "step,test_accuracy,test_cross_entropy_sum\n1,,2\n"
            ),
            "test.csv holds values that are not numbers",
        ),
        (
            lambda project: np.save(project / "models/maps.npy", np.ones((3, 28, 28), np.float32)),
            "maps.npy holds an array of shape (3, 28, 28)",
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
