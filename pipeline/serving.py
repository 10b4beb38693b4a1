"""The model as MLflow logs, registers and serves it: raw pixels in, the digit and its probabilities out.

Train logs this file as an MLflow "model from code", with the Keras file ``models/model.keras`` as
its artifact; the logged model carries the file, so it imports nothing from the pipeline. ``predict``
takes rows of 784 integer pixels 0-255 (28×28 images row by row, white ink on black, as MNIST's
files hold them) and returns for each ``{"digit": d, "probabilities": [ten floats]}``. Anything else
raises MlflowException(INVALID_PARAMETER_VALUE) with one line saying what the model takes, which
``mlflow models serve`` answers with HTTP 400.

The logged model has no *input* signature on purpose: MLflow's scoring server casts a request to the
signature's type before any model code sees it, so under the Keras model's uint8 signature pixels
scaled to 0-1 arrived as zeros and got a wrong answer with HTTP 200, and a float signature would
refuse the uint8 arrays Python callers pass. The signature states the output; the check states the input.
"""

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
# The Keras file's name among the logged model's artifacts.
KERAS_ARTIFACT = "keras_model"


def input_problem(values: np.ndarray) -> str | None:
    """What keeps ``values`` from being rows of raw pixels, or None."""
    if values.ndim != 2 or values.shape[1] != PIXELS:
        return f"got rows of {values.shape[1]} values" if values.ndim == 2 else f"got an array of shape {values.shape}"
    if values.dtype.kind == "f":
        if np.isnan(values).any():
            return "got NaN"
        if values.size and values.min() >= 0 and values.max() <= 1:
            return "got numbers from 0 to 1: multiply pixels scaled to 0-1 by 255 and send them as integers"
        return "got numbers with a fractional part or a decimal point; send integers"
    if values.dtype.kind not in "iu":
        return "got values that are not numbers"
    if values.size and (values.min() < 0 or values.max() > 255):
        return f"got values from {values.min()} to {values.max()}"
    return None


def raw_pixels(model_input: Any) -> np.ndarray:
    """``model_input`` (an array, nested lists or a DataFrame) as uint8 rows of 784, or an MlflowException.

    MLflow's scoring server puts the request's values before the message (``Failed to predict data
    '…'. Error: …``), so the line is also given alone, as the error's ``reason``.
    """
    values = np.asarray(model_input)
    if (problem := input_problem(values)) is not None:
        reason = f"{CONTRACT}; {problem}."
        raise MlflowException.invalid_parameter_value(reason, reason=reason)
    return values.astype(np.uint8)


def answers(probabilities: np.ndarray) -> list[dict[str, Any]]:
    """Each row of probabilities as the digit it predicts and its ten probabilities."""
    return [{"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities]


class Digits(PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> list[dict[str, Any]]:
        return answers(np.asarray(self.model(raw_pixels(model_input))))


mlflow.models.set_model(Digits())
