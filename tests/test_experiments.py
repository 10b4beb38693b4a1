"""DVC experiments and MLflow runs: one tagged run per experiment, in the project's own store.

Every test drives the real ``dvc`` command on a throwaway copy of the project with tiny synthetic
data (tests/pipeline_project.py): ``dvc exp run`` in the workspace, ``dvc exp run -S``, and a queued
three-point learning-rate sweep run two at a time by ``dvc queue start -j 2``, which DVC executes in
temporary copies of the repository under ``.dvc/tmp/exps``. Their runs must all land in the
parent project's SQLite store, tagged with the DVC experiment name, the commit they started from
and the data hashes of the dvc.lock they used, without "database is locked" failures.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from pipeline_project import ROOT, Project, make_project

from pipeline.tracking.record import TEST_PROBABILITIES_TAG

pytestmark = pytest.mark.slow

EXPERIMENT = "mnist-softmax"
# The module's project starts from a learning rate that none of the experiments below uses, so each
# of them trains (DVC would otherwise restore a matching earlier run from its run cache).
BASELINE_LEARNING_RATE = 0.005
SWEEP = (0.001, 0.003, 0.01)
PARAM_KEYS = {
    "train.model",
    "train.seed",
    "train.learning_rate",
    "train.batch_size",
    "train.iterations",
    "train.eval_interval",
    "data.train_examples",
    "data.test_examples",
    "model",
    "model.script",
    "loss",
    "optimizer",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(
        tmp_path_factory.mktemp("experiments"), params={"train": {"learning_rate": BASELINE_LEARNING_RATE}}
    )
    yield project
    project.stop_queue()


def store_uri(project: Project) -> str:
    return f"sqlite:///{project.root / 'mlflow.db'}"


def runs(project: Project) -> list:
    """Every run of the project's MLflow experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri(project))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def run_name(learning_rate: float) -> str:
    return f"lr={learning_rate:g} bs=20 it=50 seed=0"


def check_run(
    project: Project, run, *, experiment: str, learning_rate: float, commit: str, lock_text: str, dirty: str
) -> None:
    """One run's identity: its tags, name, params, and step-indexed metrics."""
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_name(learning_rate)
    assert tags["dvc.experiment"] == experiment
    assert tags["git.commit"] == commit
    assert tags["git.dirty"] == dirty
    # The files train read are those of the dvc.lock it ran with (the tags come from the files themselves).
    data_tags = {key: value for key, value in tags.items() if key.startswith("data.")}
    assert data_tags == project.data_tags(lock_text) and len(data_tags) == 4
    assert set(run.data.params) == PARAM_KEYS
    assert float(run.data.params["train.learning_rate"]) == learning_rate
    assert {"final_test_accuracy", "history/train_accuracy", "history/test_accuracy", "macro_f1"} <= set(
        run.data.metrics
    )


def produced(project: Project, run) -> bool:
    """Whether ``run`` trained the model whose test probabilities are in the workspace."""
    digest = hashlib.sha256((project.root / "models/test_probabilities.npy").read_bytes()).hexdigest()
    return run.data.tags[TEST_PROBABILITIES_TAG] == digest


def metric_steps(project: Project, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [metric.step for metric in MlflowClient(store_uri(project)).get_metric_history(run_id, key)]


def test_exp_run_and_exp_run_with_set_param_each_log_one_tagged_run(project):
    head = project.git("rev-parse", "HEAD")

    project.dvc("exp", "run", timeout=600)
    (first_name,) = project.experiments()
    (first,) = runs(project)
    check_run(
        project,
        first,
        experiment=first_name,
        learning_rate=BASELINE_LEARNING_RATE,
        commit=head,
        lock_text=(project.root / "dvc.lock").read_text(),
        dirty="false",
    )
    assert produced(project, first)
    assert metric_steps(project, first.info.run_id, "history/train_accuracy") == list(range(1, 51))
    assert metric_steps(project, first.info.run_id, "history/test_accuracy") == [10, 20, 30, 40, 50]
    # The store and its artifacts are the project's own.
    assert first.info.artifact_uri.startswith((project.root / "mlartifacts").as_uri())

    project.dvc("exp", "run", "-S", "train.learning_rate=0.02", timeout=600)
    (second_name,) = set(project.experiments()) - {first_name}
    assert [run.info.run_id for run in runs(project)][0] == first.info.run_id
    (second,) = runs(project)[1:]
    # params.yaml differs from the commit by the -S change, so the tree counts as dirty.
    check_run(
        project,
        second,
        experiment=second_name,
        learning_rate=0.02,
        commit=head,
        lock_text=(project.root / "dvc.lock").read_text(),
        dirty="true",
    )
    assert second.info.experiment_id == first.info.experiment_id


def test_queued_sweep_two_at_a_time_logs_one_run_per_experiment_into_the_projects_store(project):
    head = project.git("rev-parse", "HEAD")
    before = {run.info.run_id for run in runs(project)}
    known = set(project.experiments())

    queued = project.dvc("exp", "run", "--queue", "-S", "train.learning_rate=" + ",".join(map(str, SWEEP)))
    assert queued.stdout.count("Queued experiment") == len(SWEEP), queued.stdout
    project.start_queue(jobs=2)
    status = project.wait_for_queue(timeout=600)

    sweep = {name: info for name, info in project.experiments().items() if name not in known}
    assert len(sweep) == len(SWEEP), status
    # A "database is locked" (or any) failure in a queued stage would fail its task.
    assert status.count("Success") >= len(SWEEP) and "Failed" not in status, status
    digests = project.output_sha256("models/test_probabilities.npy", *(info["rev"] for info in sweep.values()))

    new_runs = [run for run in runs(project) if run.info.run_id not in before]
    assert len(new_runs) == len(SWEEP)
    by_experiment = {run.data.tags.get("dvc.experiment"): run for run in new_runs}
    assert set(by_experiment) == set(sweep)
    for name, info in sweep.items():
        run = by_experiment[name]
        # The experiment's own outputs lead to this run (report finds it by their digest).
        assert run.data.tags[TEST_PROBABILITIES_TAG] == digests[info["rev"]]
        # DVC_ROOT pointed the queued copy at the parent project's store, not one of its own.
        assert run.info.artifact_uri.startswith((project.root / "mlartifacts").as_uri())
        check_run(
            project,
            run,
            experiment=name,
            learning_rate=info["params"]["train"]["learning_rate"],
            commit=head,
            lock_text=project.git("show", f"{info['rev']}:dvc.lock"),
            dirty="true",
        )
        assert run.data.metrics["final_test_accuracy"] == pytest.approx(
            info["metrics"]["metrics/train.json"]["final_test_accuracy"]
        )
        assert metric_steps(project, run.info.run_id, "history/test_accuracy") == [10, 20, 30, 40, 50]
    assert sorted(float(run.data.params["train.learning_rate"]) for run in new_runs) == list(SWEEP)
    assert len({run.info.experiment_id for run in runs(project)}) == 1

    # -j 2 really ran two trainings at once against the one SQLite file.
    spans = sorted((run.info.start_time, run.info.end_time) for run in new_runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_experiment_matching_an_earlier_run_reuses_it_instead_of_logging_a_duplicate(project):
    """DVC restores an experiment whose inputs it has already run from its run cache: no new run."""
    earlier = [run for run in runs(project) if float(run.data.params["train.learning_rate"]) == BASELINE_LEARNING_RATE]
    if not earlier:
        pytest.skip("needs the baseline run of test_exp_run_and_exp_run_with_set_param_each_log_one_tagged_run")
    count = len(runs(project))

    result = project.dvc("exp", "run", "-S", f"train.learning_rate={BASELINE_LEARNING_RATE}", timeout=600)

    assert "Running stage 'train'" not in result.stdout, result.stdout
    assert len(runs(project)) == count
    (run,) = earlier
    # The restored outputs lead to the run that produced them, which keeps its single report.
    assert produced(project, run)
    assert len(MlflowClient(store_uri(project)).get_metric_history(run.info.run_id, "macro_f1")) == 1


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Two queued experiments reaching train together must not both create the store's tables."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    go = tmp_path / "go"
    script = (
        "import pathlib, sys, time\n"
        "import mlflow\n"
        "from pipeline.params import tracking_settings\n"
        "from pipeline.tracking import record, store\n"
        "print('ready', flush=True)\n"
        "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.005)\n"
        "uri, location = store.resolve(tracking_settings())\n"
        "with record.training_run(uri, location, 'mnist-softmax', 'concurrent', {}) as run:\n"
        "    run.log_history({'train_accuracy': (range(1, 1001), [0.5] * 1000)}, time.time(), time.time())\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(ROOT)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        # Everyone imports MLflow first; then they all open the new store in the same instant.
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.communicate(timeout=60)[1]
        go.touch()
        errors = []
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            if process.returncode != 0:
                errors.append(stderr[-2000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not errors, "\n\n".join(errors)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-softmax")
    finished = client.search_runs([experiment.experiment_id])
    assert len(finished) == 2 and {run.info.status for run in finished} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "train_accuracy")) == 1000 for run in finished)
