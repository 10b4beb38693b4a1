"""The champion gate against DVC's cache (issue 20), in a copy of the reproduced tiny project: a first model
becomes the champion; a byte-identical retrain with report restored links to its version (no version
without metrics); a regression, also with the artifact folder gone; a champion without metrics, and the way
out the gate's message gives."""

from __future__ import annotations

import shutil

import pytest

from pipeline.tracking import registry

pytestmark = pytest.mark.slow

NAME = "mnist-softmax"
METRICS = ("test_accuracy", "test_cross_entropy", "macro_f1")
# The project's rules less the accuracy's floor: on random labels the accuracy is that of chance.
NO_FLOOR = {"test_accuracy": {"better": "higher", "max_worsening": 0.002, "range": [0, 1]}}
# On the random synthetic labels, ten times the learning rate overfits: the test cross-entropy
# rises from about 2.7 to about 30.
REGRESSION = {"learning_rate": 0.03}


def gate(project, *args: str) -> tuple[int, str]:
    result = project.python("-m", "pipeline.check", *args, check=False, timeout=300)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def client(project):
    import mlflow

    # Registering a version resolves its model through the global tracking URI, not the client's.
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def versions(project) -> list[str]:
    return sorted((str(v.version) for v in client(project).search_model_versions(f"name = '{NAME}'")), key=int)


def runs(project) -> list:
    found = client(project)
    experiment = found.get_experiment_by_name(NAME)
    return found.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def flow(reproduced_template, tmp_path_factory):
    project = reproduced_template.copy_to(tmp_path_factory.mktemp("champion"))
    project.set_params(check=NO_FLOOR)  # No stage reads the check section: the outputs stay up to date.
    steps: dict = {}
    project.commit("First model")
    steps["first"] = gate(project, "--champion", "--promote")

    # Train reruns to the same bytes; report is not rerun at all.
    retrain = project.dvc("repro", "-f", "-s", "train", timeout=900)
    steps["retrain"] = (retrain.stdout + retrain.stderr, versions(project), runs(project))
    steps["promote retrain"] = gate(project, "--champion", "--promote")

    project.set_params(train=REGRESSION)
    project.dvc("repro", timeout=900)
    steps["regression"] = gate(project, "--champion", "--promote")

    # A store restored without its artifact folder.
    moved = project.root.parent / "mlartifacts-elsewhere"
    shutil.move(project.root / "mlartifacts", moved)
    try:
        steps["artifacts moved"] = gate(project, "--champion", "--promote")
    finally:
        shutil.move(moved, project.root / "mlartifacts")

    # A champion registered by the old pipeline for the first model's file, whose run holds no
    # metrics (report was restored from DVC's cache).
    store = client(project)
    first = store.get_model_version(NAME, "1")
    bare = store.create_run(store.get_run(first.run_id).info.experiment_id, run_name="old pipeline")
    store.set_terminated(bare.info.run_id)
    old = store.create_model_version(NAME, first.source, run_id=bare.info.run_id, tags=first.tags)
    store.set_registered_model_alias(NAME, registry.CHAMPION, old.version)
    steps["old champion"] = (old.version, gate(project, "--champion"))
    # Back to the first model (DVC restores it from its run cache) and promoting it against git:
    # its newest version is the old pipeline's.
    project.git("checkout", "--", "params.yaml")
    project.dvc("repro", timeout=900)
    steps["promote old version"] = gate(project, "--promote")
    # What the message says to do: retrain, which registers a version with metrics, and promote it.
    project.dvc("repro", "-f", "train", timeout=900)
    steps["recovered"] = (versions(project), gate(project, "--promote"), gate(project, "--champion"))
    return project, steps


def test_an_identical_retrain_logs_the_metrics_and_links_its_run_to_the_existing_version(flow):
    project, steps = flow
    code, output = steps["first"]
    assert code == 0 and f"Promoted {NAME} version 1" in output, output

    log, found, (first, second) = steps["retrain"]
    assert "Running stage 'train'" in log and "Running stage 'report'" not in log
    # No duplicate version: the new run names the version that holds its model.
    assert found == ["1"] and "linked, not registered again" in log
    assert (
        first.data.tags[registry.RUN_VERSION_TAG] == second.data.tags[registry.RUN_VERSION_TAG] == f"models:/{NAME}/1"
    )
    # The new run holds the gate's metrics although report never ran for it.
    for metric in METRICS:
        assert second.data.metrics[metric] == first.data.metrics[metric], metric

    code, output = steps["promote retrain"]
    assert code == 0 and "version 1 already is the champion" in output, output


def test_a_regression_is_compared_with_the_champion_even_without_its_artifact_files(flow):
    _, steps = flow
    for step in ("regression", "artifacts moved"):
        code, output = steps[step]
        assert code == 1, output
        assert f"against models:/{NAME}@champion (version 1," in output and "no baseline" not in output
        assert "broke their rules (test_cross_entropy)" in output and "Not promoted" in output


def test_a_champion_or_candidate_without_metrics_is_bad_input_naming_the_version(flow):
    _, steps = flow
    version, (code, output) = steps["old champion"]
    assert code == 2 and "Traceback" not in output
    assert f"error: the champion, version {version} of {NAME}, run " in output
    assert "recorded no test_accuracy, test_cross_entropy, macro_f1, which the check rules need" in output
    assert "only floors" not in output and "mnist-check --promote" in output

    code, output = steps["promote old version"]
    assert code == 2 and f"error: version {version} of {NAME} (model.keras), run " in output, output
    assert "recorded no test_accuracy" in output

    found, (promoted, promotion), (checked, check) = steps["recovered"]
    new = str(int(version) + 1)
    assert found[-1] == new and promoted == 0 and f"Promoted {NAME} version {new}" in promotion, promotion
    assert checked == 0 and f"against models:/{NAME}@champion (version {new}," in check, check
