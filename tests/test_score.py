"""The test metrics train logs with every model and report writes to metrics.json."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.score import flat, score


def test_score_matches_hand_computed_values_flat_names_them_as_dvc_does_and_shapes_must_match():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.full((4, 10), 0.01)
    probabilities[range(4), [0, 1, 2, 1]] = 0.91
    metrics = score(labels, probabilities)
    assert metrics["test_accuracy"] == 0.75
    # Three images give their true class 0.91, one gives it 0.01.
    assert metrics["test_cross_entropy"] == pytest.approx(-(3 * np.log(0.91) + np.log(0.01)) / 4)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probabilities.argmax(1), average="macro"))
    recall = {**dict.fromkeys(map(str, range(10)), 0.0), "0": 1.0, "1": 1.0, "2": 0.5}
    assert metrics["per_class_recall"] == recall
    recall_keys = {f"per_class_recall.{digit}": value for digit, value in recall.items()}
    assert flat(metrics) == {key: metrics[key] for key in metrics if key != "per_class_recall"} | recall_keys
    with pytest.raises(ValueError, match="expected probabilities of shape"):
        score(labels, probabilities[:3])
