"""The model registry: every trained model is a version of one registered model; aliases say which is in use.

Train adds its model as a new version of the registered model that ``$MNIST_REGISTERED_MODEL``
names (``mnist-softmax`` by default), tagged with what produced it (its run, commit, data, DVC
experiment, and the SHA-256 of the ``.keras`` file DVC tracks) and described by its test accuracy. The metric gate
(``mnist-check --promote``) then moves the alias ``champion`` to a version whose metrics pass, and
``previous`` to the version that held it, so the last champion stays one alias away. Users load or
serve ``models:/<name>@champion``. MLflow's aliases replace its deprecated stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
PREVIOUS = "previous"
# The version's link to the file DVC tracks: the SHA-256 of models/model.keras (train saves it
# byte-deterministically, so the same model always has the same digest).
MODEL_SHA256_TAG = "pipeline.model_sha256"
RUN_ID_TAG = "run_id"
# The run's link to the version that holds its model (models:/<name>/<version>): the one it
# registered, or the existing one it matched (see same_version).
RUN_VERSION_TAG = "pipeline.model_version"


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def description(test_accuracy: float, test_examples: int, run_name: str) -> str:
    return f"Test accuracy {test_accuracy:.4f} on {test_examples:,} test images ({run_name})."


def version_tags(run_id: str, run_tags: Mapping[str, str], model_sha256: str) -> dict[str, str]:
    """A version's tags: its run's commit, data and DVC experiment tags, its run id and its file's digest."""
    kept = {key: value for key, value in run_tags.items() if key.startswith(("git.", "data.", "dvc."))}
    return {**kept, RUN_ID_TAG: run_id, MODEL_SHA256_TAG: model_sha256}


def register(client: MlflowClient, name: str, model_uri: str, tags: Mapping[str, str], text: str) -> ModelVersion:
    """Add the logged model at ``model_uri`` as a new version of ``name`` (created if new), tagged and described."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    return client.update_model_version(name, version.version, description=text)


def version_of_model(client: MlflowClient, name: str, model_sha256: str) -> ModelVersion | None:
    """The newest version of ``name`` whose model file has this SHA-256, or None."""
    versions = client.search_model_versions(f"name = '{name}' and tags.`{MODEL_SHA256_TAG}` = '{model_sha256}'")
    return max(versions, key=lambda version: int(version.version), default=None)


def same_version(
    client: MlflowClient, name: str, model_sha256: str, metrics: Mapping[str, float]
) -> ModelVersion | None:
    """The version that already holds this model file and these test metrics, or None.

    A retrain that reproduces a registered model byte for byte (DVC restored report from its
    cache, a comment-only change, ``dvc repro -f``) links its run to that version instead of adding
    an identical one. Only when the version's run recorded the same metrics, though: a version
    registered before train logged them (or scored on other test data) gets a new version that has
    them, because the gate cannot compare against one that lacks them.
    """
    version = version_of_model(client, name, model_sha256)
    if version is None or version.run_id is None:
        return None
    recorded = client.get_run(version.run_id).data.metrics
    return version if all(recorded.get(key) == value for key, value in metrics.items()) else None


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points to, or None when the model or the alias does not exist."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Make ``version`` the champion and the former champion ``previous``; return the former's version.

    ``previous`` is moved first: should the second call fail, both aliases name the old champion and
    nothing points at a model the gate did not pass.
    """
    # MLflow gives versions as numbers or strings depending on the store; they are compared as strings.
    former = version_by_alias(client, name, CHAMPION)
    if former is not None and str(former.version) == str(version):
        return None
    if former is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(former.version))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return None if former is None else str(former.version)
