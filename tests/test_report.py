"""The report stage: its figures, logging into the training run once, and clean failures on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, run_module, snapshot, stage_env, write_params
from pipeline_project import REPORT_OUTPUTS

from pipeline.report import accuracy_figure, mistakes_figure, png_bytes, training_curve, weight_maps_figure
from pipeline.tracking.record import REPORT_TAG, TEST_PROBABILITIES_TAG, sha256

TRAIN = pd.DataFrame({"step": np.arange(1, 301), "train_accuracy": np.random.default_rng(0).uniform(0.8, 1.0, 300)})
TEST = pd.DataFrame({"step": [100, 200, 300], "test_accuracy": 0.92})
PROBABILITIES = "models/test_probabilities.npy"


def test_figures_are_drawn_as_png_and_mistakes_come_most_confident_first():
    labels = np.array([3, 1, 4, 1, 5])
    probabilities = np.full((5, 10), 0.01)
    # Image 0 is right; images 1, 2 and 4 are wrong with 0.6, 0.9 and 0.6 on the wrong class.
    for row, (predicted, probability) in enumerate([(3, 0.9), (7, 0.6), (9, 0.9), (1, 0.8), (0, 0.6)]):
        probabilities[row, predicted] = probability
    mistakes = mistakes_figure(np.zeros((5, 784), np.uint8), labels, probabilities)
    accuracy = accuracy_figure(TRAIN, TEST)
    for figure in (
        accuracy,
        accuracy_figure(TRAIN, TEST.iloc[:0]),  # eval_interval 0: no test history
        mistakes,
        weight_maps_figure(np.random.default_rng(0).normal(size=(10, 28, 28))),
        weight_maps_figure(np.zeros((0, 28, 28))),
    ):
        assert png_bytes(figure).startswith(b"\x89PNG\r\n\x1a\n")
    # The seed's figure: a full panel and one zoomed in on the last percents.
    assert accuracy.axes[0].get_title() == "Accuracy — final test accuracy 0.9200"
    assert accuracy.axes[1].get_ylim() == (0.85, 1.0)
    # The mistakes are labelled actual → predicted; a blank digit is all background, and the background is red.
    titles = [axis.get_title() for axis in mistakes.axes if axis.get_title()]
    assert titles == ["4 → 9  0.90", "1 → 7  0.60", "5 → 0  0.60"]
    red, green, blue = mistakes.axes[0].get_images()[0].get_array()[0, 0]
    assert red == 1.0 and green == blue < 0.8


@pytest.mark.parametrize("steps, points", [(0, 0), (50, 50), (300, 100), (10_000, 100), (10_001, 100)])
def test_the_charts_training_curve_is_at_most_100_means_of_consecutive_steps(steps, points):
    history = pd.DataFrame({"step": np.arange(1, steps + 1), "train_accuracy": np.arange(steps) % 3 / 2})
    curve = training_curve(history)
    assert len(curve) == points and list(curve.columns) == ["step", "train_accuracy"]
    assert curve["step"].tolist()[-1:] == history["step"].tolist()[-1:]
    if steps == 300:  # Blocks of 3 steps (0, 0.5 and 1), each at its last step.
        assert curve["step"].tolist() == list(range(3, 301, 3)) and set(curve["train_accuracy"]) == {0.5}


# The stage's own command line in dvc.yaml, after ``python -m pipeline.report``.
COMMAND = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["cmd"].split()[3:]


@pytest.fixture(scope="module")
def report_template(tmp_path_factory, processed_data):
    """The session's processed data, train's outputs faked by hand (no TensorFlow needed), and a finished
    run tagged as train tags it, so that report finds it by the probabilities' digest."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("report")
    shutil.copytree(processed_data, root / "data/processed")
    write_params(root)
    (root / "models").mkdir()
    (root / "metrics").mkdir()
    np.save(root / PROBABILITIES, np.random.default_rng(0).dirichlet(np.ones(10), size=50).astype(np.float32))
    np.save(root / "models/weight_maps.npy", np.random.default_rng(0).normal(size=(10, 28, 28)).astype(np.float32))
    TRAIN.assign(train_cross_entropy_sum=30.0).to_csv(root / "metrics/train_history.csv", index=False)
    TEST.assign(test_cross_entropy_sum=2800.0).to_csv(root / "metrics/test_history.csv", index=False)
    (root / "metrics/metrics.json").write_text('{"test_accuracy": 0.5}\n')
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.create_experiment("mnist-softmax", artifact_location=(root / "art").as_uri())
    digest = sha256((root / PROBABILITIES).read_bytes())
    client.set_terminated(client.create_run(experiment_id, tags={TEST_PROBABILITIES_TAG: digest}).info.run_id)
    return root


@pytest.fixture
def report_project(report_template, tmp_path):
    """A copy of the template, its store's client and the training run's id."""
    from mlflow.tracking import MlflowClient

    project = shutil.copytree(report_template, tmp_path / "project")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mnist-softmax").experiment_id])
    return project, client, run.info.run_id


def run_report(project):
    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    return run_module("pipeline.report", *COMMAND, cwd=project, env=env)


def test_report_logs_into_the_run_that_trained_the_model_once(report_project):
    project, client, run_id = report_project
    before = client.get_run(run_id).info
    result = run_report(project)
    assert result.returncode == 0, result.stderr
    labels = np.load(project / "data/processed/test_labels.npy").argmax(1)
    predicted = np.load(project / PROBABILITIES).argmax(1)
    confusion = pd.read_csv(project / "metrics/confusion.csv")
    assert confusion.to_dict("list") == {"actual": labels.tolist(), "predicted": predicted.tolist()}
    run = client.get_run(run_id)
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "report")}
    assert artifacts == {f"report/{Path(path).name}" for path in REPORT_OUTPUTS}
    # The metrics are train's to log (with the model, so that no registry version lacks them when DVC
    # restores report from its cache): report logs files only.
    assert run.data.metrics == {} and run.data.tags[REPORT_TAG]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # A rerun on the same inputs (or after DVC restores train from its run cache) finds the report
    # already there: no second value, and the finished run keeps its status and times.
    outputs = snapshot(project / "metrics")
    again = run_report(project)
    assert again.returncode == 0, again.stderr
    assert "already holds this report" in again.stderr
    after = client.get_run(run_id).info
    assert (after.status, after.start_time, after.end_time) == (before.status, before.start_time, before.end_time)
    assert snapshot(project / "metrics") == outputs


@pytest.mark.parametrize(
    ("path", "content", "expected"),
    [
        # Other (valid) probabilities than the training run's: outputs from another store.
        (PROBABILITIES, np.full((50, 10), 0.1), "no finished MLflow run"),
        (PROBABILITIES, None, f"{PROBABILITIES} does not exist; run the train stage"),
        (PROBABILITIES, b"not numpy", f"{PROBABILITIES} is corrupt"),
        (PROBABILITIES, np.ones((49, 10), np.float32), "hold arrays of shape (49, 10) and (10, 28, 28), not (50, 10)"),
        ("models/weight_maps.npy", np.ones((10, 784), np.float32), "hold arrays of shape (50, 10) and (10, 784), not"),
        ("metrics/train_history.csv", b"step,nonsense\n1,2\n", "cannot read metrics/train_history.csv: Usecols do not"),
    ],
    ids=["no-training-run", "missing", "corrupt", "probabilities-shape", "maps-shape", "history-columns"],
)
def test_bad_inputs_give_one_paragraph_and_keep_earlier_outputs(report_project, path, content, expected):
    project, _, _ = report_project
    if content is None:
        (project / path).unlink()
    elif isinstance(content, bytes):
        (project / path).write_bytes(content)
    else:
        np.save(project / path, content)
    before = snapshot(project / "metrics")
    result = run_report(project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in " ".join(result.stderr.split())
    assert snapshot(project / "metrics") == before
