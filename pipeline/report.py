"""Stage ``report``: score train's test probabilities (no TensorFlow needed) into metrics.json, confusion.csv,
a classification report, the README's figures and the thinned training curve DVC's charts draw, logged into the
training run's MLflow run first."""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import files
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, load_array, load_processed
from pipeline.params import load_params, tracking_settings
from pipeline.score import CLASS_NAMES, SCORES, score
from pipeline.tracking import record, store

logger = logging.getLogger(__name__)

MISTAKES_SHOWN = 100
CURVE_POINTS = 100  # The training curve's points in DVC's charts: 10,000 steps in means of 100, as often as the tests.


def read_history(path: Path, *columns: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, usecols=["step", *columns])
    except (OSError, ValueError) as error:
        problem = getattr(error, "strerror", None) or error
        raise PipelineError(f"cannot read {path}: {problem}; rerun the train stage (dvc repro -f train).") from None


def accuracy_figure(train_history: pd.DataFrame, test_history: pd.DataFrame) -> Figure:
    """The seed's figure: every step's batch accuracy, its running mean and the test accuracy, in full and zoomed."""
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    steps, accuracy = train_history["step"], train_history["train_accuracy"]
    smoothed = accuracy.rolling(100, min_periods=1).mean()
    for axis in axes:
        axis.plot(steps, accuracy, color="#4c72b0", linewidth=0.3, alpha=0.35, label="training batch (every step)")
        axis.plot(steps, smoothed, color="#4c72b0", linewidth=1.2, label="training batch (100-step mean)")
        axis.plot(test_history["step"], test_history["test_accuracy"], color="#dd8452", linewidth=2, label="test set")
        axis.grid(color="#dddddd")
        axis.set_ylabel("share of correct answers")
    axes[1].set_ylim(0.85, 1.0)
    final = f" — final test accuracy {test_history['test_accuracy'].iloc[-1]:.4f}" if len(test_history) else ""
    axes[0].set_title(f"Accuracy{final}")
    axes[0].legend(loc="best")
    axes[1].set_xlabel("training step")
    return figure


def training_curve(history: pd.DataFrame) -> pd.DataFrame:
    """The training history in at most CURVE_POINTS means of consecutive steps, each at its block's last step."""
    blocks = history.groupby(np.arange(len(history)) // max(1, -(-len(history) // CURVE_POINTS)))
    return blocks.mean().assign(step=blocks["step"].max())


def mistakes_figure(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> Figure:
    """The mistakes, most confident first (ties in test-set order), dark on red, labelled actual → predicted."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    rows = max(1, -(-len(order[:MISTAKES_SHOWN]) // 10))
    figure = Figure(figsize=(13, 1.45 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, 10, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    # The author's visualisation shows a misrecognised digit dark on a red background.
    background = np.array([1.0, 1.0 / 1.3, 1.0 / 1.3])
    for axis, index in zip(axes.flat, order[:MISTAKES_SHOWN]):
        axis.imshow((1 - images[index].reshape(*IMAGE_SHAPE, 1) / 255) * background, interpolation="nearest")
        answer = predicted[index]
        axis.set_title(f"{labels[index]} → {answer}  {probabilities[index, answer]:.2f}", fontsize=9, pad=2)
    figure.suptitle(
        f"The most confident of {len(order):,} mistakes on the {len(labels):,} test images "
        "(actual → predicted, probability)",
        fontsize=11,
    )
    return figure


def weight_maps_figure(maps: np.ndarray) -> Figure:
    """Each digit's weight per pixel, blue where ink raises its score; only a linear classifier has them."""
    if len(maps) == 0:
        figure = Figure(figsize=(8, 1.5))
        note = "No weight maps: only a linear classifier (the softmax model) has one 28×28 map per digit."
        figure.text(0.5, 0.5, note, ha="center", va="center")
        return figure
    figure = Figure(figsize=(12, 5.6), layout="constrained")
    axes = figure.subplots(2, 5)
    limit = float(np.abs(maps).max()) or 1.0
    for digit, (axis, weights) in enumerate(zip(axes.flat, maps)):
        image = axis.imshow(weights, cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
        axis.set_title(f"digit {digit}")
        axis.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label="weight")
    figure.suptitle("What the softmax model learned: its weight for each pixel, per digit")
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def main() -> None:
    reads = ["data", "test-probabilities", "weight-maps", "train-history", "test-history"]
    writes = ["metrics", "confusion", "training-curve", "classification-report"]
    writes += ["accuracy-plot", "mistakes-plot", "weight-maps-plot"]
    args = path_arguments(__doc__, reads + writes)
    load_params()  # Report reads no params, but checks params.yaml as every stage does.
    tracking = tracking_settings()
    uri, artifact_location = store.resolve(tracking)  # A wrong URI or a dead server is reported before any work.

    test, _ = load_processed(args.data, splits=("test",))
    images, labels = test["test_images"], test["test_labels"].argmax(axis=1)
    probabilities, probabilities_bytes = load_array(args.test_probabilities, "train")
    maps, _ = load_array(args.weight_maps, "train")
    # DVC hands report what train wrote, but a file changed by hand must give one paragraph, not a traceback.
    if probabilities.shape != (len(labels), NUM_CLASSES) or maps.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(
            f"{args.test_probabilities} and {args.weight_maps} hold arrays of shape {probabilities.shape} and "
            f"{maps.shape}, not ({len(labels)}, {NUM_CLASSES}) and (10, 28, 28); rerun train (dvc repro -f train)."
        )
    train_history = read_history(args.train_history, "train_accuracy", "train_cross_entropy_sum")
    test_history = read_history(args.test_history, "test_accuracy")  # Empty when eval_interval is 0.

    from sklearn.metrics import classification_report

    metrics = score(labels, probabilities)
    # The per-class recalls would be ten columns of `dvc exp show`: the classification report and the run hold them.
    scores = {key: metrics[key] for key in SCORES}
    predicted = probabilities.argmax(axis=1)
    outputs = {
        args.metrics: (json.dumps(scores, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(),
        args.confusion: pd.DataFrame({"actual": labels, "predicted": predicted}).to_csv(index=False).encode(),
        args.training_curve: training_curve(train_history).to_csv(index=False).encode(),
        args.classification_report: classification_report(
            labels, predicted, labels=range(NUM_CLASSES), target_names=CLASS_NAMES, digits=4, zero_division=0
        ).encode(),
        args.accuracy_plot: png_bytes(accuracy_figure(train_history, test_history)),
        args.mistakes_plot: png_bytes(mistakes_figure(images, labels, probabilities)),
        args.weight_maps_plot: png_bytes(weight_maps_figure(maps)),
    }
    shown = [metrics[key] for key in ("test_accuracy", "test_cross_entropy", "macro_f1")]
    logger.info("test accuracy %.4f, cross-entropy per image %.4f, macro F1 %.4f", *shown)

    with store.ServerWatch(uri, tracking).running():
        client, experiment_id = store.open_store(uri, tracking.experiment, artifact_location)
        run = record.find_training_run(client, experiment_id, record.sha256(probabilities_bytes), uri)
        log_report(client, run, outputs)
    for path, data in outputs.items():
        files.write_bytes(path, data)


def log_report(client, run, outputs: dict[Path, bytes]) -> None:
    """Log the outputs and dvc.lock into the run, tagged with the report's digest (train logged the metrics)."""
    import mlflow

    # Once into the run: a rerun, or train restored from DVC's run cache, leaves it as it was.
    run_id, digest = run.info.run_id, record.sha256(b"".join(outputs.values()))
    if run.data.tags.get(record.REPORT_TAG) == digest:
        logger.info("MLflow run %s already holds this report; nothing logged again", run_id)
        return
    try:
        with tempfile.TemporaryDirectory() as folder:
            for path, data in outputs.items():
                (Path(folder) / path.name).write_bytes(data)
            client.log_artifacts(run_id, folder, artifact_path=record.REPORT_ARTIFACTS)
        if (lock := store.project_root() / "dvc.lock").exists():
            client.log_artifact(run_id, str(lock))
        client.set_tag(run_id, record.REPORT_TAG, digest)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise store.failed(f"logging the report into MLflow run {run_id}", error) from None
    logger.info("logged the report into MLflow run %s", run_id)


if __name__ == "__main__":
    run(main)
