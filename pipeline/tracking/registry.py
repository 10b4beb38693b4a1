"""The model registry: train registers each model as a version tagged with its run, data and file's SHA-256;
the gate (``mnist-check --champion --promote``) reads the ``champion``'s recorded metrics and moves
``champion`` to a version that passes, ``previous`` to the one it replaced."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import PipelineError, redact
from pipeline.params import load_params, tracking_settings
from pipeline.tracking import store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION, PREVIOUS = "champion", "previous"
MODEL_SHA256_TAG = "pipeline.model_sha256"  # Links a version to the file DVC tracks (saved byte-deterministically).
RUN_ID_TAG = "run_id"
RUN_VERSION_TAG = "pipeline.model_version"  # On a run: the version holding its model, registered or matched.


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def description(test_accuracy: float, test_examples: int, run_name: str) -> str:
    return f"Test accuracy {test_accuracy:.4f} on {test_examples:,} test images ({run_name})."


def version_tags(run_id: str, run_tags: Mapping[str, str], model_sha256: str) -> dict[str, str]:
    kept = {key: value for key, value in run_tags.items() if key.startswith(("git.", "data.", "dvc."))}
    return {**kept, RUN_ID_TAG: run_id, MODEL_SHA256_TAG: model_sha256}


def registered_name(params: Path | None = None) -> str:
    """The registered model of the workspace's ``train.model`` (mnist-softmax for the seed's), unless set."""
    return tracking_settings().registered_name(load_params(params).train.model)


def register(client: MlflowClient, name: str, model_uri: str, tags: Mapping[str, str], text: str) -> ModelVersion:
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    return client.update_model_version(name, version.version, description=text)


def version_of_model(client: MlflowClient, name: str, model_sha256: str) -> ModelVersion | None:
    """The newest version of ``name`` whose model file has this SHA-256."""
    versions = client.search_model_versions(f"name = '{name}' and tags.`{MODEL_SHA256_TAG}` = '{model_sha256}'")
    return max(versions, key=lambda version: int(version.version), default=None)


def same_version(
    client: MlflowClient, name: str, model_sha256: str, metrics: Mapping[str, float]
) -> ModelVersion | None:
    """The version of this model file whose run recorded these metrics, which a byte-identical retrain reuses."""
    version = version_of_model(client, name, model_sha256)
    if version is None or version.run_id is None:
        return None
    recorded = client.get_run(version.run_id).data.metrics
    return version if all(recorded.get(key) == value for key, value in metrics.items()) else None


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@dataclass
class Registry:
    """The registered model in the store the pipeline logs to, as the gate uses it."""

    client: Any
    uri: str
    name: str

    @classmethod
    def open(cls) -> Registry:
        uri = store.tracking_uri(tracking_settings().uri, store.store_root())
        store.check_reachable(uri)
        store.require_existing(uri)
        import mlflow

        return cls(mlflow.MlflowClient(uri), uri, registered_name())

    @contextlib.contextmanager
    def access(self) -> Iterator[None]:
        import mlflow

        try:
            yield
        except mlflow.exceptions.MlflowException as error:
            message = f"the MLflow registry at {redact(self.uri)} failed: {store.short(error.message)}"
            raise PipelineError(message) from None

    def recorded(self, version: ModelVersion, label: str, rules: Mapping) -> tuple[dict[str, float], Any]:
        """The metrics of a version's run, from the store: artifacts can go missing, these cannot."""
        run = self.client.get_run(version.run_id)
        if missing := [metric for metric in rules if metric not in run.data.metrics]:
            raise PipelineError(
                f"{label}, run {str(version.run_id)[:7]}, recorded no {', '.join(missing)}, which the check rules "
                "need, so it can be neither the baseline nor the champion (a version registered by an older pipeline "
                "whose report stage DVC restored from its cache). Retrain with this pipeline (dvc repro -f train) and "
                "promote that version against the committed metrics: mnist-check --promote."
            )
        return run.data.metrics, run

    def champion(self, rules: Mapping) -> tuple[str, dict[str, Any] | None, str]:
        """The champion's label, recorded metrics and environment (``env.*`` tags as pairs), or why there are none."""
        with self.access():
            if (version := version_by_alias(self.client, self.name, CHAMPION)) is None:
                return alias_uri(self.name, CHAMPION), None, f"{self.name} has no champion yet in {redact(self.uri)}"
            metrics, run = self.recorded(version, f"the champion, version {version.version} of {self.name}", rules)
        environment = [[key[4:], value] for key, value in run.data.tags.items() if key.startswith("env.")]
        label = f"{alias_uri(self.name, CHAMPION)} (version {version.version}, run {str(version.run_id)[:7]})"
        return label, metrics | {"environment": environment}, ""

    def promote_file(self, path: Path, rules: Mapping, refused: bool) -> dict[str, Any]:
        """Make ``path``'s version the champion unless ``refused``; the former one ``previous`` (moved first)."""
        promotion = {"model": self.name, "version": None, "previous": None, "promoted": False, "reason": None}
        if refused:
            return promotion | {"reason": "the metrics broke their rules"}
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise PipelineError(f"{path} does not exist; run the pipeline first (dvc repro).") from None
        with self.access():
            if (version := version_of_model(self.client, self.name, digest)) is None:
                raise PipelineError(
                    f"{path.name} (SHA-256 {digest[:12]}…) is no version of {self.name} in {redact(self.uri)}: it "
                    "was trained against another tracking store. Rerun the train stage against it (dvc repro -f train)."
                )
            number = promotion["version"] = str(version.version)
            self.recorded(version, f"version {number} of {self.name} ({path.name})", rules)
            former = version_by_alias(self.client, self.name, CHAMPION)
            if former is not None and str(former.version) == number:
                return promotion | {"reason": f"version {number} already is the champion"}
            if former is not None:
                self.client.set_registered_model_alias(self.name, PREVIOUS, str(former.version))
            self.client.set_registered_model_alias(self.name, CHAMPION, number)
        return promotion | {"previous": former and str(former.version), "promoted": True}
