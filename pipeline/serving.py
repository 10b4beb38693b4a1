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


def raw_pixels(model_input: Any) -> np.ndarray:
    """``model_input`` as uint8 rows, or an MlflowException whose ``reason`` is the line alone (without the input)."""
    values = np.asarray(model_input)
    kind = values.dtype.kind
    if values.ndim != 2:
        problem = f"got an array of shape {values.shape}"
    elif values.shape[1] != PIXELS:
        problem = f"got rows of {values.shape[1]} values"
    elif kind == "f" and np.isnan(values).any():
        problem = "got NaN"
    elif kind == "f" and values.size and values.min() >= 0 and values.max() <= 1:
        problem = "got numbers from 0 to 1: multiply pixels scaled to 0-1 by 255 and send them as integers"
    elif kind == "f":
        problem = "got numbers with a fractional part or a decimal point; send integers"
    elif kind not in "iu":
        problem = "got values that are not numbers"
    elif values.size and (values.min() < 0 or values.max() > 255):
        problem = f"got values from {values.min()} to {values.max()}"
    else:
        return values.astype(np.uint8)
    reason = f"{CONTRACT}; {problem}."
    raise MlflowException.invalid_parameter_value(reason, reason=reason)


class Digits(PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> list[dict[str, Any]]:
        probabilities = np.asarray(self.model(raw_pixels(model_input)))
        return [{"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities]


mlflow.models.set_model(Digits())
