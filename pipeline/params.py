"""Load and validate ``params.yaml`` and the operational settings once, up front, into typed objects.

Every stage calls :func:`load_params` before any heavy import or work. It checks the whole file and
reports every problem at once (unknown keys with the closest valid name, wrong types, values out of
range), so a typo costs seconds, not a training run. A stage then reads only its own section.

params.yaml holds only what changes results: DVC makes its sections stage parameters, so changing
one reruns the stages that read it. Where the data comes from and where runs are recorded change no
result, so they are environment variables, read and checked the same way by :func:`fetch_settings`
and :func:`tracking_settings` (the README's "Settings" lists them). That also keeps credentials out
of the committed file, dvc.lock and DVC's run cache.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from pipeline import files
from pipeline.cli import PipelineError, redact
from pipeline.data import TRAINING_IMAGES

SEED_LIMIT = 2**32
FLOAT32_MAX = 3.4028234663852886e38

PARAMS_FILE = Path("params.yaml")
# Bounds on what a hand-written YAML file needs: its size, its nesting and an integer's length. With
# aliases refused too, parsing is quick and small whatever the file holds.
YAML_LIMIT = 2**20
YAML_DEPTH = 50
YAML_INT_CHARS = 40
# The compiled training loop counts steps in int32; ten million steps (1,000 times the author's
# 10,000) stays far inside that and bounds what a typo can cost.
MAX_ITERATIONS = 10_000_000
# Registered model names that every store keeps (the SQL stores' column holds 256 characters), that
# need no quoting in models:/ URIs and search filters, and that make no path (MLflow's file store).
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,255}", re.ASCII)
# mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH (not imported: importing MLflow takes seconds).
MAX_EXPERIMENT_NAME = 500
# The models train.model can name: the seed's softmax, then the rest of the author's series in the
# order of his scripts (pipeline.model.SERIES builds each; this list needs no TensorFlow to validate).
MODEL_NAMES = (
    "softmax",
    "five_layers_sigmoid",
    "five_layers_relu",
    "five_layers_relu_lrdecay",
    "five_layers_relu_lrdecay_dropout",
    "conv",
    "conv_bigger_dropout",
    "conv_batchnorm",
)
TRACKING_URI_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
# The settings that are not parameters, with their defaults. MLflow reads its own variables itself
# (the project only sets its defaults for the HTTP ones); the MNIST_ ones are the project's.
DEFAULT_EXPERIMENT = DEFAULT_REGISTERED_MODEL = "mnist-softmax"
# Five retries with backoff factor 1 wait 0, 2, 4, 8 and 16 s (urllib3): about 30 s in all.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 5, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}  # fmt: skip
# Inclusive limits: MLflow's own for retries and backoff, and a sane one for the timeout.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": (0, 10), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": (0, 120),
               "MLFLOW_HTTP_REQUEST_TIMEOUT": (1, 600)}  # fmt: skip
DEFAULT_FETCH_TIMEOUT = 30.0
# Sections that earlier versions kept in params.yaml, and the variables that replace their keys.
MOVED_SECTIONS = {
    "fetch": "MNIST_MIRROR, MNIST_FETCH_TIMEOUT",
    "tracking": "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MNIST_REGISTERED_MODEL, MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_TIMEOUT",
}


class ParamsError(PipelineError):
    """params.yaml is missing, malformed or holds invalid values."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader for every YAML file a user hands the project, refusing what no settings file needs.

    Aliases (nested ones multiply into billions of values), duplicate keys (DVC refuses them, PyYAML
    silently keeps the last), deep nesting (Python's recursion limit) and integers of hundreds of
    digits (Python's digit limit, or numbers no float holds) are refused with the line they are on.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted; write each value out",
                                              self.peek_event().start_mark)  # fmt: skip
        if self.depth >= YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"values nest more than {YAML_DEPTH} deep",
                                              self.peek_event().start_mark)  # fmt: skip
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        mapping = super().construct_mapping(node, deep)
        seen: set = set()
        for key_node, _ in node.value:
            if (key := self.construct_object(key_node)) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r:.80} appears twice", key_node.start_mark
                )
            seen.add(key)
        return mapping

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value) > YAML_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters is out of any sane range", node.start_mark
            )
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def parse_yaml(text: str, source: str, error: type[PipelineError] = ParamsError) -> Any:
    """The YAML in ``text`` read by :class:`StrictLoader`; raises ``error`` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.MarkedYAMLError as problem:
        mark = problem.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise error(f"{source} is not valid YAML{where}: {problem.problem or problem.context}.") from None
    except (yaml.YAMLError, ValueError) as problem:
        # A timestamp such as 2024-13-45 reaches datetime, which raises ValueError.
        raise error(f"{source} is not valid YAML: {problem}.") from None


def read_params(path: Path) -> Any:
    """The parsed YAML of the params file at ``path``, unvalidated, read through the bounded reader."""
    try:
        text = files.read_bytes(path, YAML_LIMIT).decode("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} does not exist; run from the project root, where params.yaml lives.") from None
    except (OSError, UnicodeDecodeError) as problem:
        reason = problem.strerror if isinstance(problem, OSError) and problem.strerror else problem
        raise ParamsError(f"cannot read {path}: {reason}.") from None
    return parse_yaml(text, str(path))


@dataclass(frozen=True)
class PreprocessParams:
    validation_size: int


@dataclass(frozen=True)
class TrainParams:
    model: str
    seed: int
    learning_rate: float
    batch_size: int
    iterations: int
    eval_interval: int


@dataclass(frozen=True)
class FetchSettings:
    """$MNIST_MIRROR (empty: none) and $MNIST_FETCH_TIMEOUT, the per-request network timeout in seconds."""

    mirror: str
    timeout_seconds: float


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs are recorded ($MLFLOW_TRACKING_URI; empty: the project's SQLite store) and how it is reached."""

    uri: str
    experiment: str
    registered_model: str
    max_retries: int
    backoff_factor: int
    request_timeout: int

    @property
    def retry_seconds(self) -> int:
        """How long MLflow's retries of one request wait in all: urllib3 waits 0, 2, 4 … times the factor."""
        return self.backoff_factor * max(0, 2**self.max_retries - 2)

    def http_environment(self) -> dict[str, str]:
        """MLflow's variables for these HTTP settings, for a process that should use them."""
        values = (self.max_retries, self.backoff_factor, self.request_timeout)
        return {name: str(value) for name, value in zip(HTTP_DEFAULTS, values)}


@dataclass(frozen=True)
class CheckRule:
    better: str
    max_worsening: float
    floor: float | None = None
    ceiling: float | None = None
    # The values the metric can take at all, as (low, high) with None for no limit: a value outside
    # them is a broken metrics file, not a worse model, so the gate reports it as bad input.
    range: tuple[float | None, float | None] | None = None


@dataclass(frozen=True)
class Params:
    preprocess: PreprocessParams
    train: TrainParams
    check: dict[str, CheckRule]


SECTIONS = {"preprocess": PreprocessParams, "train": TrainParams}
RULE_KEYS = [field.name for field in fields(CheckRule)]


class _Collector:
    """Gathers every problem so that they can be reported together."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def raise_problems(self, source: str, error: type[PipelineError]) -> None:
        if self.problems:
            count = len(self.problems)
            raise error(f"{source} has {count} problem{'s' if count > 1 else ''}: {'; '.join(self.problems)}.")

    def unknown_keys(self, mapping: dict, known: list[str], prefix: str) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys: {', '.join(known)})"
                self.add(f"{prefix}{_shown(key)} is not a known key{hint}")


def _shown(key: Any) -> str:
    """A key as it reads in a one-line message: as written, or quoted when it holds a line break or the like."""
    return str(key) if str(key).isprintable() else repr(key)


def _typed(value: Any, kind: type, name: str, collector: _Collector) -> Any:
    """Return ``value`` converted to ``kind``, or None after recording why it cannot be."""
    if kind is float:
        # YAML 1.1 reads 3e-3 (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        # An integer beyond any float (hundreds of digits) is an OverflowError, not infinity.
        with contextlib.suppress(OverflowError):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        collector.add(f"{name} must be a number, got {value!r}")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        collector.add(f"{name} must be a whole number, got {value!r}")
    elif kind is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        collector.add(f"{name} must be a string, got {value!r}")
    return None


def _section(raw: dict, name: str, cls: type, collector: _Collector) -> dict[str, Any]:
    section = raw.get(name)
    if section is None:
        collector.add(f"section {name} is missing")
        return {}
    if not isinstance(section, dict):
        collector.add(f"section {name} must be a mapping of keys to values, got {section!r}")
        return {}
    known = [field.name for field in fields(cls)]
    collector.unknown_keys(section, known, f"{name}.")
    values = {}
    for field in fields(cls):
        if field.name not in section:
            collector.add(f"{name}.{field.name} is missing")
            continue
        kind = {"int": int, "float": float, "str": str}[str(field.type)]
        values[field.name] = _typed(section[field.name], kind, f"{name}.{field.name}", collector)
    return values


def tracking_uri_problem(uri: str) -> str | None:
    """Return why a tracking URI is unusable, or None if its scheme is one MLflow understands."""
    if not uri:
        return None
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in TRACKING_URI_SCHEMES:
        schemes = ", ".join(TRACKING_URI_SCHEMES)
        return f"has unknown scheme {scheme or '(none)'!r} in {redact(uri)!r}; use one of {schemes}"
    return None


def registered_model_problem(name: str) -> str | None:
    """Return why ``name`` cannot name a registered model in every store and ``models:/`` URI, or None."""
    if not MODEL_NAME.fullmatch(name):
        return (
            f"{name!r} must be 1 to 256 letters, digits, '_', '-' or '.', starting with a letter or digit "
            "(the names every MLflow store keeps and models:/<name>@<alias> URIs can hold)"
        )
    return None


def _check_rules(raw: Any, collector: _Collector) -> dict[str, CheckRule]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        collector.add(f"section check must map metric names to rules, got {raw!r}")
        return {}
    rules = {}
    for metric, rule in raw.items():
        prefix = f"check.{_shown(metric)}"
        if not isinstance(rule, dict):
            collector.add(f"{prefix} must be a mapping with keys {', '.join(RULE_KEYS)}")
            continue
        collector.unknown_keys(rule, RULE_KEYS, f"{prefix}.")
        better = rule.get("better")
        if better not in ("higher", "lower"):
            collector.add(f"{prefix}.better must be 'higher' or 'lower', got {better!r}")
        worsening = _typed(rule.get("max_worsening"), float, f"{prefix}.max_worsening", collector)
        if worsening is not None and worsening < 0:
            collector.add(f"{prefix}.max_worsening must be zero or more, got {worsening}")
        bounds: dict[str, Any] = {}
        for bound in ("floor", "ceiling"):
            if rule.get(bound) is not None:
                bounds[bound] = _typed(rule[bound], float, f"{prefix}.{bound}", collector)
        if rule.get("range") is not None:
            bounds["range"] = _range(rule["range"], f"{prefix}.range", collector)
        rules[str(metric)] = CheckRule(better=str(better), max_worsening=worsening, **bounds)
    return rules


def _range(value: Any, name: str, collector: _Collector) -> tuple[float | None, float | None] | None:
    """A rule's ``range: [low, high]`` as a pair, where null leaves that side open (a loss has no maximum)."""
    if not isinstance(value, list) or len(value) != 2:
        collector.add(f"{name} must be a list [low, high] of two numbers or nulls, got {value!r}")
        return None
    low, high = (None if end is None else _typed(end, float, name, collector) for end in value)
    if low is not None and high is not None and low > high:
        collector.add(f"{name} must have low <= high, got {value!r}")
    return low, high


def credential_keys(raw: Any, prefix: str = "") -> list[str]:
    """The keys (``section.key``) of parsed YAML whose values hold credentials: a URI's password or secret query."""
    if isinstance(raw, dict):
        return [key for name, value in raw.items() for key in credential_keys(value, f"{prefix}{name}.")]
    if isinstance(raw, list):
        return [key for value in raw for key in credential_keys(value, prefix)]
    return [prefix.rstrip(".")] if isinstance(raw, str) and redact(raw) != raw else []


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Validate parsed YAML into :class:`Params`, raising one ParamsError that lists every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections ({', '.join(SECTIONS)}, check), got {raw!r}.")
    collector = _Collector()
    if secrets := credential_keys(raw):
        # The file is committed, DVC copies its sections into dvc.lock and its run cache, and report
        # uploads dvc.lock to MLflow: a password there is published.
        collector.add(
            f"{', '.join(secrets)} hold{'s' if len(secrets) == 1 else ''} credentials, which must not be in a "
            "committed file (DVC also copies it into dvc.lock and its run cache): remove them and set them in "
            "the environment instead (MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
        )
    for section, variables in MOVED_SECTIONS.items():
        if section in raw:
            collector.add(
                f"section {section} is no longer read from params.yaml, because its settings change no result: "
                f"remove it and set the environment variables {variables} instead (README, 'Settings')"
            )
    collector.unknown_keys({key: value for key, value in raw.items() if key not in MOVED_SECTIONS},
                           [*SECTIONS, "check"], "")  # fmt: skip
    values = {name: _section(raw, name, cls, collector) for name, cls in SECTIONS.items()}

    preprocess, train = (values[name] for name in SECTIONS)
    validation_size = preprocess.get("validation_size")
    if validation_size is not None and not 0 <= validation_size < TRAINING_IMAGES:
        collector.add(f"preprocess.validation_size must be in [0, {TRAINING_IMAGES}), got {validation_size}")
    if (learning_rate := train.get("learning_rate")) is not None and not 0 < learning_rate <= FLOAT32_MAX:
        # Training runs in float32: a larger rate becomes infinity there and every number NaN.
        collector.add(
            f"train.learning_rate must be more than 0 and at most {FLOAT32_MAX:.4g} (float32), got {learning_rate}"
        )
    if (batch_size := train.get("batch_size")) is not None:
        held_out = validation_size if validation_size is not None and 0 <= validation_size < TRAINING_IMAGES else 0
        training_size = TRAINING_IMAGES - held_out
        if batch_size < 1:
            collector.add(f"train.batch_size must be at least 1, got {batch_size}")
        elif batch_size > training_size:
            collector.add(f"train.batch_size ({batch_size}) is larger than the training set ({training_size} images)")
    iterations, eval_interval = train.get("iterations"), train.get("eval_interval")
    if iterations is not None and not 1 <= iterations <= MAX_ITERATIONS:
        collector.add(f"train.iterations must be from 1 to {MAX_ITERATIONS:,}, got {iterations}")
    if eval_interval is not None and not 1 <= eval_interval <= (iterations or eval_interval):
        # Report evaluates the last logged test metrics: with none logged it would have nothing to read.
        collector.add(f"train.eval_interval must be from 1 to train.iterations ({iterations}), got {eval_interval}")
    if (model := train.get("model")) is not None and model not in MODEL_NAMES:
        close = difflib.get_close_matches(model, MODEL_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        collector.add(f"train.model {model!r} is not a known model ({hint}known models: {', '.join(MODEL_NAMES)})")
    if (seed := train.get("seed")) is not None and not 0 <= seed < SEED_LIMIT:
        # Keras and NumPy seed their generators with 32-bit unsigned integers.
        collector.add(f"train.seed must be in [0, 2**32), got {seed}")
    rules = _check_rules(raw.get("check"), collector)
    collector.raise_problems(source, ParamsError)
    return Params(preprocess=PreprocessParams(**preprocess), train=TrainParams(**train), check=rules)


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate params.yaml (or ``$PIPELINE_PARAMS``, or ``path``)."""
    path = Path(path or os.environ.get("PIPELINE_PARAMS") or PARAMS_FILE)
    return validate(read_params(path), str(path))


def _environment_number(environ: Mapping[str, str], name: str, default: float, low: float, high: float,
                        kind: type, collector: _Collector) -> Any:  # fmt: skip
    """The number in ``environ[name]`` (``default`` when unset or empty), checked to be a ``kind`` in [low, high]."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    with contextlib.suppress(ValueError):
        value = kind(text)
        if math.isfinite(value) and low <= value <= high:
            return value
    whole = "a whole number" if kind is int else "a number"
    collector.add(f"{name} must be {whole} from {low:g} to {high:g}, got {text!r}")
    return default


def fetch_settings(environ: Mapping[str, str] = os.environ) -> FetchSettings:
    """$MNIST_MIRROR and $MNIST_FETCH_TIMEOUT, checked; raises one PipelineError listing every problem."""
    collector = _Collector()
    timeout = _environment_number(environ, "MNIST_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT, 0.001, 3600, float, collector)
    mirror = environ.get("MNIST_MIRROR", "").strip()
    try:
        scheme = urlparse(mirror).scheme
    except ValueError as error:
        collector.add(f"MNIST_MIRROR {redact(mirror)!r} is not a valid URL ({error})")
    else:
        # One letter is a Windows drive (C:\data), which is a local directory.
        if len(scheme) > 1 and scheme not in ("http", "https", "file"):
            collector.add(
                f"MNIST_MIRROR {redact(mirror)!r} has the scheme {scheme}://; use an http://, https:// or file:// "
                "URL or a local directory"
            )
    collector.raise_problems("the environment", PipelineError)
    return FetchSettings(mirror=mirror, timeout_seconds=timeout)


def tracking_settings(environ: Mapping[str, str] = os.environ) -> TrackingSettings:
    """Where runs are recorded and how the store is reached, from the environment, checked all at once."""
    collector = _Collector()
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if (problem := tracking_uri_problem(uri)) is not None:
        collector.add(f"MLFLOW_TRACKING_URI {problem}")
    experiment = environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT
    if len(experiment) > MAX_EXPERIMENT_NAME:
        collector.add(f"MLFLOW_EXPERIMENT_NAME must be at most {MAX_EXPERIMENT_NAME} characters (MLflow's limit), "
                      f"got {len(experiment)}")  # fmt: skip
    registered_model = environ.get("MNIST_REGISTERED_MODEL", "").strip() or DEFAULT_REGISTERED_MODEL
    if (problem := registered_model_problem(registered_model)) is not None:
        collector.add(f"MNIST_REGISTERED_MODEL {problem}")
    http = [
        _environment_number(environ, name, HTTP_DEFAULTS[name], *HTTP_LIMITS[name], int, collector)
        for name in HTTP_DEFAULTS
    ]
    collector.raise_problems("the environment", PipelineError)
    return TrackingSettings(uri, experiment, registered_model, *http)
