"""The test-set metrics every model is judged by, from the test probabilities, named as ``dvc metrics show``
names them: train logs them on its run and its registry version, report writes the ``SCORES`` to metrics.json."""

from __future__ import annotations

import numpy as np

from pipeline.data import NUM_CLASSES

CLASS_NAMES = [str(digit) for digit in range(NUM_CLASSES)]
# The single numbers, metrics.json's, which a sweep can rank trials by.
SCORES = ("test_accuracy", "test_cross_entropy", "macro_precision", "macro_recall", "macro_f1")


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Test-set metrics from integer labels and predicted class probabilities."""
    from sklearn.metrics import precision_recall_fscore_support

    if probabilities.shape != (len(labels), NUM_CLASSES):
        raise ValueError(f"expected probabilities of shape ({len(labels)}, 10), got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1)
    # Clipping keeps log(0) finite should a probability underflow.
    true_class = np.clip(probabilities[np.arange(len(labels)), labels], 1e-30, 1.0).astype(np.float64)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    _, per_class, _, _ = precision_recall_fscore_support(labels, predicted, labels=range(NUM_CLASSES), zero_division=0)
    return {
        "test_accuracy": float(np.mean(predicted == labels)),
        "test_cross_entropy": float(-np.mean(np.log(true_class))),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "per_class_recall": {name: float(value) for name, value in zip(CLASS_NAMES, per_class)},
    }


def flat(metrics: dict) -> dict[str, float]:
    """``score``'s metrics as MLflow metrics, the recall of each digit as per_class_recall.<digit>."""
    recall = {f"per_class_recall.{name}": value for name, value in metrics["per_class_recall"].items()}
    return {key: value for key, value in metrics.items() if key != "per_class_recall"} | recall
