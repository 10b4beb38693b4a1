"""params.yaml and settings validation: every kind of mistake is caught up front, all at once, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, snapshot, stage_env, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cli import PipelineError
from pipeline.params import ParamsError, fetch_settings, load_params, parse_yaml, tracking_settings, validate


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
    del raw["preprocess"]
    message = problems_of(raw)
    assert "train.batch_size is missing" in message
    assert "section preprocess is missing" in message


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
        ("train", "iterations", 0, "train.iterations must be from 1 to 10,000,000, got 0"),
        ("train", "iterations", 10_000_001, "train.iterations must be from 1 to 10,000,000"),
        ("train", "iterations", 10**400, "train.iterations must be from 1 to 10,000,000"),
        ("train", "eval_interval", 0, "train.eval_interval must be from 1 to train.iterations (10000), got 0"),
        ("train", "eval_interval", 10_001, "train.eval_interval must be from 1 to train.iterations (10000)"),
        ("train", "learning_rate", 10**400, "train.learning_rate must be a number"),
        ("train", "batch_size", 10**400, "is larger than the training set"),
        ("train", "seed", -(10**400), "train.seed must be in [0, 2**32)"),
        ("preprocess", "validation_size", 10**400, "preprocess.validation_size must be in [0, 60000)"),
        ("preprocess", "validation_size", 60_000, "preprocess.validation_size must be in [0, 60000)"),
        ("preprocess", "validation_size", -1, "preprocess.validation_size must be in [0, 60000)"),
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
    raw["train"]["model"] = "gopher"
    raw["check"]["test_accuracy"]["better"] = "up"
    message = problems_of(raw)
    assert message.startswith("params.yaml has 4 problems:")
    for fragment in ("learning_rate", "iterations", "gopher", "check.test_accuracy.better"):
        assert fragment in message


# Each stage's command line, with paths in a scratch folder (the stages stop before using them).
STAGE_ARGS = {
    "pipeline.fetch": ["--out", "out/raw"],
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
}


@pytest.mark.parametrize("stage", ["pipeline.preprocess", "pipeline.train", "pipeline.report"])
def test_stages_reject_bad_params_before_heavy_imports_and_change_nothing(tmp_path, stage):
    write_params(tmp_path, train={"learnin_rate": 0.1})
    outputs = tmp_path / "out"
    outputs.mkdir()
    (outputs / "model.keras").write_bytes(b"an earlier model")
    before = snapshot(outputs)
    args = STAGE_ARGS[stage]
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
    assert "did you mean train.learning_rate?" in message
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
    ("stage", "variable", "value"),
    [
        ("pipeline.fetch", "MNIST_FETCH_TIMEOUT", "0"),
        ("pipeline.train", "MLFLOW_TRACKING_URI", "ftp://nowhere"),
        ("pipeline.report", "MLFLOW_HTTP_REQUEST_TIMEOUT", "forever"),
    ],
)
def test_stages_reject_bad_settings_before_heavy_imports(tmp_path, stage, variable, value):
    write_params(tmp_path)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", stage, *STAGE_ARGS[stage]],
        cwd=tmp_path,
        env=stage_env(**{variable: value}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    message = " ".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert "error: the environment has 1 problem:" in message and variable in message, message
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not {"tensorflow", "mlflow", "keras"} & imported
    assert not (tmp_path / "out").exists()


def settings_problems(loader, **environ: str) -> str:
    with pytest.raises(PipelineError) as caught:
        loader(environ)
    return str(caught.value)


def test_settings_default_to_the_project_store_and_names():
    tracking = tracking_settings({})
    assert (tracking.uri, tracking.experiment, tracking.registered_model) == ("", "mnist-softmax", "mnist-softmax")
    # Five retries, backoff factor 1: urllib3 waits 0, 2, 4, 8 and 16 s, 30 s in all.
    assert tracking.http_environment() == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    assert tracking.retry_seconds == 30
    assert fetch_settings({}) == fetch_settings({"MNIST_MIRROR": " ", "MNIST_FETCH_TIMEOUT": ""})
    assert fetch_settings({}).timeout_seconds == 30 and fetch_settings({}).mirror == ""


def test_settings_come_from_mlflows_variables_and_the_projects():
    tracking = tracking_settings({
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "team",
        "MNIST_REGISTERED_MODEL": "digits", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
    })  # fmt: skip
    assert (tracking.uri, tracking.experiment, tracking.registered_model) == ("http://127.0.0.1:5000", "team", "digits")
    assert (tracking.request_timeout, tracking.retry_seconds) == (7, 12)
    assert fetch_settings({"MNIST_MIRROR": "/srv/mnist", "MNIST_FETCH_TIMEOUT": "2.5"}).timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MLFLOW_TRACKING_URI", "ftp://example/store", "MLFLOW_TRACKING_URI has unknown scheme 'ftp'"),
        ("MNIST_REGISTERED_MODEL", "mnist@v1", "MNIST_REGISTERED_MODEL 'mnist@v1' must be 1 to 256 letters"),
        ("MNIST_REGISTERED_MODEL", "team/mnist", "MNIST_REGISTERED_MODEL 'team/mnist' must be 1 to 256 letters"),
        # A quote breaks the search filters promotion uses; '%' and '..' the file store refuses.
        ("MNIST_REGISTERED_MODEL", "it's", 'MNIST_REGISTERED_MODEL "it\'s" must be 1 to 256 letters'),
        ("MNIST_REGISTERED_MODEL", "50%", "must be 1 to 256 letters, digits"),
        ("MNIST_REGISTERED_MODEL", "..", "must be 1 to 256 letters, digits"),
        ("MNIST_REGISTERED_MODEL", "m" * 257, "must be 1 to 256 letters, digits"),
        ("MLFLOW_EXPERIMENT_NAME", "e" * 501, "MLFLOW_EXPERIMENT_NAME must be at most 500 characters"),
        (
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "11",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES must be a whole number from 0 to 10",
        ),
        (
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
            "-1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR must be a whole number from 0",
        ),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "2.5", "MLFLOW_HTTP_REQUEST_TIMEOUT must be a whole number from 1 to 600"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "9" * 5000, "MLFLOW_HTTP_REQUEST_TIMEOUT must be a whole number from 1 to 600"),
    ],
)
def test_bad_tracking_settings_are_named(variable, value, expected):
    assert expected in settings_problems(tracking_settings, **{variable: value})


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MNIST_FETCH_TIMEOUT", "0", "MNIST_FETCH_TIMEOUT must be a number from 0.001 to 3600, got '0'"),
        ("MNIST_FETCH_TIMEOUT", "1e999", "MNIST_FETCH_TIMEOUT must be a number from 0.001 to 3600"),
        ("MNIST_FETCH_TIMEOUT", "soon", "MNIST_FETCH_TIMEOUT must be a number from 0.001 to 3600, got 'soon'"),
        ("MNIST_MIRROR", "ftp://u:hunter22@mirror/", "MNIST_MIRROR 'ftp://u:***@mirror/' has the scheme ftp://"),
        ("MNIST_MIRROR", "http://[::1", "MNIST_MIRROR 'http://[::1' is not a valid URL"),
    ],
)
def test_bad_fetch_settings_are_named(variable, value, expected):
    message = settings_problems(fetch_settings, **{variable: value})
    assert expected in message and "hunter22" not in message


def test_every_settings_problem_is_reported_at_once():
    message = settings_problems(
        tracking_settings,
        MLFLOW_TRACKING_URI="gopher://x",
        MNIST_REGISTERED_MODEL="a:b",
        MLFLOW_HTTP_REQUEST_TIMEOUT="0",
    )
    assert message.startswith("the environment has 3 problems:")


@pytest.mark.parametrize("section", ["tracking", "fetch"])
def test_the_former_settings_sections_are_refused_with_the_variables_that_replace_them(section):
    raw = raw_params()
    raw[section] = {"timeout_seconds": 30}
    message = problems_of(raw)
    assert f"section {section} is no longer read from params.yaml" in message
    assert ("MNIST_FETCH_TIMEOUT" if section == "fetch" else "MLFLOW_HTTP_REQUEST_TIMEOUT") in message


@pytest.mark.parametrize(
    "value",
    [
        "postgresql+psycopg://mlflow:hunter22@db/mlflow",
        "http://admin:hunter22@mlflow:5000",
        "https://h/?token=hunter22",
    ],
)
def test_credentials_in_params_yaml_are_refused_without_being_repeated(value):
    raw = raw_params()
    raw["tracking"] = {"uri": value}
    raw["train"]["model"] = value
    message = problems_of(raw)
    assert "train.model, tracking.uri hold credentials, which must not be in a committed file" in message
    assert "set them in the environment instead" in message
    # The message itself goes through the masking every error paragraph gets.
    from pipeline.cli import format_error

    assert "hunter22" not in format_error(message)


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


def test_the_longest_names_the_store_keeps_are_accepted():
    tracking = tracking_settings({"MNIST_REGISTERED_MODEL": "m" * 256, "MLFLOW_EXPERIMENT_NAME": "e" * 500})
    assert (len(tracking.registered_model), len(tracking.experiment)) == (256, 500)


ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ALIAS_BOMB, "(line 2, column 8): aliases (*name) are not accepted"),
        ("train:\n  seed: 1\n  seed: 2\n", "(line 3, column 3): the key 'seed' appears twice"),
        ("train: {seed: " + "9" * 5000 + "}\n", "an integer of 5000 characters is out of any sane range"),
        ("train: {seed: 0b" + "1" * 5000 + "}\n", "an integer of 5002 characters is out of any sane range"),
        ("train: {seed: " + "9" * 400 + "}\n", "an integer of 400 characters is out of any sane range"),
        ("train: " + "[" * 100_000 + "]" * 100_000, "values nest more than 50 deep"),
        ("train: {seed: 2024-13-45}\n", "month must be in 1..12"),
    ],
)
def test_yaml_no_settings_file_needs_is_refused_with_its_line(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not valid YAML") and expected in message and "\n" not in message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("name", "expected"),
    [("/dev/zero", "it is a device, not a regular file"), ("big", "it holds more than the 1,048,576 bytes")],
)
def test_params_are_read_only_from_a_regular_file_of_sane_size(tmp_path, name, expected):
    path = tmp_path / name
    if name == "big":
        path.write_text("# padding\n" * 200_000)
    with pytest.raises(ParamsError, match=f"cannot read {path}: {expected}"):
        load_params(path)


YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.dates(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), children,
                                                                      max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["preprocess", "train", "check"]), key=st.text(max_size=15) | st.none(), value=YAMLISH)
def test_any_value_anywhere_is_valid_or_a_params_error(section, key, value):
    raw = raw_params()
    # Either the whole section or one of its keys (a known one most of the time) takes the value.
    known = list(raw[section])
    if key is None:
        raw[section] = value
    else:
        raw[section][known[len(key) % len(known)] if len(key) % 3 else key] = value
    try:
        validate(raw)
    except ParamsError as error:
        assert "\n" not in str(error)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!,'\"?|>#%@ 0123456789.eE\n\t")), max_size=80))
def test_any_text_parses_or_is_a_params_error(text):
    try:
        parse_yaml(text, "params.yaml")
    except ParamsError as error:
        assert str(error).startswith("params.yaml is not valid YAML")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("max_worsening: 0.002", "max_worsening: " + "9" * 5000, "an integer of 5000 characters"),
        ("macro_f1:", "test_accuracy:", "the key 'test_accuracy' appears twice"),
    ],
)
def test_the_gate_answers_bad_params_with_bad_input_exit_2(tmp_path, old, new, expected):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace(old, new))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.check", "--params", str(path)],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"error: {path} is not valid YAML") and expected in result.stderr
    assert "Traceback" not in result.stderr
