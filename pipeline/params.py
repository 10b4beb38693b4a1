"""params.yaml (what changes results), the gate's rules (check.yaml) and the settings from the environment (credentials
stay out of git: docs/tracking.md), checked into pydantic objects before any heavy import, every problem at once."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from pipeline import files
from pipeline.cli import PipelineError, redact
from pipeline.data import TRAINING_IMAGES

YAML_LIMIT, YAML_DEPTH, YAML_INT_CHARS = 2**20, 50, 40
# The models train.model can name, in the order of the author's scripts (pipeline.model builds each), and the TensorFlow
# threads each trains with, which a sweep's trial asks Ray for as cores. `benchmarks.run --only series`: the softmax's
# step is too small to split (one thread leaves a core to MLflow); the others ran 1.4-1.6x faster on two cores.
MODEL_THREADS = {
    "softmax": 1,
    "five_layers_sigmoid": 2,
    "five_layers_relu": 2,
    "five_layers_relu_lrdecay": 2,
    "five_layers_relu_lrdecay_dropout": 2,
    "conv": 2,
    "conv_bigger_dropout": 2,
    "conv_batchnorm": 2,
}
MODEL_NAMES = tuple(MODEL_THREADS)
RULES_FILE = "check.yaml"  # The metric gate's rules: they change no result, so they are no params of DVC's.
TRACKING_URI_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
# Pydantic's messages (by the first word of their type) in the project's words, beyond "should be" → "must be".
MESSAGES = {
    "missing": "is missing",
    "int": "must be a whole number",
    "float": "must be a number",
    "dataclass": "must be a mapping",
    "dict": "must be a mapping",
    "tuple": "must be a list [low, high] of two numbers or nulls",
}
FLOAT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")  # YAML 1.1 reads 3e-3 (no dot) as a string.


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing aliases (billion laughs), deep nesting, duplicate keys and huge integers."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if (alias := self.check_event(yaml.AliasEvent)) or self.depth >= YAML_DEPTH:
            problem = "aliases (*name) are not accepted; write each value out" if alias else "values nest too deep"
            raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
        self.depth += 1  # An error ends the load, so only a node composed in full needs the count back.
        node: Any = super().compose_node(parent, index)
        self.depth -= 1
        if node.tag == "tag:yaml.org,2002:int" and len(node.value) > YAML_INT_CHARS:
            problem = f"an integer of {len(node.value)} characters is out of any sane range"
            raise yaml.composer.ComposerError(None, None, problem, node.start_mark)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        mapping, seen = super().construct_mapping(node, deep), set()
        for key_node, _ in node.value:
            if (key := self.construct_object(key_node)) in seen:
                problem = f"the key {key!r:.80} appears twice"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.add(key)
        return mapping


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as problem:
        mark = problem.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise PipelineError(f"{source} is not valid YAML{where}: {problem.problem or problem.context}.") from None
    except (yaml.YAMLError, ValueError) as problem:  # ValueError: a date such as 2024-13-45.
        raise PipelineError(f"{source} is not valid YAML: {problem}.") from None


def read_params(path: Path) -> Any:
    try:
        return parse_yaml(files.read_bytes(path, YAML_LIMIT).decode("utf-8"), str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run from the project root, where params.yaml lives.") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise PipelineError(f"cannot read {path}: {getattr(problem, 'strerror', None) or problem}.") from None


def _known_model(model: str) -> str:
    if model not in MODEL_NAMES:
        hint = "".join(f"did you mean {close}? " for close in difflib.get_close_matches(model, MODEL_NAMES, n=1))
        raise ValueError(f"{model!r} is not a known model ({hint}known models: {', '.join(MODEL_NAMES)})")
    return model


def _float32(rate: float) -> float:
    if rate > 3.4028234663852886e38:
        raise ValueError(f"must be at most 3.403e+38, as training runs in float32, got {rate:g}")
    return rate


def _ordered(pair: Any) -> Any:
    if pair and None not in pair and pair[0] > pair[1]:
        raise ValueError(f"must have low <= high, got [{pair[0]:g}, {pair[1]:g}]")
    return pair


# Strict: true/false and quoted numbers are mistakes; 1e4 (a float in YAML 1.2, which `dvc exp run -S` writes) is whole.
Number = Annotated[
    float,
    BeforeValidator(lambda v: float(v) if isinstance(v, str) and FLOAT.fullmatch(v) else v),
    Field(strict=True, allow_inf_nan=False),
]
Whole = Annotated[
    int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v), Field(strict=True)
]
FORBID: Any = {"extra": "forbid"}


@dataclass(frozen=True, config=FORBID)
class PreprocessParams:
    validation_size: Annotated[Whole, Field(ge=0, lt=TRAINING_IMAGES)]


@dataclass(frozen=True, config=FORBID)
class TrainParams:
    model: Annotated[str, Field(strict=True), AfterValidator(_known_model)]
    seed: Annotated[Whole, Field(ge=0, lt=2**32)]  # Keras and NumPy take 32-bit unsigned seeds.
    learning_rate: Annotated[Number, Field(gt=0), AfterValidator(_float32)]
    batch_size: Annotated[Whole, Field(ge=1, le=TRAINING_IMAGES)]
    iterations: Annotated[Whole, Field(ge=1, le=10_000_000)]  # Bounds a typo's cost, far inside int32.
    eval_interval: Annotated[Whole, Field(ge=1)]

    @field_validator("eval_interval")
    @classmethod
    def _evaluated(cls, interval: int, info: Any) -> int:
        # Report reads the last logged test metrics: with none logged it would have nothing to read.
        if interval > (iterations := info.data.get("iterations", interval)):
            raise ValueError(f"must be at most train.iterations ({iterations}), got {interval}")
        return interval


@dataclass(frozen=True, config=FORBID)
class CheckRule:
    better: Literal["higher", "lower"]
    max_worsening: Annotated[Number, Field(ge=0)]
    floor: Number | None = None
    ceiling: Number | None = None
    # What the metric can be at all, None for no limit: a value outside is a broken metrics file (bad input).
    range: Annotated[tuple[Number | None, Number | None] | None, AfterValidator(_ordered)] = None


@dataclass(frozen=True, config=FORBID)
class Params:
    preprocess: PreprocessParams
    train: TrainParams


def _mirror(mirror: str) -> str:
    try:
        scheme = urlparse(mirror).scheme
    except ValueError as error:
        raise ValueError(f"{mirror!r} is not a valid URL ({error})") from None
    if len(scheme) > 1 and scheme not in ("http", "https", "file"):  # One letter is a drive: C:\data.
        raise ValueError(
            f"{mirror!r} has the scheme {scheme}://; use an http://, https:// or file:// URL or a directory"
        )
    return mirror


def _tracking_uri(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+")[0]
    if uri and scheme not in TRACKING_URI_SCHEMES:
        known = ", ".join(TRACKING_URI_SCHEMES)
        raise ValueError(f"has unknown scheme {scheme or '(none)'!r} in {uri!r}; use one of {known}")
    return uri


def _registered_model(name: str) -> str:
    if name and not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,255}", name, re.ASCII):
        raise ValueError(
            f"{name!r} must be 1 to 256 letters, digits, '_', '-' or '.', starting with a letter or digit (the names "
            "every MLflow store keeps and models:/<name>@<alias> URIs can hold)"
        )
    return name


@dataclass(frozen=True)
class FetchSettings:
    mirror: Annotated[str, AfterValidator(_mirror)] = Field("", alias="MNIST_MIRROR")
    timeout_seconds: float = Field(30.0, alias="MNIST_FETCH_TIMEOUT", ge=0.001, le=3600, allow_inf_nan=False)


@dataclass(frozen=True)
class TrackingSettings:
    # Where runs are recorded (empty: the project's SQLite store) and how the store is reached.
    uri: Annotated[str, AfterValidator(_tracking_uri)] = Field("", alias="MLFLOW_TRACKING_URI")
    experiment: str = Field("mnist-softmax", alias="MLFLOW_EXPERIMENT_NAME", max_length=500)  # MLflow's limit
    registered_model: Annotated[str, AfterValidator(_registered_model)] = Field("", alias="MNIST_REGISTERED_MODEL")
    # Five retries with backoff factor 1 wait 0, 2, 4, 8 and 16 s (urllib3); MLflow's own limits.
    max_retries: int = Field(5, alias="MLFLOW_HTTP_REQUEST_MAX_RETRIES", ge=0, le=10)
    backoff_factor: int = Field(1, alias="MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", ge=0, le=120)
    request_timeout: int = Field(10, alias="MLFLOW_HTTP_REQUEST_TIMEOUT", ge=1, le=600)

    def registered_name(self, model: str) -> str:
        """Where ``model``'s versions are registered: $MNIST_REGISTERED_MODEL, else mnist-<model> (mnist-softmax)."""
        return self.registered_model or f"mnist-{model}"

    @property
    def retry_seconds(self) -> int:
        return self.backoff_factor * max(0, 2**self.max_retries - 2)

    def http_environment(self) -> dict[str, str]:
        fields = self.__pydantic_fields__.items()  # type: ignore[attr-defined]
        return {field.alias: str(getattr(self, name)) for name, field in fields if "_HTTP_" in field.alias}


def _shown(value: Any) -> str:
    return text if len(text := redact(repr(value))) <= 60 else f"{text[:50]}...{text[-7:]}"


def _problem(error: Any) -> str:
    parts = error["loc"][:-1] if error["loc"][-2:-1] == ("range",) else error["loc"]  # Not the index in a range.
    loc = [str(part) if str(part).isprintable() else repr(part) for part in parts]
    key, kind = ".".join(loc) or "it", error["type"]
    if kind == "unexpected_keyword_argument":
        # Below a params.yaml section, or a rule of check.yaml (metric.key).
        schema = {"preprocess": PreprocessParams, "train": TrainParams}.get(loc[0], CheckRule)
        known = list((schema if loc[1:] else Params).__pydantic_fields__)  # type: ignore[attr-defined]
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {key[: -len(loc[-1])]}{close[0]}?" if close else f"valid keys: {', '.join(known)}"
        return f"{key} is not a known key ({hint})"
    if kind == "value_error":
        return f"{key} {error['ctx']['error']}"
    text = MESSAGES.get(kind.split("_")[0]) or re.sub(r"^\w+ should", "must", error["msg"])
    return f"{key} {text}" if kind == "missing" else f"{key} {text}, got {_shown(error['input'])}"


def _validated(kind: Any, values: Any, source: str, problems: Sequence[str] = ()) -> Any:
    try:
        result = TypeAdapter(kind).validate_python(values)
    except ValidationError as invalid:
        problems = [*problems, *(redact(_problem(error)) for error in invalid.errors())]
    if problems:
        raise PipelineError(f"{source} has {len(problems)} problem{'s' * (len(problems) > 1)}: {'; '.join(problems)}.")
    return result


def credential_keys(raw: Any, prefix: str = "") -> list[str]:
    """The keys (``section.key``) of parsed YAML whose values hold credentials."""
    if isinstance(raw, dict):
        return [key for name, value in raw.items() for key in credential_keys(value, f"{prefix}{name}.")]
    if isinstance(raw, list):
        return [key for value in raw for key in credential_keys(value, prefix)]
    return [prefix.rstrip(".")] if isinstance(raw, str) and redact(raw) != raw else []


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Parsed YAML as :class:`Params`, or one PipelineError naming every problem."""
    keys = credential_keys(raw)
    secret = (
        f"{', '.join(keys)} hold{'s' * (len(keys) == 1)} credentials, which must not be in a committed file (DVC "
        "also copies it into dvc.lock and its run cache): set them in the environment instead (MLFLOW_TRACKING_URI, "
        "or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
    )
    return _validated(Params, raw, source, [secret] if keys else [])


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate params.yaml (or ``$PIPELINE_PARAMS``, or ``path``)."""
    path = Path(path or os.environ.get("PIPELINE_PARAMS") or "params.yaml")
    return validate(read_params(path), str(path))


def load_rules(path: Path | str | None = None) -> dict[str, CheckRule]:
    """Read and validate the gate's rules, a rule per metric (check.yaml, or ``path``)."""
    path = Path(path or RULES_FILE)
    return _validated(dict[str, CheckRule], read_params(path) or {}, str(path))


def _settings(kind: type, environ: Mapping[str, str]) -> Any:
    """``kind`` from the variables its fields name (unset or blank: the default)."""
    values = {name: value.strip() for name, value in environ.items() if value.strip()}
    return _validated(kind, values, "the environment")


def fetch_settings(environ: Mapping[str, str] = os.environ) -> FetchSettings:
    return _settings(FetchSettings, environ)


def tracking_settings(environ: Mapping[str, str] = os.environ) -> TrackingSettings:
    return _settings(TrackingSettings, environ)
