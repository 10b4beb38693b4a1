"""Load and validate ``params.yaml`` once, up front, into typed objects.

Every stage calls :func:`load_params` before any heavy import or work. It checks the whole file and
reports every problem at once (unknown keys with the closest valid name, wrong types, values out of
range), so a typo costs seconds, not a training run. A stage then reads only its own section.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from pipeline.cli import PipelineError
from pipeline.data import TRAINING_IMAGES

SEED_LIMIT = 2**32
FLOAT32_MAX = 3.4028234663852886e38

PARAMS_FILE = Path("params.yaml")
# Characters that separate a models:/<name>@<alias> or models:/<name>/<version> URI into parts.
MODEL_NAME_SEPARATORS = ("/", "@", ":")
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


class ParamsError(PipelineError):
    """params.yaml is missing, malformed or holds invalid values."""


@dataclass(frozen=True)
class FetchParams:
    mirror: str
    timeout_seconds: float


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
class TrackingParams:
    experiment: str
    uri: str
    registered_model: str
    retry_seconds: float
    request_timeout_seconds: float


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
    fetch: FetchParams
    preprocess: PreprocessParams
    train: TrainParams
    tracking: TrackingParams
    check: dict[str, CheckRule]


SECTIONS = {
    "fetch": FetchParams,
    "preprocess": PreprocessParams,
    "train": TrainParams,
    "tracking": TrackingParams,
}
RULE_KEYS = [field.name for field in fields(CheckRule)]


class _Collector:
    """Gathers every problem so that they can be reported together."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def unknown_keys(self, mapping: dict, known: list[str], prefix: str) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys: {', '.join(known)})"
                self.add(f"{prefix}{key} is not a known key{hint}")


def _typed(value: Any, kind: type, name: str, collector: _Collector) -> Any:
    """Return ``value`` converted to ``kind``, or None after recording why it cannot be."""
    if kind is float:
        # YAML 1.1 reads 3e-3 (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
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
        return f"has unknown scheme {scheme or '(none)'!r} in {uri!r}; use one of {', '.join(TRACKING_URI_SCHEMES)}"
    return None


def registered_model_problem(name: str | None) -> str | None:
    """Return why ``name`` cannot name a registered model in a ``models:/<name>@<alias>`` URI, or None."""
    if name is None:
        return None
    if not name.strip():
        return "must name the MLflow registered model that every run adds a version to"
    if any(character in name for character in MODEL_NAME_SEPARATORS) or name != name.strip():
        separators = " ".join(MODEL_NAME_SEPARATORS)
        return f"{name!r} must not contain {separators} or surrounding spaces (they split a models:/ URI into parts)"
    return None


def _check_rules(raw: Any, collector: _Collector) -> dict[str, CheckRule]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        collector.add(f"section check must map metric names to rules, got {raw!r}")
        return {}
    rules = {}
    for metric, rule in raw.items():
        prefix = f"check.{metric}"
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


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Validate parsed YAML into :class:`Params`, raising one ParamsError that lists every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections (fetch, preprocess, train, tracking), got {raw!r}.")
    collector = _Collector()
    collector.unknown_keys(raw, [*SECTIONS, "check"], "")
    values = {name: _section(raw, name, cls, collector) for name, cls in SECTIONS.items()}

    fetch, preprocess, train, tracking = (values[name] for name in SECTIONS)
    if (timeout := fetch.get("timeout_seconds")) is not None and timeout <= 0:
        collector.add(f"fetch.timeout_seconds must be more than 0, got {timeout}")
    validation_size = preprocess.get("validation_size")
    if validation_size is not None and not 0 <= validation_size < TRAINING_IMAGES:
        collector.add(f"preprocess.validation_size must be in [0, {TRAINING_IMAGES}), got {validation_size}")
    if (learning_rate := train.get("learning_rate")) is not None and not 0 < learning_rate <= FLOAT32_MAX:
        # Training runs in float32: a larger rate becomes infinity there and every number NaN.
        collector.add(
            f"train.learning_rate must be more than 0 and at most {FLOAT32_MAX:.4g} (float32), got {learning_rate}"
        )
    if (batch_size := train.get("batch_size")) is not None:
        training_size = TRAINING_IMAGES - (validation_size or 0)
        if batch_size < 1:
            collector.add(f"train.batch_size must be at least 1, got {batch_size}")
        elif validation_size is not None and 0 <= validation_size < TRAINING_IMAGES and batch_size > training_size:
            collector.add(f"train.batch_size ({batch_size}) is larger than the training set ({training_size} images)")
    for key in ("iterations", "eval_interval"):
        if (value := train.get(key)) is not None and value < 1:
            collector.add(f"train.{key} must be at least 1, got {value}")
    if (model := train.get("model")) is not None and model not in MODEL_NAMES:
        close = difflib.get_close_matches(model, MODEL_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        collector.add(f"train.model {model!r} is not a known model ({hint}known models: {', '.join(MODEL_NAMES)})")
    if (seed := train.get("seed")) is not None and not 0 <= seed < SEED_LIMIT:
        # Keras and NumPy seed their generators with 32-bit unsigned integers.
        collector.add(f"train.seed must be in [0, 2**32), got {seed}")
    if tracking.get("experiment") == "":
        collector.add("tracking.experiment must name an MLflow experiment")
    if (problem := registered_model_problem(tracking.get("registered_model"))) is not None:
        collector.add(f"tracking.registered_model {problem}")
    if (problem := tracking_uri_problem(tracking.get("uri") or "")) is not None:
        collector.add(f"tracking.uri {problem}")
    for key, limit in (("retry_seconds", 3600), ("request_timeout_seconds", 600)):
        if (value := tracking.get(key)) is not None and not 0 < value <= limit:
            collector.add(f"tracking.{key} must be more than 0 and at most {limit}, got {value}")
    rules = _check_rules(raw.get("check"), collector)

    if collector.problems:
        count = len(collector.problems)
        listed = "; ".join(collector.problems)
        raise ParamsError(f"{source} has {count} problem{'s' if count > 1 else ''}: {listed}.")
    return Params(
        fetch=FetchParams(**fetch),
        preprocess=PreprocessParams(**preprocess),
        train=TrainParams(**train),
        tracking=TrackingParams(**tracking),
        check=rules,
    )


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate params.yaml (or ``$PIPELINE_PARAMS``, or ``path``)."""
    path = Path(path or os.environ.get("PIPELINE_PARAMS") or PARAMS_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} does not exist; run from the project root, where params.yaml lives.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return validate(raw, str(path))
