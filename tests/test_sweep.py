"""mnist-sweep: the definition, the trial's pieces and the ranking; then real sweeps of a tiny project against a
real MLflow server, on this machine (Ctrl-C and resume, run cache, failing trials) and on a two-node Ray cluster
on 127.0.0.1 (an early-stopping one) whose worker is killed mid-trial."""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from conftest import with_credentials
from hypothesis import given, settings
from hypothesis import strategies as st
from idx_fixtures import write_digests, write_idx
from pipeline_project import ROOT, VENV_BIN, Project, base_env, free_port, make_project
from test_tracking_server import FakeServer, mlflow_server, postgres  # noqa: F401  (fixtures)

from pipeline import score, sweep
from pipeline.cli import MASK, PipelineError
from pipeline.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS

# Under `pytest -n 2` the Ray clusters of this module run on one worker, one at a time.
pytestmark = pytest.mark.xdist_group("ray")

PARAMS = {"train": {"learning_rate": 0.003, "batch_size": 100, "seed": 0}}
GRID = {"train.learning_rate": {"values": [0.001, 0.01]}, "train.batch_size": {"values": [10, 20]}}
PASSWORD = secrets.token_hex(8)  # in a tracking URI: never to be printed or kept
HOPELESS = [1e-9, 2e-9, 3e-9, 4e-9, 5e-9, 6e-9, 7e-9]  # learning rates at which the softmax learns nothing


def definition(**overrides) -> str:
    return yaml.safe_dump({"name": "s1", "search": "grid", "max_concurrent": 2, "parameters": GRID, **overrides})


def random(**parameters) -> dict:
    return {"search": "random", "parameters": parameters}


def test_a_definition_parses_and_may_rank_by_any_of_the_reports_scores():
    defined = sweep.parse_sweep(definition(), PARAMS)
    assert [defined.search, defined.metric, defined.mode, defined.retries] == ["grid", "test_accuracy", "max", 2]
    assert defined.total == 4 and defined.parameters["train.learning_rate"].bounds == [0.001, 0.01]
    labels = np.arange(10)
    scores = score.score(labels, np.eye(10)[labels])
    assert tuple(key for key, value in scores.items() if isinstance(value, float)) == score.SCORES
    metrics = [sweep.parse_sweep(definition(metric=metric), PARAMS).metric for metric in score.SCORES]
    assert metrics == list(score.SCORES)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sweep.parse_sweep((ROOT / "sweeps/example.yaml").read_text(), params).total == 6
    asha = sweep.parse_sweep(definition(scheduler={}), PARAMS).scheduler
    assert asha is not None and (asha.kind, asha.grace_period, asha.reduction_factor) == ("asha", 1000, 3)


def test_a_trials_params_become_set_param_arguments_and_its_failure_the_pipelines_own_error():
    config = {"train.learning_rate": np.float64(0.1) / 3, "train.batch_size": np.int64(20)}
    arguments = sweep.set_param_arguments(config)
    assert arguments == ["--set-param=train.batch_size=20", f"--set-param=train.learning_rate={0.1 / 3!r}"]
    assert yaml.safe_load(arguments[1].split("=", 2)[2]) == 0.1 / 3
    output = (
        "Running stage 'train':\n> python -m pipeline.train\nerror: params.yaml is invalid: train.learning_rate "
        "must be a positive\n  number, not -1.\nERROR: failed to reproduce 'train': exited with 1\n"
    )
    expected = "error: params.yaml is invalid: train.learning_rate must be a positive number, not -1."
    assert sweep.failure_message(output) == expected and sweep.failure_message("a\nb\nc\nd\n") == "b c d"


def test_the_ranking_puts_the_best_first_and_failed_trials_last():
    from ray.tune import Result

    def result(name, value, error="", **more):
        metrics = {"experiment": name, "node": "abcdef01", "test_accuracy": value, "error": error, "step": 300, **more}
        return Result(metrics={**metrics, "config": {"train.seed": len(name)}}, checkpoint=None, error=None, path="")

    results = [result("a", 0.5), result("b", math.nan, "error: bad"), result("c", 0.9), result("d", 0.7)]
    results.append(Result(metrics={}, checkpoint=None, error=RuntimeError("Traceback\nworker died"), path=""))
    # Stopped by the scheduler: Ray marks the last (intermediate) result done; ranked after every finished trial.
    results.append(result("e", 0.95, done=True, final=False))
    defined = sweep.parse_sweep(definition(parameters={"train.seed": {"values": [0, 1]}}), PARAMS)
    rows = sweep.ranking(results, defined)
    assert list(rows["experiment"]) == ["c", "d", "a", "e", "-", "b"] and list(rows["rank"]) == [1, 2, 3, 4, 5, 6]
    stopped = "stopped early by the scheduler at step 300"
    assert list(rows["status"]) == ["ok", "ok", "ok", stopped, "error: worker died", "failed: error: bad"]
    assert list(rows.columns) == ["rank", "train.seed", "test_accuracy", "experiment", "node", "status"]
    assert rows.iloc[0].tolist() == [1, 1, 0.9, "c", "abcdef01", "ok"]
    ranked_down = sweep.ranking(results, defined.model_copy(update={"mode": "min"}))
    assert list(ranked_down["experiment"]) == ["a", "d", "c", "e", "-", "b"]


# fmt: off
@pytest.mark.parametrize(("overrides", "phrases"), [
    # Every problem at once, a URI with a password included (never quoted).
    ({"name": "bad name", "search": "bayes", "max_concurrent": 0, "colour": "red",
      "metric": f"https://h/?token={PASSWORD}",
      "parameters": {"train.learning_rat": {"values": [1]}, "train.batch_size": {"loguniform": [0, 10]}}},
     ["colour: Extra inputs", "name: String should match", "search: Input should be 'grid'", "max_concurrent:",
      "metric must not hold credentials; keep them in the environment", "metric: Input should be 'test_accuracy'",
      "loguniform.0: Input should be greater than 0"]),
    ({"parameters": {"train.learning_rat": {"values": [1]}}}, ["train.learning_rat is not a key of params.yaml"]),
    ({"metric": "per_class_recall"}, ["metric: Input should be 'test_accuracy', 'test_cross_entropy'"]),
    ({"seed": -1, "retries": -1, "max_concurrent": 10**6, "name": "x y" * 5_000},
     ["seed: Input should be greater than or equal to 0", "retries: Input should be greater than or equal to 0",
      "max_concurrent: Input should be less than or equal to 1000", "name: String should have at most 100 characters"]),
    ({"seed": 2**32}, ["seed: Input should be less than 4294967296"]),
    ({"scheduler": {"kind": "hyperband", "grace_period": 0, "reduction_factor": 1, "max_t": 5}},
     ["scheduler.kind: Input should be 'asha'", "scheduler.grace_period: Input should be greater than or equal to 1",
      "scheduler.reduction_factor: Input should be greater than or equal to 2", "scheduler.max_t: Extra inputs"]),
    ({"scheduler": {}, "metric": "macro_f1"}, ["a scheduler needs a metric the train stage logs while it trains"]),
    ({"seed": True}, ["seed: Input should be a valid integer"]),
    (random(**{"train.learning_rate": {"loguniform": [0.1, 0.001]}}), ["loguniform needs low < high, got [0.1, 0.0"]),
    (random(**{"train.learning_rate": {"uniform": [0.1, 0.1]}}), ["uniform needs low < high, got [0.1, 0.1]"]),
    (random(**{"train.seed": {"randint": [5, 1]}}), ["randint needs low < high, got [5, 1]"]),
    (random(**{"train.seed": {"randint": [0, 2.5]}}), ["randint.1: Input should be a valid integer"]),
    (random(**{"train.learning_rate": {"uniform": [0, math.inf]}}), ["uniform.1: Input should be a finite number"]),
    (random(**{"train.learning_rate": {"uniform": [False, True]}}), ["uniform.0: Input should be a valid number"]),
    (random(**{"train.batch_size": {"uniform": [10, 100]}}), ["train.batch_size: uniform draws fractions"]),
    (random(**{"train.seed": {"normal": [0, 1]}}), ["train.seed.normal: Extra inputs are not permitted"]),
    ({"parameters": {"train.seed": {"values": [1], "randint": [0, 1]}}}, ["give exactly one of values, uniform"]),
    ({"parameters": {"train.learning_rate": {"values": []}}}, ["values: List should have at least 1 item"]),
    ({"parameters": {"train.learning_rate": {"uniform": [0, 1]}}}, ["a grid search takes only values, not uniform"]),
    ({"parameters": {f"train.{key}": {"values": list(range(22))} for key in PARAMS["train"]}},
     ["the grid has 10,648 combinations, more than the 10,000 a sweep may run"]),
    # Refused by the YAML loader, with the line.
    ({"trials": 10**100, "search": "random"}, ["not valid YAML (line", "an integer of 101 characters"]),
    (random(**{"train.learning_rate": {"uniform": [0, 10**400]}}), ["an integer of 401 characters"]),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in
     zip("abcdefgh", "bcdefghi")), ["not valid YAML (line 2, column 8): aliases (*name) are not accepted"]),
])
# fmt: on
def test_a_bad_definition_is_refused_with_every_reason(overrides, phrases):
    with pytest.raises(PipelineError) as raised:
        sweep.parse_sweep(overrides + definition() if isinstance(overrides, str) else definition(**overrides), PARAMS)
    message = str(raised.value)
    assert message.startswith("the sweep file is ") and all(phrase in message for phrase in phrases), message
    assert PASSWORD not in message and len(message) < 1500


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
# fmt: off
DEFINITIONS = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["s1", "bad name"]) | SCALARS, "search": st.sampled_from(["grid", "random", "optuna", ""]),
    "trials": SCALARS, "seed": SCALARS | st.sampled_from([-1, 0, 2**32 - 1]), "mode": st.sampled_from(["min", "up"]),
    "metric": st.sampled_from([*score.SCORES, "test_acc"]) | SCALARS, "max_concurrent": SCALARS, "retries": SCALARS,
    "parameters": st.dictionaries(
        st.sampled_from(["train.learning_rate", "train.batch_size", "train.seed", "train.nope", "nope"]),
        st.dictionaries(st.sampled_from(["values", "uniform", "loguniform", "randint", "normal"]),
                        st.lists(SCALARS, max_size=3) | SCALARS, max_size=2), max_size=3),
})
# fmt: on


@settings(max_examples=300, deadline=None)
@given(raw=DEFINITIONS)
def test_any_definition_is_refused_with_its_reasons_or_gives_a_space_ray_can_draw_from(raw):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    try:
        defined = sweep.parse_sweep(yaml.safe_dump(raw), PARAMS)
    except PipelineError as error:
        assert str(error).startswith("the sweep file ")
        return
    BasicVariantGenerator(max_concurrent=defined.max_concurrent, random_state=defined.seed)
    np.random.RandomState(defined.seed)
    assert defined.metric in score.SCORES and 1 <= defined.total <= sweep.MAX_TRIALS
    for key, domain in sweep.param_space(defined).items():
        kind, bounds = defined.parameters[key].kind, defined.parameters[key].bounds
        if kind == "values":
            assert domain == {"grid_search": bounds} if defined.search == "grid" else domain.categories == bounds
        else:
            assert type(domain).__name__ == ("Integer" if kind == "randint" else "Float")
            assert bounds[0] <= domain.sample() <= bounds[1] and (domain.lower, domain.upper) == tuple(bounds)


@pytest.mark.parametrize(
    ("arguments", "store", "phrases"),
    [
        ("fifo", "", ["cannot read the sweep file fifo: it is a FIFO, not a regular file"]),
        # On a cluster, trials on other machines can neither write to a local store nor clone a local repository.
        ("sweep.yaml --address 127.0.0.1:1", "", ["local store", "MLFLOW_TRACKING_URI=http://", "git remote 'origin'"]),
        # A server whose health check answers but which refuses this user.
        ("sweep.yaml", "refusing", ["the MLflow tracking store", "failed with error code 401"]),
    ],
)
def test_a_bad_sweep_file_or_store_fails_before_ray_is_touched(tmp_path, arguments, store, phrases):
    """One paragraph and exit 1 within seconds, without importing Ray."""
    env = base_env(tmp_path, {"PYTHONPATH": str(ROOT)})
    shutil.copy(ROOT / "params.yaml", tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sweep.yaml").write_text(definition())
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "A sweep"]):
        subprocess.run(["git", *command], cwd=tmp_path, env=env, check=True)
    os.mkfifo(tmp_path / "fifo")
    server = FakeServer(health_status=200, other_status=401)
    if store == "refusing":
        env["MLFLOW_TRACKING_URI"] = server.url
    started = time.monotonic()
    command = [sys.executable, "-X", "importtime", "-m", "pipeline.sweep", *arguments.split()]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        server.close()
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    error = " ".join(" ".join(lines).split())
    assert result.returncode == 1 and error.startswith("error: ") and "Traceback" not in error, result.stderr[-3000:]
    assert all(phrase in error for phrase in phrases) and not re.search(r"\| +ray$", result.stderr, re.M), error
    assert time.monotonic() - started < 30


# -- real sweeps --------------------------------------------------------------------------------------


def runs(url: str, query: str = "") -> list:
    from mlflow import MlflowClient

    experiment = MlflowClient(url).get_experiment_by_name("mnist-softmax")
    return [] if experiment is None else MlflowClient(url).search_runs([experiment.experiment_id], query)


def sweep_runs(url: str, name: str) -> tuple[Any, list]:
    (parent,) = runs(url, f"tags.`sweep.name` = '{name}' and tags.`mlflow.runName` LIKE 'sweep %'")
    return parent, runs(url, f"tags.`{sweep.PARENT_TAG}` = '{parent.info.run_id}'")


def table(stdout: str) -> list[dict[str, str]]:
    """The ranking table printed at the end, one dict per row."""
    lines = [line for line in stdout[stdout.index("ranked by") :].splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def completed(output: str) -> list[str]:
    """Ray Tune's line for each trial that ended in this run."""
    return re.findall(r"^Trial \S+ completed after", output, re.MULTILINE)


def processes_whose_environment_has(text: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["environ"], ad_value=None):
        if any(text in f"{name}={value}" for name, value in (process.info["environ"] or {}).items()):
            found.append(process.pid)
    return found


def run_sweep(project: Project, check: bool = True) -> subprocess.CompletedProcess:
    return project.run(str(VENV_BIN / "mnist-sweep"), "sweep.yaml", timeout=1500, check=check)


def committed_sweep(directory: Path, name: str, **env: str) -> Project:
    """The tiny project with its data prepared (so that trials restore it) and a sweep of GRID, committed."""
    project = make_project(directory, env=env)
    (project.root / "sweep.yaml").write_text(definition(name=name))
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Prepared data and a sweep")
    return project


@contextlib.contextmanager
def sweep_in_background(project: Project, log: Path, until: Callable[[], Any], *args: str) -> Iterator[tuple]:
    """The sweep started as a terminal would, in its own process group, and the first true value of ``until()``
    while it runs (failing if it ends first); waited for after the block."""
    command = [str(VENV_BIN / "mnist-sweep"), "sweep.yaml", *args]
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=project.root, env=project.env, stdout=output, stderr=output, start_new_session=True
        )
    try:
        deadline, value = time.monotonic() + 900, None
        while process.poll() is None and time.monotonic() < deadline and not (value := until()):
            time.sleep(1)
        if not value:
            pytest.fail(f"the sweep ended (or ran 15 minutes) before the awaited moment:\n{log.read_text()[-4000:]}")
        yield process, value
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check_experiments(project: Project, trials: list, name: str) -> None:
    """Each finished trial's run is a DVC experiment of ``project``, named after its trial, with the run's metric."""
    experiments = project.experiments()
    assert {run.data.tags["dvc.experiment"] for run in trials} == set(experiments)
    for run in trials:
        shown = experiments[run.data.tags["dvc.experiment"]]["metrics"]["metrics/metrics.json"]["test_accuracy"]
        assert shown == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
        assert run.data.tags["dvc.experiment"] == f"{name}-{run.data.tags[sweep.TRIAL_TAG]}"
        assert run.data.tags["git.commit"] == project.git("rev-parse", "HEAD")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_local_sweep_of_four_trials_two_at_a_time(tmp_path, mlflow_server):  # noqa: F811
    url, _ = mlflow_server
    # With a password in the URI (the server does not check it), which the sweep must never print or keep.
    project = committed_sweep(tmp_path, "local", MLFLOW_TRACKING_URI=with_credentials(url, "user", PASSWORD))

    # Ctrl-C (to the whole process group) after the first trial: a short message, nothing left RUNNING.
    log = tmp_path / "interrupted.log"
    with sweep_in_background(project, log, lambda: completed(log.read_text())) as (process, _):
        os.killpg(process.pid, signal.SIGINT)
    interrupted = log.read_text()
    assert process.returncode == 130 and "interrupted" in interrupted and "Traceback" not in interrupted, interrupted
    parent, before = sweep_runs(url, "local")
    assert parent.info.status == "KILLED"
    # No trial's pipeline goes on running: the trials' processes carry the sweep's run id.
    deadline = time.monotonic() + 60
    while processes_whose_environment_has(parent.info.run_id) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_whose_environment_has(parent.info.run_id), "a trial's pipeline outlived the sweep"
    finished_before = {run.info.run_id for run in before if run.info.status == "FINISHED"}
    assert finished_before and "RUNNING" not in {run.info.status for run in before}

    # Running the same command again resumes: the finished trials are not run again.
    done = run_sweep(project)
    assert completed(interrupted) and len(completed(interrupted) + completed(done.stdout)) == 4
    parent, trials = sweep_runs(url, "local")
    assert parent.info.status == "FINISHED" and "RUNNING" not in {run.info.status for run in trials}
    trials = [run for run in trials if run.info.status == "FINISHED"]
    assert finished_before <= {run.info.run_id for run in trials}
    assert len(trials) == 4 and len({run.data.tags[sweep.TRIAL_TAG] for run in trials}) == 4
    params = {(float(r.data.params["train.learning_rate"]), int(r.data.params["train.batch_size"])) for r in trials}
    assert params == {(0.001, 10), (0.001, 20), (0.01, 10), (0.01, 20)}
    check_experiments(project, trials, "local")

    # The ranking, best first, is the order of the runs' test accuracies, and the parent holds it.
    rows = table(done.stdout)
    accuracy = {run.data.tags["dvc.experiment"]: run.data.metrics["test_accuracy"] for run in trials}
    assert [accuracy[row["experiment"]] for row in rows] == sorted(accuracy.values(), reverse=True)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(max(accuracy.values()), abs=1e-6)
    assert f"dvc exp apply {rows[0]['experiment']}" in done.stdout
    from mlflow import MlflowClient

    artifacts = {item.path for item in MlflowClient(url).list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "ranking.md", "ranking.json"} <= artifacts
    # The project's workspace is untouched: the trials ran in their own clones.
    assert project.git("status", "--porcelain") == ""
    assert f"in {with_credentials(url, 'user', MASK)}" in done.stdout.splitlines()[-1]
    assert PASSWORD not in interrupted + done.stdout + done.stderr
    state = [path for path in (project.root / ".dvc/tmp/sweeps").rglob("*") if path.is_file()]
    assert state and not [path for path in state if PASSWORD.encode() in path.read_bytes()]

    # A rerun of the finished sweep resumes Ray's state: nothing runs again.
    again = run_sweep(project)
    assert len(sweep_runs(url, "local")[1]) == len(before) + 4 - len(finished_before) and table(again.stdout) == rows

    # Another sweep: params already run are restored by DVC from its run cache instead of training
    # again, and the trial still gets its one run under its sweep, naming the run that trained;
    # params the pipeline refuses fail their trial alone, with the pipeline's own error.
    repeated = {"train.learning_rate": {"values": [0.001, -1.0]}, "train.batch_size": {"values": [10]}}
    (project.root / "sweep.yaml").write_text(definition(name="again", parameters=repeated))
    project.commit("A sweep repeating a trial, with an invalid learning rate")
    ok, failed = table(run_sweep(project).stdout)
    assert ok["status"] == "ok" and failed["status"].startswith("failed: error: params.yaml"), (ok, failed)
    assert "train.learning_rate" in failed["status"]
    _, (restored,) = sweep_runs(url, "again")
    assert restored.info.status == "FINISHED" and float(restored.data.params["train.learning_rate"]) == 0.001
    original = {run.info.run_id: run for run in trials}[restored.data.tags[sweep.RESTORED_TAG]]
    assert original.data.params["train.batch_size"] == restored.data.params["train.batch_size"] == "10"
    assert restored.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]
    assert restored.data.tags["dvc.experiment"] == ok["experiment"] == f"again-{restored.data.tags[sweep.TRIAL_TAG]}"
    assert restored.data.tags["git.commit"] == project.git("rev-parse", "HEAD")

    # A sweep none of whose trials succeeded found nothing: exit 1, its run FAILED.
    (project.root / "sweep.yaml").write_text(
        definition(name="none", parameters={"train.learning_rate": {"values": [-1.0]}})
    )
    project.commit("A sweep whose only trial the pipeline refuses")
    failed = run_sweep(project, check=False)
    assert failed.returncode == 1 and "error: no trial of sweep none succeeded" in failed.stderr, failed.stderr
    assert sweep_runs(url, "none")[0].info.status == "FAILED"


# -- a two-node cluster --------------------------------------------------------------------------------

NODE_MARKER = "MNIST_SWEEP_TEST_NODE"
RUN_TOKEN = secrets.token_hex(6)  # In each node's marker, so that two test runs never kill each other's nodes.


def kill_node(name: str) -> None:
    """Kill every process that inherited node ``name``'s marker: the node's Ray daemons, workers and trials."""
    for _ in range(3):
        for pid in processes_whose_environment_has(f"{NODE_MARKER}={name}-{RUN_TOKEN}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker of one CPU each on 127.0.0.1; yields (address, environment, {node id: head/worker})."""
    # With a Ray token of their own, as a team's cluster should have and as Ray enables on a head that finds one
    # in ~/.ray. Explicit agent ports spare the raylet its wait for the agents to report theirs, which a loaded
    # machine can make it miss.
    nodes_dir = Path(tempfile.mkdtemp(prefix="ray-nodes-"))
    (nodes_dir / "auth_token").write_text(secrets.token_hex(32))
    env = {**base_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(nodes_dir / "auth_token")}
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = {"head": ["--head", f"--port={port}", "--include-dashboard=false"], "worker": [f"--address={address}"]}
    agents = ["metrics-export", "dashboard-agent-grpc", "dashboard-agent-listen", "runtime-env-agent"]
    processes = []
    try:
        for name, arguments in nodes.items():
            (nodes_dir / name / "tmp").mkdir(parents=True)
            command = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
            command += [f"--{agent}-port={free_port()}" for agent in agents]
            command += ["--disable-usage-stats", f"--temp-dir={nodes_dir / 'ray'}", *arguments]
            node_env = {**env, NODE_MARKER: f"{name}-{RUN_TOKEN}", "TMPDIR": str(nodes_dir / name / "tmp")}
            with open(nodes_dir / name / "ray.log", "w") as log:
                process = subprocess.Popen(
                    command, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            processes.append(process)
        script = (
            f"import json, ray\nray.init(address={address!r}, configure_logging=False, log_to_driver=False)\n"
            "alive = [node for node in ray.nodes() if node['Alive']]\n"
            "print(json.dumps({node['NodeID']: 'node:__internal_head__' in node['Resources'] for node in alive}))"
        )
        deadline = time.monotonic() + 240
        while True:
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
            alive = yaml.safe_load(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
            if len(alive) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(alive) >= 2, f"the Ray cluster did not reach 2 nodes: {done.stderr[-2000:]}"
        yield address, env, {node: "head" if head else "worker" for node, head in alive.items()}
    finally:
        for name in nodes:
            kill_node(name)
        for process in processes:
            # Also the node's agents, whose environment their process titles (ray::...) overwrite.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(nodes_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_sweep_on_a_two_node_cluster_survives_a_killed_worker(tmp_path, mlflow_server, cluster):  # noqa: F811
    url, _ = mlflow_server
    address, node_env, roles = cluster
    auth = {key: value for key, value in node_env.items() if key.startswith("RAY_AUTH")}
    # Tiny random images, each with a bright row its label places, which the softmax learns (random data it cannot).
    rng, arrays, mirror = np.random.default_rng(0), {}, tmp_path / "mirror"
    for images, labels, count in ((TRAIN_IMAGES, TRAIN_LABELS, 240), (TEST_IMAGES, TEST_LABELS, 60)):
        digits = rng.integers(0, 10, count, dtype=np.uint8)
        pictures = rng.integers(0, 128, (count, 28, 28), dtype=np.uint8)
        pictures[np.arange(count), 2 * digits + 4] = 255
        arrays |= {images: pictures, labels: digits}
    mirror.mkdir()
    for name, array in arrays.items():
        write_idx(mirror / f"{name}.gz", array, gz=True)
    data = {"MNIST_MIRROR": str(mirror), "MNIST_EXPECTED_SHA256": str(write_digests(mirror / "sha256.json", arrays))}
    project = committed_sweep(tmp_path / "team", "cluster", MLFLOW_TRACKING_URI=url, **auth, **data)
    # An early-stopping sweep: one trial that learns, then hopeless ones (learning rates near 0), one trial at a time
    # on each node. A hopeless trial that reaches the one rung (step 25,000 of 50,000) after the learning one is
    # stopped there: with reduction factor 10 the cutoff lies between their accuracies and the learning one's as long
    # as fewer than 10 of them reached it. They outnumber the learning one enough that both nodes get some once it
    # ends.
    grid = {"train.learning_rate": {"values": [0.003, *HOPELESS]}, "train.iterations": {"values": [50_000]}}
    grid |= {"train.eval_interval": {"values": [2_500]}}
    asha = {"grace_period": 25_000, "reduction_factor": 10}
    (project.root / "sweep.yaml").write_text(definition(name="cluster", parameters=grid, scheduler=asha))
    # The team's remotes: a bare git repository and a DVC remote directory.
    remote_git = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote_git)], check=True)
    project.dvc("remote", "add", "--default", "shared", str(tmp_path / "dvc-remote"))
    project.git("remote", "add", "origin", str(remote_git))
    project.commit("The team's remotes and an early-stopping sweep")
    project.dvc("push", timeout=300)
    project.git("push", "-q", "-u", "origin", "main")
    worker = next(node for node, role in roles.items() if role == "worker")

    # A wrong address, a dead port or a server that is not Ray's, fails within seconds (Ray's own connection
    # settings), before the sweep makes its run. Ray takes 127.0.0.1 for this machine; 127.0.0.2 stays on loopback.
    server = ThreadingHTTPServer(("127.0.0.2", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for wrong in (f"127.0.0.1:{free_port()}", f"127.0.0.2:{server.server_address[1]}"):
        started = time.monotonic()
        result = project.run(str(VENV_BIN / "mnist-sweep"), "sweep.yaml", "--address", wrong, check=False)
        error = " ".join(result.stderr.split())
        assert f"error: could not start or join the Ray cluster at {wrong}: " in error, error
        assert result.returncode == 1 and time.monotonic() - started < 45, error
    server.shutdown()
    server.server_close()
    assert not runs(url, "tags.`sweep.name` = 'cluster'")

    from mlflow import MlflowClient

    def early_trial_on_the_worker_after_a_stop() -> str | None:
        on_worker = [run for run in runs(url) if run.data.tags.get(sweep.NODE_TAG) == worker]
        # Until the sweep ends, a stopped trial's run is FAILED, as its interrupted stage left it.
        if not any(run.info.status == "FAILED" for run in on_worker):
            return None
        for run in [run for run in on_worker if run.info.status == "RUNNING"]:
            history = MlflowClient(url).get_metric_history(run.info.run_id, "history/test_accuracy")
            if max((point.step for point in history), default=0) <= 12_500:  # seconds before the rung could stop it
                return run.info.run_id
        return None

    # Kill the worker node outright while it runs a trial, after the scheduler stopped one there.
    log = tmp_path / "sweep.log"
    sweeping = sweep_in_background(project, log, early_trial_on_the_worker_after_a_stop, "--address", address)
    with sweeping as (process, killed_run):
        kill_node("worker")
    assert process.returncode == 0, log.read_text()[-4000:]

    # Nothing stays RUNNING: the killed attempt's run ended FAILED, and its trial ran again; every trial ended once,
    # finished or stopped by the scheduler, and a stopped one on each node (Ray's node of the trial, in its run).
    _, trials = sweep_runs(url, "cluster")
    (failed,) = [run for run in trials if run.info.status == "FAILED"]
    finished = [run for run in trials if run.info.status == "FINISHED"]
    stopped = [run for run in trials if run.info.status == "KILLED"]
    assert failed.info.run_id == killed_run and len(finished) + len(stopped) == len(trials) - 1 == 1 + len(HOPELESS)
    assert len({run.data.tags[sweep.TRIAL_TAG] for run in finished + stopped}) == 1 + len(HOPELESS)
    assert failed.data.tags[sweep.TRIAL_TAG] in {run.data.tags[sweep.TRIAL_TAG] for run in finished + stopped}
    assert {roles[run.data.tags[sweep.NODE_TAG]] for run in stopped} == {"head", "worker"}
    assert 0.003 in {float(run.data.params["train.learning_rate"]) for run in finished}

    # A stopped trial ranks after the finished ones; its run keeps its partial history and says where it stopped;
    # it has no final score, and no DVC experiment (a finished trial has).
    rows = table(log.read_text())
    statuses = {run.data.tags["dvc.experiment"]: "ok" for run in finished}
    statuses |= {f"cluster-{run.data.tags[sweep.TRIAL_TAG]}": run.data.tags[sweep.STOPPED_TAG] for run in stopped}
    assert [row["status"] == "ok" for row in rows] == [True] * len(finished) + [False] * len(stopped)
    assert {row["experiment"]: row["status"] for row in rows} == statuses
    for run in stopped:
        history = MlflowClient(url).get_metric_history(run.info.run_id, "history/test_accuracy")
        step = int(run.data.tags[sweep.STOPPED_TAG].removeprefix("stopped early by the scheduler at step "))
        assert 25_000 <= step < 50_000 and 10 <= len(history) < 20 and "test_accuracy" not in run.data.metrics

    # A fresh clone of the team's remote sees every finished trial, with its outputs, after dvc exp pull.
    clone = Project(root=tmp_path / "fresh", env=project.env)
    subprocess.run(["git", "clone", "-q", str(remote_git), str(clone.root)], check=True, env=project.env)
    clone.dvc("exp", "pull", "origin", timeout=300)
    check_experiments(clone, finished, "cluster")
    clone.dvc("exp", "apply", finished[0].data.tags["dvc.experiment"], timeout=300)
    clone.dvc("pull", "models/test_probabilities.npy", timeout=300)
    assert (clone.root / "models/test_probabilities.npy").stat().st_size > 0
