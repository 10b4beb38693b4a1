"""params.yaml validation: every kind of mistake is caught up front, all at once, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, snapshot, stage_env, write_params

from pipeline.params import ParamsError, load_params, validate


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        validate(raw)
    return str(caught.value)


def test_project_params_load_into_typed_objects():
    params = load_params(ROOT / "params.yaml")
    assert params.train.learning_rate == 0.003 and isinstance(params.train.learning_rate, float)
    assert params.train.batch_size == 100 and params.train.iterations == 10_000
    assert params.preprocess.validation_size == 5000
    assert params.check["test_accuracy"].floor == 0.915
    assert params.check["test_accuracy"].better == "higher"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ParamsError, match=r"nowhere\.yaml does not exist"):
        load_params(tmp_path / "nowhere.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_typo_suggests_the_closest_key():
    raw = raw_params()
    raw["train"]["learnin_rate"] = raw["train"].pop("learning_rate")
    message = problems_of(raw)
    assert "train.learnin_rate is not a known key (did you mean train.learning_rate?)" in message
    assert "train.learning_rate is missing" in message


def test_missing_key_and_section():
    raw = raw_params()
    del raw["train"]["batch_size"]
    del raw["fetch"]
    message = problems_of(raw)
    assert "train.batch_size is missing" in message
    assert "section fetch is missing" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "batch_size", "abc", "train.batch_size must be a whole number"),
        ("train", "learning_rate", "fast", "train.learning_rate must be a number"),
        ("train", "iterations", True, "train.iterations must be a whole number"),
        ("train", "learning_rate", 0, "train.learning_rate must be more than 0"),
        ("train", "learning_rate", -0.1, "train.learning_rate must be more than 0"),
        ("train", "batch_size", 0, "train.batch_size must be at least 1"),
        ("train", "batch_size", 55_001, "train.batch_size (55001) is larger than the training set (55000 images)"),
        ("train", "iterations", 0, "train.iterations must be at least 1"),
        ("train", "eval_interval", 0, "train.eval_interval must be at least 1"),
        ("preprocess", "validation_size", 60_000, "preprocess.validation_size must be in [0, 60000)"),
        ("preprocess", "validation_size", -1, "preprocess.validation_size must be in [0, 60000)"),
        ("tracking", "uri", "ftp://example/store", "tracking.uri has unknown scheme 'ftp'"),
        ("tracking", "registered_model", "", "tracking.registered_model must name the MLflow registered model"),
        ("tracking", "registered_model", "mnist@v1", "tracking.registered_model 'mnist@v1' must not contain / @ :"),
        ("tracking", "registered_model", "team/mnist", "tracking.registered_model 'team/mnist' must not contain"),
        ("tracking", "registered_model", 7, "tracking.registered_model must be a string"),
        ("fetch", "timeout_seconds", 0, "fetch.timeout_seconds must be more than 0"),
    ],
)
def test_bad_values_are_named(section, key, value, expected):
    raw = raw_params()
    raw[section][key] = value
    assert expected in problems_of(raw)


def test_numeric_strings_are_accepted_for_floats():
    # YAML 1.1 reads 3e-3 as a string; users write it that way all the time.
    raw = raw_params()
    raw["train"]["learning_rate"] = "3e-3"
    assert validate(raw).train.learning_rate == pytest.approx(0.003)


def test_every_problem_is_reported_at_once():
    raw = raw_params()
    raw["train"]["learning_rate"] = -1
    raw["train"]["iterations"] = 0
    raw["tracking"]["uri"] = "gopher://x"
    raw["check"]["test_accuracy"]["better"] = "up"
    message = problems_of(raw)
    assert message.startswith("params.yaml has 4 problems:")
    for fragment in ("learning_rate", "iterations", "gopher", "check.test_accuracy.better"):
        assert fragment in message


@pytest.mark.parametrize("stage", ["pipeline.preprocess", "pipeline.train", "pipeline.report"])
def test_stages_reject_bad_params_before_heavy_imports_and_change_nothing(tmp_path, stage):
    write_params(tmp_path, train={"learnin_rate": 0.1}, tracking={"uri": "ftp://nowhere"})
    outputs = tmp_path / "out"
    outputs.mkdir()
    (outputs / "model.keras").write_bytes(b"an earlier model")
    before = snapshot(outputs)
    args = {
        "pipeline.preprocess": ["--raw", "raw", "--out", "out/processed"],
        "pipeline.train": [
            "--data",
            "d",
            "--model",
            "out/model.keras",
            "--test-probabilities",
            "out/p.npy",
            "--weight-maps",
            "out/w.npy",
            "--train-history",
            "out/h.csv",
            "--test-history",
            "out/t.csv",
            "--parameter-percentiles",
            "out/q.csv",
            "--metrics",
            "out/m.json",
        ],
        "pipeline.report": [
            "--data",
            "d",
            "--test-probabilities",
            "out/p.npy",
            "--weight-maps",
            "out/w.npy",
            "--train-history",
            "out/h.csv",
            "--test-history",
            "out/t.csv",
            "--parameter-percentiles",
            "out/q.csv",
            "--metrics",
            "out/m.json",
            "--confusion",
            "out/c.csv",
            "--classification-report",
            "out/r.txt",
            "--accuracy-plot",
            "out/a.png",
            "--cross-entropy-plot",
            "out/x.png",
            "--confusion-plot",
            "out/cm.png",
            "--mistakes-plot",
            "out/mistakes.png",
            "--weight-maps-plot",
            "out/maps.png",
            "--percentiles-plot",
            "out/percentiles.png",
        ],
    }[stage]
    # -X importtime lists every module imported; TensorFlow and MLflow must not be among them.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", stage, *args],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    message = " ".join(" ".join(error_lines).split())
    assert "Traceback" not in result.stderr
    assert "did you mean train.learning_rate?" in message and "ftp" in message
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not {"tensorflow", "mlflow", "keras"} & imported
    assert snapshot(outputs) == before


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("seed", 2**32, "train.seed must be in [0, 2**32), got 4294967296"),
        ("seed", 1099511627776, "train.seed must be in [0, 2**32)"),
        ("learning_rate", 1.0e300, "train.learning_rate must be more than 0 and at most 3.403e+38 (float32)"),
    ],
)
def test_values_training_cannot_use_are_refused_with_the_limit(key, value, expected):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"][key] = value
    assert expected in problems_of(raw)


def test_the_largest_seed_and_float32_rate_pass():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(seed=2**32 - 1, learning_rate=3.0e38)
    params = validate(raw)
    assert params.train.seed == 2**32 - 1


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("retry_seconds", 0, "tracking.retry_seconds must be more than 0 and at most 3600, got 0"),
        ("request_timeout_seconds", -1, "tracking.request_timeout_seconds must be more than 0 and at most 600"),
        ("request_timeout_seconds", "soon", "tracking.request_timeout_seconds must be a number, got 'soon'"),
    ],
)
def test_tracking_retry_and_timeout_must_be_positive_and_bounded(key, value, expected):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"][key] = value
    assert expected in problems_of(raw)


@pytest.mark.parametrize(("seconds", "retries"), [(0.5, 2), (2, 2), (30, 5), (60, 6), (3600, 12)])
def test_retry_time_becomes_enough_of_mlflows_retries_to_cover_it(seconds, retries):
    from pipeline.tracking.store import http_client_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"].update(retry_seconds=seconds, request_timeout_seconds=7)
    settings = http_client_settings(validate(raw).tracking)
    assert settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(retries)
    # urllib3 waits 0, 2, 4 … seconds between retries (backoff factor 1): 2**n - 2 in all.
    assert 2**retries - 2 >= seconds > 2 ** (retries - 1) - 2
    assert settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_every_model_of_the_series_is_accepted():
    from pipeline.params import MODEL_NAMES

    raw = raw_params()
    assert validate(raw).train.model == "softmax"
    for name in MODEL_NAMES:
        raw["train"]["model"] = name
        assert validate(raw).train.model == name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("convnet", "train.model 'convnet' is not a known model (did you mean conv? known models: softmax, "),
        ("lenet", "train.model 'lenet' is not a known model (known models: softmax, five_layers_sigmoid, "),
        (3, "train.model must be a string, got 3"),
    ],
)
def test_unknown_model_lists_the_known_ones(value, expected):
    raw = raw_params()
    raw["train"]["model"] = value
    message = problems_of(raw)
    assert expected in message
    if isinstance(value, str):
        assert message.rstrip(".").endswith("conv_batchnorm)")
