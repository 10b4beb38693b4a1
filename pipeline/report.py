"""Stage ``report``: score the trained model on the test set and draw the seed's figures.

Reads the test images and labels from ``--data``, and what train wrote for it, so that no
TensorFlow is needed here: the model's test-set probabilities (``--test-probabilities``), its weight
maps (``--weight-maps``), the histories (``--train-history``, ``--test-history``) and the weights'
and biases' percentiles (``--parameter-percentiles``). Writes ``--metrics`` (test accuracy,
cross-entropy per image, macro precision, recall and F1, recall per class), ``--confusion`` (one
actual,predicted row per test image, for DVC's confusion template), ``--classification-report``,
and six PNGs: the seed's accuracy and cross-entropy figures (full and zoomed panels), a labelled
confusion-matrix heatmap, the most confident mistakes (``--mistakes-plot``), the ten weight maps of
a linear classifier (``--weight-maps-plot``) and the percentile bands of the weights and biases over
training (``--percentiles-plot``). Everything is also logged into the MLflow run that trained the
model (see pipeline.tracking.record), and the outputs are replaced only once it is.

pandas, matplotlib and scikit-learn are imported where they are used, so that bad input is reported
before their import cost.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import files
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    PARAMETER_GROUPS,
    PERCENTILE_COLUMNS,
    PERCENTILES,
    TEST_HISTORY_COLUMNS,
    TRAIN_HISTORY_COLUMNS,
    load_processed,
)
from pipeline.params import load_params
from pipeline.tracking import record, store

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CLASS_NAMES = [str(digit) for digit in range(NUM_CLASSES)]
# The single numbers score() reports at the top of metrics.json, which a sweep can rank trials by.
SCORES = ("test_accuracy", "test_cross_entropy", "macro_precision", "macro_recall", "macro_f1")
# The seed plots the test cross-entropy (summed over 10,000 images) divided by 100, which puts it
# on the scale of the training batches (sums over 100 images).
TEST_TO_BATCH_SCALE = 100
SMOOTHING_STEPS = 100
TRAIN_COLOR, TEST_COLOR = "#4c72b0", "#dd8452"
# The gallery shows at most this many mistakes, in rows of MISTAKES_PER_ROW, like the author's 10×10
# grid of test digits.
MISTAKES_SHOWN, MISTAKES_PER_ROW = 100, 10
# The author's visualisation shows a misrecognised digit dark on a red background.
MISTAKE_BACKGROUND = np.array([1.0, 1.0 / 1.3, 1.0 / 1.3])


def pyplot():
    """matplotlib.pyplot, drawing to files only: stages run where there is no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Test-set metrics from integer labels and predicted class probabilities."""
    from sklearn.metrics import precision_recall_fscore_support

    if probabilities.ndim != 2 or probabilities.shape != (len(labels), len(CLASS_NAMES)):
        raise ValueError(f"expected probabilities of shape ({len(labels)}, 10), got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1)
    # Clipping keeps log(0) finite should a probability underflow.
    true_class = np.clip(probabilities[np.arange(len(labels)), labels], 1e-30, 1.0)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    per_class_recall = precision_recall_fscore_support(
        labels, predicted, labels=range(NUM_CLASSES), average=None, zero_division=0
    )[1]
    return {
        "test_accuracy": float(np.mean(predicted == labels)),
        "test_cross_entropy": float(-np.mean(np.log(true_class.astype(np.float64)))),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "per_class_recall": {name: float(value) for name, value in zip(CLASS_NAMES, per_class_recall)},
    }


def confusion_rows(labels: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """One row per test image, as DVC's confusion template expects."""
    import pandas as pd

    return pd.DataFrame({"actual": labels.astype(int), "predicted": predicted.astype(int)})


def read_history(path: Path, columns: list[str], may_be_empty: bool = False) -> pd.DataFrame:
    """One of train's history files, checked to have ``columns`` and numbers in every cell."""
    import pandas as pd

    try:
        history = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the train stage first (dvc repro).") from None
    except (ValueError, pd.errors.ParserError) as error:
        raise PipelineError(f"{path} is not a readable CSV ({error}); rerun the train stage.") from None
    rows = "" if may_be_empty else " and at least one row"
    if list(history.columns) != columns or (history.empty and not may_be_empty):
        raise PipelineError(f"{path} must have the columns {', '.join(columns)}{rows}; rerun the train stage.")
    if not all(pd.api.types.is_numeric_dtype(dtype) for dtype in history.dtypes) or history.isna().any().any():
        raise PipelineError(f"{path} holds values that are not numbers (text or empty cells); rerun the train stage.")
    return history


def _curve_figure(
    train_history: pd.DataFrame,
    test_history: pd.DataFrame,
    train_column: str,
    test_column: str,
    test_scale: float,
    ylabel: str,
    title: str,
    zoom: tuple[float, float],
):
    """The seed's figure layout: a full panel and a zoomed panel sharing the step axis."""
    history, tests = train_history, test_history
    figure, axes = pyplot().subplots(2, 1, sharex=True, figsize=(12, 8), constrained_layout=True)
    for axis, limits in zip(axes, (None, zoom)):
        axis.plot(
            history["step"],
            history[train_column],
            color=TRAIN_COLOR,
            linewidth=0.3,
            alpha=0.35,
            label="training batch (every step)",
        )
        # The per-step curve is mostly noise to the eye; a running mean shows its trend.
        axis.plot(
            history["step"],
            history[train_column].rolling(SMOOTHING_STEPS, min_periods=1).mean(),
            color=TRAIN_COLOR,
            linewidth=1.2,
            label=f"training batch ({SMOOTHING_STEPS}-step mean)",
        )
        axis.plot(tests["step"], tests[test_column] / test_scale, color=TEST_COLOR, linewidth=2, label="test set")
        axis.grid(color="#dddddd")
        axis.set_ylabel(ylabel)
        if limits:
            axis.set_ylim(*limits)
            axis.set_title("zoomed in", fontsize=10, loc="left")
    axes[0].set_title(title, fontsize=13)
    axes[0].legend(loc="best")
    axes[-1].set_xlabel("training step")
    axes[-1].set_xlim(-0.01 * history["step"].max(), 1.01 * history["step"].max())
    return figure


def accuracy_figure(train_history: pd.DataFrame, test_history: pd.DataFrame):
    final = test_history["test_accuracy"]
    title = "Accuracy" + (f" — final test accuracy {final.iloc[-1]:.4f}" if len(final) else "")
    return _curve_figure(
        train_history,
        test_history,
        "train_accuracy",
        "test_accuracy",
        1,
        "share of correct answers",
        title,
        (0.85, 1.0),
    )


def cross_entropy_figure(train_history: pd.DataFrame, test_history: pd.DataFrame):
    return _curve_figure(
        train_history,
        test_history,
        "train_cross_entropy_sum",
        "test_cross_entropy_sum",
        TEST_TO_BATCH_SCALE,
        "cross-entropy per 100 images",
        "Cross-entropy (summed per 100 images)",
        (0, 70),
    )


def confusion_figure(labels: np.ndarray, predicted: np.ndarray):
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    figure, axis = pyplot().subplots(figsize=(8, 7), constrained_layout=True)
    display = ConfusionMatrixDisplay(
        confusion_matrix(labels, predicted, labels=range(NUM_CLASSES)), display_labels=CLASS_NAMES
    )
    display.plot(ax=axis, cmap="Blues", values_format="d", colorbar=True)
    accuracy = np.mean(labels == predicted)
    axis.set_title(f"Confusion matrix on the {len(labels):,} test images (accuracy {accuracy:.4f})")
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("actual digit")
    return figure


def mistakes_order(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The indices of the misclassified images, the most confident mistake (the highest probability
    given to a wrong class) first; ties keep the test set's order."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]


def mistakes_figure(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray):
    """The most confident mistakes as the author's live visualisation shows the test digits it gets
    wrong: dark on red, each labelled actual → predicted with the predicted class's probability."""
    order = mistakes_order(labels, probabilities)
    shown = order[:MISTAKES_SHOWN]
    columns = MISTAKES_PER_ROW
    rows = max(1, -(-len(shown) // columns))
    figure, axes = pyplot().subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows + 0.6), squeeze=False)
    height, width = IMAGE_SHAPE
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, index in zip(axes.flat, shown):
        ink = images[index].reshape(height, width, 1).astype(np.float64) / 255
        axis.imshow((1 - ink) * MISTAKE_BACKGROUND, interpolation="nearest")
        predicted = int(probabilities[index].argmax())
        axis.set_title(f"{labels[index]} → {predicted}  {probabilities[index, predicted]:.2f}", fontsize=9, pad=2)
    figure.suptitle(
        f"The {len(shown)} most confident of {len(order):,} mistakes on the {len(labels):,} test images "
        "(actual → predicted, probability)",
        fontsize=11,
    )
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / (1.45 * rows + 0.6), hspace=0.35)
    return figure


def weight_maps_figure(maps: np.ndarray):
    """Each class's weight for every pixel, blue where ink raises the class's score and red where it
    lowers it, on one colour scale; for a model without such maps, a figure that says so."""
    if len(maps) == 0:
        figure = pyplot().figure(figsize=(8, 1.5))
        figure.text(
            0.5, 0.5, "No weight maps: only a linear classifier (the softmax model) has one 28×28 map per digit.",
            ha="center", va="center", fontsize=11,
        )  # fmt: skip
        return figure
    figure, axes = pyplot().subplots(2, 5, figsize=(12, 5.6), constrained_layout=True)
    limit = float(np.abs(maps).max()) or 1.0
    for digit, (axis, weights) in enumerate(zip(axes.flat, maps)):
        image = axis.imshow(weights, cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
        axis.set_title(f"digit {digit}")
        axis.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label="weight")
    figure.suptitle("What the softmax model learned: its weight for each pixel, per digit", fontsize=13)
    return figure


def percentiles_figure(percentiles: pd.DataFrame):
    """The weights' and biases' distributions over training as nested percentile bands, the widest
    (min to max) palest, as in the author's visualisation."""
    figure, axes = pyplot().subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    middle = len(PERCENTILES) // 2
    for axis, group, color in zip(axes, PARAMETER_GROUPS, (TRAIN_COLOR, TEST_COLOR)):
        columns = [column for column in PERCENTILE_COLUMNS if column.startswith(f"{group}_")]
        for band in range(middle):
            low, high = columns[middle - 1 - band], columns[middle + band]
            axis.fill_between(
                percentiles["step"], percentiles[low], percentiles[high], color=color, alpha=0.25, linewidth=0,
                label="min–max and the 7 equal-count buckets between" if band == middle - 1 else None,
            )  # fmt: skip
        axis.set_title(group.capitalize())
        axis.set_xlabel("training step")
        axis.grid(color="#dddddd")
    axes[0].legend(loc="upper left", fontsize=9)
    figure.suptitle("Distribution of the weights and biases over training (percentiles)", fontsize=13)
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG, closed afterwards so that figures do not pile up in memory."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


def main() -> None:
    args = path_arguments(__doc__, [
        "data", "test-probabilities", "weight-maps", "train-history", "test-history", "parameter-percentiles",
        "metrics", "confusion", "classification-report", "accuracy-plot", "cross-entropy-plot", "confusion-plot",
        "mistakes-plot", "weight-maps-plot", "percentiles-plot",
    ])  # fmt: skip
    params = load_params().tracking
    # A wrong tracking URI or a dead server is reported now, before any work.
    uri, artifact_location = store.resolve(params)

    test = load_processed(args.data, splits=("test",))
    images, labels = test["test_images"], test["test_labels"].argmax(axis=1)
    try:
        probabilities_bytes = args.test_probabilities.read_bytes()
        probabilities = np.load(io.BytesIO(probabilities_bytes), allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(
            f"{args.test_probabilities} does not exist; run the train stage first (dvc repro)."
        ) from None
    except (ValueError, OSError, EOFError) as error:
        raise PipelineError(
            f"{args.test_probabilities} is corrupt ({error}); rerun the train stage (dvc repro -f train)."
        ) from None
    if probabilities.shape != (len(labels), NUM_CLASSES):
        raise PipelineError(
            f"{args.test_probabilities} holds probabilities of shape {probabilities.shape} but there are "
            f"{len(labels)} test labels; rerun the train stage (dvc repro -f train)."
        )
    maps = read_weight_maps(args.weight_maps)
    train_history = read_history(args.train_history, TRAIN_HISTORY_COLUMNS)
    # No evaluation at all (eval_interval 0, or fewer steps than it) leaves the others empty.
    test_history = read_history(args.test_history, TEST_HISTORY_COLUMNS, may_be_empty=True)
    percentiles = read_history(args.parameter_percentiles, PERCENTILE_COLUMNS, may_be_empty=True)

    from sklearn.metrics import classification_report

    metrics = score(labels, probabilities)
    predicted = probabilities.argmax(axis=1)
    outputs: dict[Path, bytes] = {
        args.metrics: (json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(),
        args.confusion: confusion_rows(labels, predicted).to_csv(index=False).encode(),
        args.classification_report: classification_report(
            labels, predicted, target_names=CLASS_NAMES, digits=4
        ).encode(),
        args.accuracy_plot: png_bytes(accuracy_figure(train_history, test_history)),
        args.cross_entropy_plot: png_bytes(cross_entropy_figure(train_history, test_history)),
        args.confusion_plot: png_bytes(confusion_figure(labels, predicted)),
        args.mistakes_plot: png_bytes(mistakes_figure(images, labels, probabilities)),
        args.weight_maps_plot: png_bytes(weight_maps_figure(maps)),
        args.percentiles_plot: png_bytes(percentiles_figure(percentiles)),
    }
    logger.info("test accuracy %.4f, cross-entropy per image %.4f, macro F1 %.4f",
                metrics["test_accuracy"], metrics["test_cross_entropy"], metrics["macro_f1"])  # fmt: skip

    # Report logs into the run that trained the model it scores (found by the probabilities' digest),
    # and only what that run does not hold already: rerunning report, or train restored from DVC's
    # run cache, leaves a finished run as it was.
    with store.ServerWatch(uri, params).running():
        client, experiment_id = store.open_store(uri, params.experiment, artifact_location)
        run = record.find_training_run(client, experiment_id, record.sha256(probabilities_bytes), uri)
        report_digest = record.sha256(b"".join(outputs.values()))
        if run.data.tags.get(record.REPORT_TAG) == report_digest:
            logger.info("MLflow run %s already holds this report; nothing logged again", run.info.run_id)
        else:
            log_report(client, run.info.run_id, metrics, outputs, report_digest)
            logger.info("logged the report into MLflow run %s", run.info.run_id)

    # The outputs are replaced only now that the run holds the report.
    for path, data in outputs.items():
        files.write_bytes(path, data)


def read_weight_maps(path: Path) -> np.ndarray:
    try:
        maps = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the train stage first (dvc repro).") from None
    except (ValueError, OSError, EOFError) as error:
        raise PipelineError(f"{path} is corrupt ({error}); rerun the train stage (dvc repro -f train).") from None
    if maps.ndim != 3 or maps.shape[1:] != IMAGE_SHAPE or len(maps) not in (0, NUM_CLASSES):
        raise PipelineError(
            f"{path} holds an array of shape {maps.shape}, expected ({NUM_CLASSES}, 28, 28) or (0, 28, 28); "
            "rerun the train stage (dvc repro -f train)."
        )
    return maps


def log_report(client, run_id: str, metrics: dict, outputs: dict[Path, bytes], digest: str) -> None:
    """Log the report's metrics and files into the run, and mark it with the report's digest."""
    import mlflow
    from mlflow.entities import Metric

    timestamp_ms = record.timestamp_ms()
    # The same names as metrics.json, so that a sweep's metric (test_accuracy by default) and the
    # gate's rules name the same figures in MLflow as in DVC.
    values = {
        "test_accuracy": metrics["test_accuracy"],
        "test_cross_entropy": metrics["test_cross_entropy"],
        "macro_precision": metrics["macro_precision"],
        "macro_recall": metrics["macro_recall"],
        "macro_f1": metrics["macro_f1"],
        **{f"recall_{digit}": value for digit, value in metrics["per_class_recall"].items()},
    }
    try:
        with tempfile.TemporaryDirectory() as folder:
            # Artifacts keep the outputs' own file names.
            for path, data in outputs.items():
                (Path(folder) / path.name).write_bytes(data)
            client.log_artifacts(run_id, folder, artifact_path=record.REPORT_ARTIFACTS)
        lock = store.project_root() / "dvc.lock"
        if lock.exists():
            client.log_artifact(run_id, str(lock))
        client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp_ms, 0) for key, value in values.items()])
        client.set_tag(run_id, record.REPORT_TAG, digest)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise PipelineError(
            f"logging the report into MLflow run {run_id} failed: {store.short(str(error))} The stage wrote no output."
        ) from None


if __name__ == "__main__":
    run(main)
