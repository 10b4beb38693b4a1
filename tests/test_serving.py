"""The served model (pipeline/serving.py): the arrays it takes, then end to end: a tiny project's champion served by
``mlflow models serve`` (what it refuses, and why, in one line) and asked by ``mnist-predict`` from another folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image
from pipeline_project import model_server, post

from pipeline import serving
from pipeline.data import NUM_PIXELS

RAW = np.arange(2 * 784).reshape(2, 784) % 256
# Requests the model must refuse, with what the one-line reason says about each.
WRONG = {
    "scaled to 0-1": ((RAW / 255).tolist(), "got numbers from 0 to 1: multiply pixels scaled to 0-1 by 255"),
    "negative": ((RAW - 1).tolist(), "got values from -1 to 254"),
    "above 255": ((RAW + 1).tolist(), "got values from 1 to 256"),
    "NaN": ([[float("nan")] * 784], "got NaN"),
    "wrong width": (RAW[:, :783].tolist(), "got rows of 783 values"),
    "one flat row": (RAW[0].tolist(), "got an array of shape (784,)"),
    "whole floats": (RAW.astype(float).tolist(), "got numbers with a fractional part or a decimal point"),
    "strings": ([["0"] * 784], "got values that are not numbers"),
}


@pytest.mark.parametrize("values", [RAW.tolist(), RAW.astype(np.uint8), RAW.astype(np.int64), np.zeros((0, 784), int)])
def test_integer_pixels_0_to_255_are_taken_as_uint8(values):
    pixels = serving.raw_pixels(values)
    # The logged model imports nothing from the pipeline, so it keeps its own image size.
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, np.asarray(values)) and serving.PIXELS == NUM_PIXELS


NAME = "mnist-softmax"


@pytest.fixture(scope="module")
def champion(reproduced_template, tmp_path_factory):
    """A copy of the reproduced tiny project whose only registered version is the champion."""
    from mlflow import MlflowClient

    project = reproduced_template.copy_to(tmp_path_factory.mktemp("serving"))
    MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}").set_registered_model_alias(NAME, "champion", "1")
    return project


def test_the_served_champion_refuses_other_input_with_400_and_one_line_then_answers_raw_pixels(champion):
    images = np.load(champion.root / "data/processed/test_images.npy")[:10]
    expected = np.load(champion.root / "models/test_probabilities.npy")[:10]
    with model_server(champion, f"models:/{NAME}@champion") as url:
        for name, (values, phrase) in WRONG.items():
            status, answer = post(f"{url}/invocations", json.dumps({"inputs": values}).encode())
            assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (name, answer)
            reason = answer["reason"]
            assert reason.startswith("The model takes rows of 784 integer pixels 0-255") and phrase in reason, name
            assert "\n" not in reason and answer["message"].endswith(reason), name
        # It goes on serving: the digit and probabilities of each image.
        status, answer = post(f"{url}/invocations", json.dumps({"inputs": images.tolist()}).encode())
    assert status == 200, answer
    predictions = answer["predictions"]
    assert [set(prediction) for prediction in predictions] == [{"digit", "probabilities"}] * 10
    assert [prediction["digit"] for prediction in predictions] == expected.argmax(axis=1).tolist()
    assert np.allclose([prediction["probabilities"] for prediction in predictions], expected, atol=1e-6)


def test_mnist_predict_from_another_folder_finds_the_projects_store_and_names_the_model(champion, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(np.load(champion.root / "data/processed/test_images.npy")[0].reshape(28, 28)).save(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The project's own package, as a clone's editable install provides it; no MLFLOW_TRACKING_URI. TensorFlow's
    # oneDNN start-up lines are forced on, as on CPUs where TensorFlow enables oneDNN by itself.
    env = {"PYTHONPATH": str(champion.root), "TF_ENABLE_ONEDNN_OPTS": "1"}

    def predict(*args: str):
        command = [sys.executable, "-m", "pipeline.predict", *args, str(image)]
        return champion.run(*command, env=env, cwd=elsewhere, timeout=600)

    by_uri = predict("--json", "--model", f"models:/{NAME}@champion")
    by_file = predict("--json", "--model", str(champion.root / "models/model.keras"))
    text = predict()
    assert by_uri.stderr == by_file.stderr == text.stderr == ""
    (item,) = json.loads(by_uri.stdout)
    assert item.pop("model") == {"name": NAME, "version": "1", "aliases": ["champion"]}
    (file_item,) = json.loads(by_file.stdout)
    assert file_item.pop("model") == {"file": str(champion.root / "models/model.keras")}
    assert item == file_item and 0 <= item["digit"] <= 9
    # Without --model: the champion, named on the first line.
    first, answer = text.stdout.splitlines()
    assert first == f"model: {NAME} version 1, alias champion"
    assert answer.startswith(f"{image}: {item['digit']}  (")
    assert not (elsewhere / "mlflow.db").exists()
