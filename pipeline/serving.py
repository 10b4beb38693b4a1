"""The model as MLflow logs and serves it ("model from code"): rows of 784 raw pixels in, digits and probabilities out.
No input signature: the server would cast 0-1 pixels to uint8 zeros (HTTP 200, wrong); :func:`raw_pixels` refuses."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, Schema

PIXELS = 784
CONTRACT = (
    "The model takes rows of 784 integer pixels 0-255 (28x28 images row by row, white ink on black, "
    'not scaled), e.g. {"inputs": [[0, 0, 255, ...]]}'
)
SIGNATURE = ModelSignature(outputs=Schema([ColSpec("long", "digit"), ColSpec(Array("double"), "probabilities")]))
KERAS_ARTIFACT = "keras_model"


def input_problem(values: np.ndarray) -> str | None:
    """What keeps ``values`` from being rows of raw pixels, or None."""
    if values.ndim != 2 or values.shape[1] != PIXELS:
        return f"got rows of {values.shape[1]} values" if values.ndim == 2 else f"got an array of shape {values.shape}"
    if values.dtype.kind == "f" and np.isnan(values).any():
        return "got NaN"
    if values.dtype.kind == "f" and values.size and values.min() >= 0 and values.max() <= 1:
        return "got numbers from 0 to 1: multiply pixels scaled to 0-1 by 255 and send them as integers"
    if values.dtype.kind == "f":
        return "got numbers with a fractional part or a decimal point; send integers"
    if values.dtype.kind not in "iu":
        return "got values that are not numbers"
    if values.size and (values.min() < 0 or values.max() > 255):
        return f"got values from {values.min()} to {values.max()}"
    return None


def raw_pixels(model_input: Any) -> np.ndarray:
    """``model_input`` as uint8 rows, or an MlflowException whose ``reason`` holds the line alone (the scoring
    server puts the request's values before the message)."""
    values = np.asarray(model_input)
    if (problem := input_problem(values)) is not None:
        reason = f"{CONTRACT}; {problem}."
        raise MlflowException.invalid_parameter_value(reason, reason=reason)
    return values.astype(np.uint8)


class Digits(PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> list[dict[str, Any]]:
        probabilities = np.asarray(self.model(raw_pixels(model_input)))
        return [{"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities]


mlflow.models.set_model(Digits())
