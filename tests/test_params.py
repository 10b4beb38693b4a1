"""params.yaml and the settings: every mistake is caught up front, all at once, in one paragraph, secrets masked."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_module, snapshot, stage_env, with_credentials, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import params
from pipeline.cli import MASK, PipelineError, format_error
from pipeline.params import fetch_settings, load_params, load_rules, tracking_settings, validate

PASSWORD = secrets.token_hex(8)  # generated, so that no password-looking literal is committed


def edited(**changes) -> dict:
    """The project's params with ``section__key=value`` changes (``section=value`` for a whole section)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, value in changes.items():
        section, _, key = name.partition("__")
        target, key = (raw[section], key) if key else (raw, section)
        target[key] = value
    return raw


RULE = {"better": "lower", "max_worsening": 0}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train__learnin_rate": 0.1}, "train.learnin_rate is not a known key (did you mean train.learning_rate?)"),
        ({"gopher": 1}, "gopher is not a known key (valid keys: preprocess, train)"),
        ({"train__batch_size": "abc"}, "train.batch_size must be a whole number, got 'abc'"),
        ({"train__iterations": True}, "train.iterations must be a whole number, got True"),
        ({"train__learning_rate": "fast"}, "train.learning_rate must be a number, got 'fast'"),
        ({"train__learning_rate": True}, "train.learning_rate must be a number, got True"),
        ({"train__learning_rate": 0}, "train.learning_rate must be greater than 0, got 0"),
        ({"train__learning_rate": 1e300}, "learning_rate must be at most 3.403e+38, as training runs in float32"),
        ({"train__learning_rate": 10**400}, "train.learning_rate must be a number, got 1000000000"),
        ({"train__batch_size": 0}, "train.batch_size must be greater than or equal to 1, got 0"),
        ({"train__iterations": 0}, "train.iterations must be greater than or equal to 1, got 0"),
        ({"train__iterations": 10_000_001}, "train.iterations must be less than or equal to 10000000"),
        ({"train__eval_interval": 10_001}, "train.eval_interval must be at most train.iterations (10000), got 10001"),
        ({"train__seed": 2**32}, "train.seed must be less than 4294967296, got 4294967296"),
        ({"train__seed": -(10**400)}, "train.seed must be greater than or equal to 0, got -1000000000"),
        ({"preprocess__validation_size": 60_000}, "preprocess.validation_size must be less than 60000, got 60000"),
        ({"train__model": "convnet"}, "train.model 'convnet' is not a known model (did you mean conv? known models: "),
        ({"train__model": "lenet"}, "'lenet' is not a known model (known models: softmax, five_layers_sigmoid, "),
        ({"train__model": 3}, "train.model must be a valid string, got 3"),
        (
            {
                "tracking": {"uri": with_credentials("postgresql://db/x", "m", PASSWORD)},
                "train__model": with_credentials("http://h", "a", PASSWORD),
            },
            "params.yaml has 3 problems: train.model, tracking.uri hold credentials, which must not be in a committed",
        ),
    ],
)
def test_every_bad_value_is_named_in_one_paragraph(changes, expected):
    with pytest.raises(PipelineError) as caught:
        validate(edited(**changes))
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert PASSWORD not in format_error(str(caught.value))


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ({"x": {**RULE, "flor": 1}}, "x.flor is not a known key (did you mean x.floor?)"),
        ({"x": {**RULE, "range": [1, 0]}}, "x.range must have low <= high, got [1, 0]"),
        ({"x": {**RULE, "range": "0..1"}}, "must be a list [low, high] of two numbers or nulls, got '0..1'"),
        ({"x": {**RULE, "range": [0, "many"]}}, "x.range must be a number, got 'many'"),
        (
            {"x": {**RULE, "better": "up"}, "y": {}},
            "rules.yaml has 3 problems: x.better must be 'higher' or 'lower', got 'up'; y.better is missing",
        ),
        ([RULE], "rules.yaml has 1 problem: it must be a mapping"),
    ],
)
def test_every_bad_rule_of_the_gate_is_named_in_one_paragraph(tmp_path, rules, expected):
    (path := tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    with pytest.raises(PipelineError) as caught:
        load_rules(path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_values_at_the_limits_and_numbers_as_yaml_and_dvc_write_them_pass():
    # YAML 1.1 reads 3e-3 as a string; `dvc exp run -S train.iterations=1e4` writes a float.
    train = validate(edited(train__seed=2**32 - 1, train__learning_rate="3e-3", train__iterations=1e4)).train
    assert (train.seed, train.learning_rate, train.iterations) == (2**32 - 1, 0.003, 10_000)
    assert type(train.iterations) is int and validate(edited(train__learning_rate=3.0e38)).train.learning_rate == 3.0e38


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "does not exist; run from the project root"),
        ("/dev/zero", "cannot read /dev/zero: it is a device, not a regular file"),
        ("# padding\n" * 200_000, "it holds more than the 1,048,576 bytes"),
        ("train: [unclosed\n", "is not valid YAML (line 2, column 1)"),
        ("a: &a [1]\nb: *a\n", "is not valid YAML (line 2, column 4): aliases (*name) are not accepted"),
        ("train:\n  seed: 1\n  seed: 2\n", "(line 3, column 3): the key 'seed' appears twice"),
        ("train: " + "[" * 100_000 + "]" * 100_000, "values nest too deep"),
        ("train: {seed: " + "9" * 400 + "}\n", "(line 1, column 15): an integer of 400 characters is out of any sane"),
        ("train: {seed: 0b" + "1" * 5000 + "}\n", "an integer of 5002 characters is out of any sane range"),
        ("train: {seed: 2024-13-45}\n", "month must be in 1..12"),
        ("[1, 2]", "params.yaml has 1 problem: it must be a mapping, got [1, 2]"),
    ],
)
def test_unreadable_or_unsafe_params_files_are_refused_in_one_line(tmp_path, text, expected):
    path = Path(text) if text == "/dev/zero" else tmp_path / "params.yaml"
    if text not in (None, "/dev/zero"):
        path.write_text(text)
    with pytest.raises(PipelineError) as caught:
        load_params(path)
    assert expected in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("stage", "params", "environ", "expected"),
    [
        ("preprocess", {"learnin_rate": 0.1}, {}, "did you mean train.learning_rate?"),
        ("train", {"learnin_rate": 0.1}, {}, "did you mean train.learning_rate?"),
        ("report", {"learnin_rate": 0.1}, {}, "did you mean train.learning_rate?"),
        ("fetch", {}, {"MNIST_FETCH_TIMEOUT": "0"}, "the environment has 1 problem: MNIST_FETCH_TIMEOUT"),
        ("train", {}, {"MLFLOW_TRACKING_URI": "ftp://nowhere"}, "the environment has 1 problem: MLFLOW_TRACKING_URI"),
        ("report", {}, {"MLFLOW_HTTP_REQUEST_TIMEOUT": "-1"}, "the environment has 1 problem: MLFLOW_HTTP_REQUEST"),
    ],
)
def test_stages_refuse_bad_input_before_heavy_imports_and_change_nothing(tmp_path, stage, params, environ, expected):
    write_params(tmp_path, train=params)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.keras").write_bytes(b"an earlier model")
    before = snapshot(tmp_path)
    arguments = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()[3:]
    # The import-time profile lists every module imported; TensorFlow and MLflow must not be among them.
    environment = stage_env(PYTHONPROFILEIMPORTTIME="1", **environ)
    result = run_module(f"pipeline.{stage}", *arguments, cwd=tmp_path, env=environment, timeout=120)
    profile = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    message = " ".join(" ".join(line for line in result.stderr.splitlines() if line not in profile).split())
    assert result.returncode == 1 and "Traceback" not in result.stderr and expected in message, message
    assert not {"tensorflow", "mlflow", "keras"} & {line.split("|")[-1].strip() for line in profile}
    assert snapshot(tmp_path) == before


def test_settings_defaults_and_values():
    names = [f"MLFLOW_HTTP_REQUEST_{name}" for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT")]
    http = dict(zip(names, ["3", "2", "7"]))
    tracking = tracking_settings({"MLFLOW_EXPERIMENT_NAME": "e" * 500, "MNIST_REGISTERED_MODEL": "m" * 256, **http})
    # 3 retries with backoff factor 2 wait 0, 4 and 8 s (urllib3).
    assert (len(tracking.experiment), tracking.http_environment(), tracking.retry_seconds) == (500, http, 12)
    # Blank is unset. Each model of the series is a registered model of its own, unless the variable names one for all.
    blank = tracking_settings({"MLFLOW_EXPERIMENT_NAME": "\t", "MNIST_REGISTERED_MODEL": " "})
    assert (blank.experiment, blank.registered_name("conv")) == ("mnist-softmax", "mnist-conv")
    assert tracking.registered_name("conv") == "m" * 256
    assert fetch_settings({"MNIST_MIRROR": " ", "MNIST_FETCH_TIMEOUT": "2.5"}).timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"MLFLOW_TRACKING_URI": with_credentials("ftp://example/store", "u", PASSWORD)},
            f"MLFLOW_TRACKING_URI has unknown scheme 'ftp' in '{with_credentials('ftp://example/store', 'u', MASK)}'",
        ),
        ({"MNIST_REGISTERED_MODEL": "mnist@v1"}, "MNIST_REGISTERED_MODEL 'mnist@v1' must be 1 to 256 letters"),
        # A quote breaks the search filters promotion uses; '%' and '..' the file store refuses.
        *[({"MNIST_REGISTERED_MODEL": name}, "must be 1 to 256") for name in ["a/b", "it's", "50%", "..", "m" * 257]],
        ({"MLFLOW_EXPERIMENT_NAME": "e" * 501}, "MLFLOW_EXPERIMENT_NAME must have at most 500 characters"),
        ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "11"}, "MLFLOW_HTTP_REQUEST_MAX_RETRIES must be less than or equal to 10"),
        ({"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "-1"}, "BACKOFF_FACTOR must be greater than or equal to 0"),
        ({"MLFLOW_HTTP_REQUEST_TIMEOUT": "2.5"}, "MLFLOW_HTTP_REQUEST_TIMEOUT must be a whole number, got '2.5'"),
        ({"MLFLOW_HTTP_REQUEST_TIMEOUT": "9" * 5000}, "MLFLOW_HTTP_REQUEST_TIMEOUT must be a whole number"),
        ({"MNIST_FETCH_TIMEOUT": "0"}, "MNIST_FETCH_TIMEOUT must be greater than or equal to 0.001, got '0'"),
        ({"MNIST_FETCH_TIMEOUT": "1e999"}, "MNIST_FETCH_TIMEOUT must be a finite number"),
        ({"MNIST_FETCH_TIMEOUT": "soon"}, "MNIST_FETCH_TIMEOUT must be a number, got 'soon'"),
        (
            {"MNIST_MIRROR": with_credentials("ftp://mirror/", "u", PASSWORD)},
            f"MNIST_MIRROR '{with_credentials('ftp://mirror/', 'u', MASK)}' has the scheme ftp://",
        ),
        ({"MNIST_MIRROR": "http://[::1"}, "MNIST_MIRROR 'http://[::1' is not a valid URL"),
        (
            {"MLFLOW_TRACKING_URI": "gopher://x", "MNIST_REGISTERED_MODEL": "a:b", "MLFLOW_HTTP_REQUEST_TIMEOUT": "0"},
            "the environment has 3 problems: MLFLOW_TRACKING_URI",
        ),
    ],
)
def test_bad_settings_are_named_without_their_secrets(environ, expected):
    loader = fetch_settings if {"MNIST_MIRROR", "MNIST_FETCH_TIMEOUT"} & set(environ) else tracking_settings
    with pytest.raises(PipelineError) as caught:
        loader(environ)
    assert expected in str(caught.value) and PASSWORD not in str(caught.value)


YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.dates(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["preprocess", "train"]), key=st.text(max_size=15) | st.none(), value=YAMLISH)
def test_any_value_anywhere_is_valid_or_one_params_error(section, key, value):
    raw, known = edited(), list(edited()[section])
    # The whole section takes the value, or one of its keys (a known one most of the time).
    name = key if key is None or len(key) % 3 == 0 else known[len(key) % len(known)]
    target, name = (raw, section) if key is None else (raw[section], name)
    target[name] = value
    try:
        validate(raw)
    except PipelineError as error:
        assert "\n" not in str(error)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!,'\"?|>#%@ 0123456789.eE\n\t")), max_size=80))
def test_any_text_parses_or_is_a_params_error(text):
    try:
        params.parse_yaml(text, "params.yaml")
    except PipelineError as error:
        assert str(error).startswith("params.yaml is not valid YAML")
