"""Reruns, DVC experiments and MLflow runs: one tagged run per experiment in the project's own store, for ``dvc
exp run -S`` and a queued sweep two at a time in ``.dvc/tmp/exps``; none for one restored from the run cache."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import stage_env
from mlflow.tracking import MlflowClient
from pipeline_project import Project
from test_pipeline import EVALUATIONS, ran_stages
from test_train import runs as client_and_runs

from pipeline.tracking.record import TEST_PROBABILITIES_TAG

pytestmark = pytest.mark.slow


def runs(project: Project) -> list:
    return client_and_runs(project.root)[1]


def produced(run, probabilities: Path) -> bool:
    """Whether ``run`` trained the model whose test probabilities are the file ``probabilities``."""
    return run.data.tags[TEST_PROBABILITIES_TAG] == hashlib.sha256(probabilities.read_bytes()).hexdigest()


def check_run(project: Project, run, baseline, *, experiment: str, learning_rate: float, lock_text: str) -> None:
    """A run of an experiment with an ``-S`` change: its tags, name, params and step-indexed metrics."""
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == f"lr={learning_rate:g} bs=20 it=50 seed=0"
    assert tags["dvc.experiment"] == experiment
    # The commit it started from; params.yaml differs from it by the -S change.
    assert tags["git.commit"] == project.git("rev-parse", "HEAD") and tags["git.dirty"] == "true"
    # The files train read are those of the dvc.lock it ran with (the tags come from the files themselves).
    data_tags = {key: value for key, value in tags.items() if key.startswith("data.")}
    assert data_tags == project.data_tags(lock_text) and len(data_tags) == 4
    # Same experiment, same parameter keys as the baseline's run, so MLflow compares them side by side.
    assert run.info.experiment_id == baseline.info.experiment_id and set(run.data.params) == set(baseline.data.params)
    assert float(run.data.params["train.learning_rate"]) == learning_rate
    assert {"test_accuracy", "macro_f1"} <= set(run.data.metrics)
    client = client_and_runs(project.root)[0]
    for key, expected in (("history/train_accuracy", list(range(1, 51))), ("history/test_accuracy", EVALUATIONS)):
        assert [metric.step for metric in client.get_metric_history(run.info.run_id, key)] == expected, key
    # The store and its artifacts are the project's own, also for a queued copy (DVC_ROOT).
    assert run.info.artifact_uri.startswith((project.root / "mlartifacts").as_uri())


def test_a_setting_reruns_nothing_and_each_experiment_logs_one_tagged_run_but_a_restored_one_none(reproduced_project):
    project = reproduced_project
    # Where data comes from and where runs go are settings, not parameters: changing them reruns nothing.
    settings = {"MNIST_MIRROR": str(project.root / "no-such-mirror"), "MNIST_FETCH_TIMEOUT": "5"}
    settings |= {"MLFLOW_EXPERIMENT_NAME": "another-experiment", "MNIST_REGISTERED_MODEL": "another-model"}
    settings |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert "Data and pipelines are up to date." in project.dvc("status", env=settings).stdout
    assert ran_stages(project.dvc("repro", env=settings).stdout) == []
    client, (baseline,) = client_and_runs(project.root)
    assert client.get_experiment_by_name("another-experiment") is None

    # A parameter reruns train and report, as an experiment.
    result = project.dvc("exp", "run", "-S", "train.learning_rate=0.02", timeout=600)
    assert ran_stages(result.stdout) == ["train", "report"]
    (name,) = project.experiments()
    (run,) = runs(project)[1:]
    lock = (project.root / "dvc.lock").read_text()
    check_run(project, run, baseline, experiment=name, learning_rate=0.02, lock_text=lock)
    assert produced(run, project.root / "models/test_probabilities.npy")

    # The baseline's params again: DVC restores its outputs from the run cache instead of training.
    result = project.dvc("exp", "run", "-S", "train.learning_rate=0.003", timeout=600)
    assert "Running stage 'train'" not in result.stdout, result.stdout
    assert len(runs(project)) == 2
    # The restored outputs lead to the run that produced them, which keeps its single report.
    assert produced(baseline, project.root / "models/test_probabilities.npy")
    assert len(client.get_metric_history(baseline.info.run_id, "macro_f1")) == 1

    # A sweep queued on a new baseline (the restored workspace committed), two at a time. None of its
    # rates is one DVC has in its run cache (0.003, 0.02), which it would restore instead of training.
    project.commit("Reproduced")
    sweep = (0.001, 0.01, 0.03)
    queued = project.dvc("exp", "run", "--queue", "-S", "train.learning_rate=" + ",".join(map(str, sweep)))
    assert queued.stdout.count("Queued experiment") == len(sweep), queued.stdout
    status = project.run_queue(jobs=2)
    # A "database is locked" (or any) failure in a queued stage would fail its task.
    assert status.count("Success") == len(sweep) and "Failed" not in status, status
    experiments = project.experiments()
    by_experiment = {run.data.tags.get("dvc.experiment"): run for run in runs(project)[2:]}
    assert set(by_experiment) == set(experiments)
    for name, info in experiments.items():
        run, lock = by_experiment[name], project.git("show", f"{info['rev']}:dvc.lock")
        rate = info["params"]["train"]["learning_rate"]
        check_run(project, run, baseline, experiment=name, learning_rate=rate, lock_text=lock)
        # The experiment's own outputs lead to this run (report finds it by their digest).
        outs = {out["path"]: out["md5"] for out in yaml.safe_load(lock)["stages"]["train"]["outs"]}
        md5 = outs["models/test_probabilities.npy"]
        assert produced(run, project.root / ".dvc/cache/files/md5" / md5[:2] / md5[2:])
        recorded = info["metrics"]
        assert run.data.metrics["test_accuracy"] == pytest.approx(recorded["metrics/metrics.json"]["test_accuracy"])
        # Every metric DVC's tables show is a number (train.json's environment is a list, which they leave out).
        shown = [value for values in recorded.values() for value in values.values() if not isinstance(value, list)]
        assert all(type(value) in (int, float) for value in shown), recorded
    assert sorted(float(run.data.params["train.learning_rate"]) for run in by_experiment.values()) == list(sweep)
    # `dvc exp show` reads at a glance (issue #24): besides DVC's own columns, which name and place each row, the
    # results' numbers, the params and one column per dependency, the code's one.
    header = project.dvc("exp", "show", "--csv").stdout.splitlines()[0].split(",")
    own = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
    columns = [name for name in header if name not in own]
    assert len(columns) <= 24 and "pipeline" in columns, columns
    assert not [name for name in columns if name.startswith(("environment", "per_class_recall", "pipeline/"))], columns


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Two trainings that open a new store in the same instant (as queued experiments may) both log into it."""
    # Whether DVC's queue overlaps two tiny trainings is up to the machine's load; here they always do.
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
    env, command = stage_env(), [sys.executable, "-c", script, str(go)]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        # Everyone imports MLflow first; then they all open the new store in the same instant.
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.communicate(timeout=60)[1]
        go.touch()
        outcomes = [(process.communicate(timeout=120)[1], process.returncode) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = [stderr[-2000:] for stderr, returncode in outcomes if returncode]
    assert not errors, "\n\n".join(errors)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finished = client.search_runs([client.get_experiment_by_name("mnist-softmax").experiment_id])
    assert len(finished) == 2 and {run.info.status for run in finished} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "history/train_accuracy")) == 1000 for run in finished)
