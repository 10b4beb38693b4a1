"""The champion gate against DVC's cache (issue 20), in a copy of the reproduced tiny project, from a first model
to a byte-identical retrain (linked to its version), a regression, and a champion without metrics and its way out."""

from __future__ import annotations

import json
import shutil

import yaml
from test_check import gate

from pipeline.tracking import registry

NAME = "mnist-softmax"
METRICS = ("test_accuracy", "test_cross_entropy", "macro_f1")
# The project's rules less the accuracy's floor: on random labels the accuracy is that of chance.
NO_FLOOR = {"test_accuracy": {"better": "higher", "max_worsening": 0.002, "range": [0, 1]}}
# On the random synthetic labels, ten times the learning rate overfits: the test cross-entropy
# rises from about 2.7 to about 30.
REGRESSION = {"learning_rate": 0.03}


def client(project):
    import mlflow

    # Registering a version resolves its model through the global tracking URI, not the client's.
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def versions(project) -> list[str]:
    return sorted((str(v.version) for v in client(project).search_model_versions(f"name = '{NAME}'")), key=int)


def test_the_champion_gate_from_a_first_model_to_a_champion_without_metrics(reproduced_project):
    project = reproduced_project
    rules = project.root / "check.yaml"  # No stage reads it: the outputs stay up to date.
    rules.write_text(json.dumps(yaml.safe_load(rules.read_text()) | NO_FLOOR))
    project.commit("First model")
    result = gate(project, "--champion", "--promote")
    assert result.returncode == 0 and f"Promoted {NAME} version 1" in result.text, result.text

    # Train reruns to the same bytes; report is not rerun at all.
    retrain = project.dvc("repro", "-f", "-s", "train", timeout=900)
    log = retrain.stdout + retrain.stderr
    assert "Running stage 'train'" in log and "Running stage 'report'" not in log
    # No duplicate version: the new run names the version that holds its model.
    assert versions(project) == ["1"] and "linked, not registered again" in log
    store = client(project)
    experiment = store.get_experiment_by_name(NAME).experiment_id
    first, second = store.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert {run.data.tags[registry.RUN_VERSION_TAG] for run in (first, second)} == {f"models:/{NAME}/1"}
    # The new run holds the gate's metrics although report never ran for it.
    assert [second.data.metrics[metric] for metric in METRICS] == [first.data.metrics[metric] for metric in METRICS]
    result = gate(project, "--champion", "--promote")
    assert result.returncode == 0 and "version 1 already is the champion" in result.text, result.text

    # A regression is compared with the champion, also from a store restored without its artifact folder; the
    # environment the champion's run recorded (env.* tags) is compared with the workspace's.
    first_version = store.get_model_version(NAME, "1")
    store.set_tag(first_version.run_id, "env.python", "2.7.18")
    project.set_params(train=REGRESSION)
    project.dvc("repro", timeout=900)
    regression = gate(project, "--champion", "--promote")
    moved = project.root.parent / "mlartifacts-elsewhere"
    shutil.move(project.root / "mlartifacts", moved)
    try:
        artifacts_moved = gate(project, "--champion", "--promote")
    finally:
        shutil.move(moved, project.root / "mlartifacts")
    for result in (regression, artifacts_moved):
        assert result.returncode == 1, result.text
        assert f"against models:/{NAME}@champion (version 1," in result.text and "no baseline" not in result.text
        assert "broke their rules (test_cross_entropy)" in result.text and "Not promoted" in result.text
        assert "Environment differs from the baseline's: python 2.7.18 → 3." in result.text

    # A champion registered by the old pipeline for the first model's file, whose run holds no
    # metrics (report was restored from DVC's cache).
    bare = store.create_run(store.get_run(first_version.run_id).info.experiment_id, run_name="old pipeline")
    store.set_terminated(bare.info.run_id)
    old = store.create_model_version(NAME, first_version.source, run_id=bare.info.run_id, tags=first_version.tags)
    store.set_registered_model_alias(NAME, registry.CHAMPION, old.version)
    result = gate(project, "--champion")
    assert result.returncode == 2 and "Traceback" not in result.text
    assert f"error: the champion, version {old.version} of {NAME}, run " in result.text
    assert "recorded no test_accuracy, test_cross_entropy, macro_f1, which the check rules need" in result.text
    assert "only floors" not in result.text and "mnist-check --promote" in result.text

    # Back to the first model (DVC restores it from its run cache) and promoting it against git:
    # its newest version is the old pipeline's.
    project.git("checkout", "--", "params.yaml")
    project.dvc("repro", timeout=900)
    result = gate(project, "--promote")
    assert result.returncode == 2 and "recorded no test_accuracy" in result.text, result.text
    assert f"error: version {old.version} of {NAME} (model.keras), run " in result.text

    # What the message says to do: retrain, which registers a version with metrics, and promote it.
    project.dvc("repro", "-f", "train", timeout=900)
    new = str(int(old.version) + 1)
    assert versions(project)[-1] == new
    result = gate(project, "--promote")
    assert result.returncode == 0 and f"Promoted {NAME} version {new}" in result.text, result.text
    result = gate(project, "--champion")
    assert result.returncode == 0 and f"against models:/{NAME}@champion (version {new}," in result.text, result.text
