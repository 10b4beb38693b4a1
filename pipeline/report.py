"""Stage ``report``: score the trained model on the test set and draw the seed's figures.

Reads the test labels from ``--data``, the model's test-set probabilities (``--test-probabilities``,
written by train, so no TensorFlow is needed here), the per-step ``--history`` and the MLflow
``--run-info``. Writes ``--metrics`` (test accuracy, cross-entropy per image, macro precision, recall
and F1, recall per class), ``--confusion`` (one actual,predicted row per test image, for DVC's
confusion template), ``--classification-report``, and three PNGs: the seed's accuracy and
cross-entropy figures (full and zoomed panels) and a labelled confusion-matrix heatmap. Everything
is also logged into the MLflow run that train opened.

pandas, matplotlib and scikit-learn are imported where they are used rather than at the top: main()
first starts MLflow's helper process (see pipeline.tracking), and their imports then overlap it.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import files, tracking
from pipeline.cli import PipelineError, run
from pipeline.params import load_params
from pipeline.data import NUM_CLASSES, load_processed
from pipeline.train import HISTORY_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CLASS_NAMES = [str(digit) for digit in range(10)]
# The seed plots the test cross-entropy (summed over 10,000 images) divided by 100, which puts it
# on the scale of the training batches (sums over 100 images).
TEST_TO_BATCH_SCALE = 100
SMOOTHING_STEPS = 100
TRAIN_COLOR, TEST_COLOR = "#4c72b0", "#dd8452"


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
        labels, predicted, labels=range(10), average=None, zero_division=0
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


def read_history(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        history = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the train stage first (dvc repro).") from None
    except (ValueError, pd.errors.ParserError) as error:
        raise PipelineError(f"{path} is not a readable CSV ({error}); rerun the train stage.") from None
    if list(history.columns) != HISTORY_COLUMNS or history.empty:
        raise PipelineError(f"{path} must have the columns {', '.join(HISTORY_COLUMNS)} and at least one row; rerun the train stage.")
    return history


def _curve_figure(history: pd.DataFrame, train_column: str, test_column: str, test_scale: float,
                  ylabel: str, title: str, zoom: tuple[float, float]):
    """The seed's figure layout: a full panel and a zoomed panel sharing the step axis."""
    tests = history.dropna(subset=[test_column])
    figure, axes = pyplot().subplots(2, 1, sharex=True, figsize=(12, 8), constrained_layout=True)
    for axis, limits in zip(axes, (None, zoom)):
        axis.plot(history["step"], history[train_column], color=TRAIN_COLOR, linewidth=0.3, alpha=0.35,
                  label="training batch (every step)")
        # The per-step curve is mostly noise to the eye; a running mean shows its trend.
        axis.plot(history["step"], history[train_column].rolling(SMOOTHING_STEPS, min_periods=1).mean(),
                  color=TRAIN_COLOR, linewidth=1.2, label=f"training batch ({SMOOTHING_STEPS}-step mean)")
        axis.plot(tests["step"], tests[test_column] / test_scale, color=TEST_COLOR, linewidth=2,
                  label="test set")
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


def accuracy_figure(history: pd.DataFrame):
    final = history["test_accuracy"].dropna()
    title = "Accuracy" + (f" — final test accuracy {final.iloc[-1]:.4f}" if len(final) else "")
    return _curve_figure(history, "train_accuracy", "test_accuracy", 1, "share of correct answers", title, (0.85, 1.0))


def cross_entropy_figure(history: pd.DataFrame):
    return _curve_figure(history, "train_cross_entropy", "test_cross_entropy", TEST_TO_BATCH_SCALE,
                         "cross-entropy per 100 images", "Cross-entropy (summed per 100 images)", (0, 70))


def confusion_figure(labels: np.ndarray, predicted: np.ndarray):
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    figure, axis = pyplot().subplots(figsize=(8, 7), constrained_layout=True)
    display = ConfusionMatrixDisplay(confusion_matrix(labels, predicted, labels=range(10)), display_labels=CLASS_NAMES)
    display.plot(ax=axis, cmap="Blues", values_format="d", colorbar=True)
    accuracy = np.mean(labels == predicted)
    axis.set_title(f"Confusion matrix on the {len(labels):,} test images (accuracy {accuracy:.4f})")
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("actual digit")
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG, closed afterwards so that figures do not pile up in memory."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test-probabilities", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    for output in ("metrics", "confusion", "classification-report", "accuracy-plot", "cross-entropy-plot", "confusion-plot"):
        parser.add_argument(f"--{output}", type=Path, required=True)
    args = parser.parse_args()
    params = load_params().tracking
    run_info = tracking.read_run_info(args.run_info)

    labels = load_processed(args.data, splits=("test",))["test_labels"].argmax(axis=1)
    try:
        probabilities = np.load(args.test_probabilities, allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(f"{args.test_probabilities} does not exist; run the train stage first (dvc repro).") from None
    except (ValueError, OSError, EOFError) as error:
        raise PipelineError(f"{args.test_probabilities} is corrupt ({error}); rerun the train stage (dvc repro -f train).") from None
    if probabilities.shape != (len(labels), len(CLASS_NAMES)):
        raise PipelineError(
            f"{args.test_probabilities} holds probabilities of shape {probabilities.shape} but there are "
            f"{len(labels)} test labels; rerun the train stage (dvc repro -f train)."
        )

    # Report logs into the run that train opened, so one pipeline run is one MLflow run. The helper
    # process checks that the run is in the store while this one scores and draws.
    with tracking.RunRecorder(params.uri, params.experiment, run_id=run_info["run_id"]) as recorder:
        from sklearn.metrics import classification_report

        history = read_history(args.history)
        metrics = score(labels, probabilities)
        predicted = probabilities.argmax(axis=1)
        texts = {
            args.confusion: confusion_rows(labels, predicted).to_csv(index=False),
            args.classification_report: classification_report(labels, predicted, target_names=CLASS_NAMES, digits=4),
        }
        images = {
            args.accuracy_plot: png_bytes(accuracy_figure(history)),
            args.cross_entropy_plot: png_bytes(cross_entropy_figure(history)),
            args.confusion_plot: png_bytes(confusion_figure(labels, predicted)),
        }
        # Outputs are only replaced once the run is known to be there to receive them.
        recorder.wait_ready()
        files.write_json(args.metrics, metrics)
        for path, text in texts.items():
            files.write_text(path, text)
        for path, image in images.items():
            files.write_bytes(path, image)
        logger.info("test accuracy %.4f, cross-entropy per image %.4f, macro F1 %.4f",
                    metrics["test_accuracy"], metrics["test_cross_entropy"], metrics["macro_f1"])

        recorder.log_metrics({
            "test_cross_entropy_per_image": metrics["test_cross_entropy"],
            "macro_precision": metrics["macro_precision"],
            "macro_recall": metrics["macro_recall"],
            "macro_f1": metrics["macro_f1"],
            **{f"recall_{digit}": value for digit, value in metrics["per_class_recall"].items()},
        })
        for path in (args.metrics, args.confusion, args.classification_report,
                     args.accuracy_plot, args.cross_entropy_plot, args.confusion_plot):
            recorder.log_artifact(path, artifact_path="report")
        lock = tracking.project_root() / "dvc.lock"
        if lock.exists():
            recorder.log_artifact(lock)


if __name__ == "__main__":
    run(main)
