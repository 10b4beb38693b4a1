"""The test metrics train logs with every model and report writes to metrics.json."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.score import flat, score


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


def test_flat_names_the_metrics_as_dvc_metrics_show_does():
    from dvc.utils.flatten import flatten

    metrics = score(np.array([0, 1, 2, 2]), np.eye(10)[[0, 1, 2, 1]])
    assert flat(metrics) == flatten(metrics)
    assert flat(metrics)["per_class_recall.2"] == 0.5
