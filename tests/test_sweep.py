"""mnist-sweep: hyperparameter sweeps on Ray Tune, each trial a DVC experiment and a nested MLflow run.

The quick tests check the sweep definition, the search space and the ranking. The slow ones run
the real thing on a throwaway copy of the project with tiny synthetic data (tests/pipeline_project.py)
and a real MLflow server on PostgreSQL (the fixtures of tests/test_tracking_server.py):

* a local sweep of 4 trials, 2 at a time, stopped with Ctrl-C after its first trial and run again:
  nothing stays RUNNING and no pipeline outlives the sweep, the rerun runs only the unfinished
  trials; then 4 DVC experiments in the project, 4 FINISHED runs nested under one sweep run, the
  ranking in the order of the runs' metrics; a rerun of a finished sweep runs nothing again; a
  second sweep repeating a trial gets it from DVC's run cache (its run names the one that trained),
  and its trial with params the pipeline refuses fails alone, with the pipeline's own error;
* a two-node Ray cluster on 127.0.0.1 (a head and a worker, each a separate ``ray start`` with one
  CPU and its own working directory), a bare git remote and a local DVC remote: trials run on both
  nodes; the worker is killed outright in the middle of a trial, which Ray retries on the head; the
  sweep completes, no run stays RUNNING, and a fresh clone sees every trial after ``dvc exp pull``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_project import VENV_BIN, Project, base_env, make_project
from test_tracking_server import free_port, mlflow_server, postgres  # noqa: F401  (fixtures)

from pipeline import score
from pipeline.cli import PipelineError
from pipeline.sweep import (
    MAX_TRIALS,
    NODE_TAG,
    PARENT_TAG,
    RESTORED_TAG,
    TRIAL_TAG,
    Parameter,
    cluster_problems,
    failure_message,
    format_table,
    param_space,
    parse_sweep,
    ranking,
    set_param_arguments,
)

PARAMS = {"train": {"learning_rate": 0.003, "batch_size": 100, "seed": 0}}
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "mnist-softmax"


def definition(**overrides) -> str:
    sweep = {
        "name": "s1",
        "search": "grid",
        "max_concurrent": 2,
        "parameters": {"train.learning_rate": {"values": [0.001, 0.01]}, "train.batch_size": {"values": [10, 20]}},
    }
    sweep.update(overrides)
    return yaml.safe_dump(sweep)


# -- the definition ----------------------------------------------------------------------------------


def test_a_grid_definition_parses_into_its_parameters_and_grid_size():
    sweep = parse_sweep(definition(), PARAMS)
    assert sweep.search == "grid" and sweep.metric == "test_accuracy" and sweep.mode == "max"
    assert sweep.parameters["train.learning_rate"] == Parameter("values", (0.001, 0.01))
    assert sweep.grid_size() == 4
    assert sweep.retries == 2


def test_every_problem_of_a_definition_is_reported_at_once():
    text = definition(
        name="bad name",
        search="bayes",
        max_concurrent=0,
        colour="red",
        metric="https://host/?token=hunter22",
        parameters={
            "train.learning_rat": {"values": [1]},
            "train.seed": {"uniform": [0, 1]},
            "train.batch_size": {"loguniform": [0, 10]},
        },
    )
    with pytest.raises(PipelineError) as raised:
        parse_sweep(text, PARAMS)
    message = str(raised.value)
    for expected in (
        "unknown key 'colour'",
        "name 'bad name'",
        "search 'bayes'",
        "max_concurrent must be",
        "'train.learning_rat' is not a key of params.yaml",
        "loguniform needs positive bounds",
        "metric must not hold credentials; keep them in the environment",
    ):
        assert expected in message


def test_random_and_optuna_searches_take_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    text = definition(
        search="optuna",
        trials=5,
        parameters={
            "train.learning_rate": {"loguniform": [0.0005, 0.02]},
            "train.batch_size": {"values": [10, 20]},
            "train.seed": {"randint": [0, 4]},
        },
    )
    space = param_space(parse_sweep(text, PARAMS))
    assert isinstance(space["train.learning_rate"], Float)
    assert (space["train.learning_rate"].lower, space["train.learning_rate"].upper) == (0.0005, 0.02)
    assert isinstance(space["train.batch_size"], Categorical) and space["train.batch_size"].categories == [10, 20]
    assert isinstance(space["train.seed"], Integer)


def test_trial_params_become_set_param_arguments_that_round_trip():
    import numpy as np

    arguments = set_param_arguments({"train.learning_rate": np.float64(0.1) / 3, "train.batch_size": np.int64(20)})
    assert arguments == ["-S", "train.batch_size=20", "-S", f"train.learning_rate={0.1 / 3!r}"]
    assert yaml.safe_load(arguments[3].split("=", 1)[1]) == 0.1 / 3


def test_the_pipelines_own_error_paragraph_is_kept_from_a_failed_run():
    output = (
        "Running stage 'train':\n> python -m pipeline.train\n"
        "error: params.yaml is invalid: train.learning_rate must be a positive\n"
        "  number, not -1.\n"
        "ERROR: failed to reproduce 'train': failed to run: python -m pipeline.train, exited with 1\n"
    )
    assert failure_message(output) == (
        "error: params.yaml is invalid: train.learning_rate must be a positive number, not -1."
    )
    assert failure_message("a\nb\nc\nd\n") == "b c d"


def test_ranking_puts_the_best_first_and_failed_trials_last():
    rows = [
        {"trial": "a", "test_accuracy": 0.5},
        {"trial": "b", "test_accuracy": math.nan},
        {"trial": "c", "test_accuracy": 0.9},
        {"trial": "d", "test_accuracy": 0.7},
    ]
    assert [row["trial"] for row in ranking(rows, "test_accuracy", "max")] == ["c", "d", "a", "b"]
    assert [row["trial"] for row in ranking(rows, "test_accuracy", "min")] == ["a", "d", "c", "b"]
    table = format_table(ranking(rows, "test_accuracy", "max"), ["trial", "test_accuracy"])
    assert table.splitlines()[2] == "| c     | 0.9           |"
    assert table.splitlines()[-1] == "| b     | -             |"


def test_a_cluster_sweep_with_a_local_store_is_refused_saying_what_to_set(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    problems = cluster_problems(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    assert any("MLFLOW_TRACKING_URI=http://" in problem and "local store" in problem for problem in problems)
    assert any("no git remote 'origin'" in problem for problem in problems)
    assert not any("MLflow" in problem for problem in cluster_problems("http://mlflow.example:5000", tmp_path))


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (
            {"metric": "test_acc"},
            "metric 'test_acc' must be one of the scores metrics/metrics.json holds: test_accuracy,",
        ),
        ({"metric": "per_class_recall"}, "metric 'per_class_recall' must be one of the scores"),
        ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, not -1"),
        ({"seed": 2**32}, "seed must be a whole number from 0 to 4294967295, not 4294967296"),
        ({"seed": True}, "seed must be a whole number from 0 to 4294967295, not True"),
        ({"retries": -1}, "retries must be a whole number from 0 to 100, not -1"),
        ({"max_concurrent": 10**6}, "max_concurrent must be a whole number from 1 to 1000"),
        (
            {"search": "random", "parameters": {"train.learning_rate": {"loguniform": [0.1, 0.001]}}},
            "'train.learning_rate': loguniform needs low < high, got [0.1, 0.001]",
        ),
        (
            {"search": "random", "parameters": {"train.learning_rate": {"uniform": [0.1, 0.1]}}},
            "'train.learning_rate': uniform needs low < high, got [0.1, 0.1]",
        ),
        (
            {"search": "random", "parameters": {"train.seed": {"randint": [5, 1]}}},
            "'train.seed': randint needs low < high, got [5, 1]",
        ),
        (
            {"search": "random", "parameters": {"train.seed": {"randint": [0, 2.5]}}},
            "'train.seed': randint needs whole numbers [low, high) (high excluded)",
        ),
        (
            {"search": "random", "parameters": {"train.learning_rate": {"uniform": [0, math.inf]}}},
            "'train.learning_rate': uniform needs [low, high], two finite numbers",
        ),
        (
            {"search": "random", "parameters": {"train.learning_rate": {"uniform": [False, True]}}},
            "uniform needs [low, high], two finite numbers",
        ),
        (
            {"search": "random", "parameters": {"train.batch_size": {"uniform": [10, 100]}}},
            "'train.batch_size': uniform draws fractions, but params.yaml holds a whole number there",
        ),
        (
            {"parameters": {"train.learning_rate": {"values": []}}},
            "'train.learning_rate': values needs a non-empty list",
        ),
        (
            {"parameters": {f"train.{key}": {"values": list(range(22))} for key in PARAMS["train"]}},
            "the grid has 10,648 combinations, more than the 10,000 a sweep may run",
        ),
        ({"name": "x y" * 5_000}, "name 'x yx yx y"),
    ],
)
def test_bad_sweep_values_are_refused_up_front(overrides, phrase):
    with pytest.raises(PipelineError) as raised:
        parse_sweep(definition(**overrides), PARAMS)
    message = str(raised.value)
    assert message.startswith("the sweep file is invalid: ") and phrase in message, message
    assert len(message) < 600, "a huge value is quoted cut short"


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"trials": 10**100, "search": "random"}, "an integer of 101 characters is out of any sane range"),
        ({"search": "random", "parameters": {"train.learning_rate": {"uniform": [0, 10**400]}}}, "of 401 characters"),
    ],
)
def test_huge_integers_are_refused_by_the_yaml_loader(overrides, phrase):
    with pytest.raises(PipelineError, match=rf"the sweep file is not valid YAML \(line \d+, column \d+\): .*{phrase}"):
        parse_sweep(definition(**overrides), PARAMS)


def test_yaml_aliases_are_refused_before_they_multiply():
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
    )
    with pytest.raises(PipelineError, match=r"YAML \(line 2, column 8\): aliases \(\*name\) are not accepted"):
        parse_sweep(bomb + definition(), PARAMS)


def test_the_metrics_a_sweep_can_rank_by_are_the_reports_scores():
    labels = np.arange(10)
    scores = score.score(labels, np.eye(10)[labels])
    assert tuple(key for key, value in scores.items() if isinstance(value, float)) == score.SCORES
    for metric in score.SCORES:
        assert parse_sweep(definition(metric=metric), PARAMS).metric == metric
    example = parse_sweep(
        (ROOT / "sweeps" / "example.yaml").read_text(), yaml.safe_load((ROOT / "params.yaml").read_text())
    )
    assert example.metric == "test_accuracy" and example.grid_size() == 6


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
DEFINITIONS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["s1", "bad name", ""]) | SCALARS,
        "search": st.sampled_from(["grid", "random", "optuna", "bayes"]),
        "trials": SCALARS,
        "seed": SCALARS | st.sampled_from([-1, 0, 2**32 - 1, 2**32]),
        "metric": st.sampled_from([*score.SCORES, "test_acc"]) | SCALARS,
        "mode": st.sampled_from(["max", "min", "up"]),
        "max_concurrent": SCALARS,
        "retries": SCALARS,
        "parameters": st.dictionaries(
            st.sampled_from(["train.learning_rate", "train.batch_size", "train.seed", "train.nope", "nope"]),
            st.dictionaries(
                st.sampled_from(["values", "uniform", "loguniform", "randint", "normal"]),
                st.lists(SCALARS, max_size=3) | SCALARS,
                max_size=2,
            ),
            max_size=3,
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(raw=DEFINITIONS)
def test_any_definition_is_refused_with_its_reasons_or_gives_a_space_ray_can_draw_from(raw):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    try:
        sweep = parse_sweep(yaml.safe_dump(raw), PARAMS)
    except PipelineError as error:
        assert str(error).startswith("the sweep file ")
        return
    BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=sweep.seed)
    np.random.RandomState(sweep.seed)
    assert sweep.metric in score.SCORES and 1 <= sweep.grid_size() <= MAX_TRIALS
    for key, domain in param_space(sweep).items():
        if hasattr(domain, "sample"):
            value = domain.sample()
            low, high = sweep.parameters[key].values
            assert low <= value <= high


def test_a_bad_sweep_file_fails_before_ray_or_git_is_touched(tmp_path):
    """One paragraph and exit 1 within a second or two: nothing imports Ray before the definition holds."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    bad = tmp_path / "bad.yaml"
    bad.write_text(definition(metric="accuracy"))
    for path, phrase in (
        (fifo, f"cannot read the sweep file {fifo}: it is a FIFO, not a regular file"),
        ("/dev/zero", "cannot read the sweep file /dev/zero: it is a device, not a regular file"),
        (bad, "metric 'accuracy' must be one of the scores"),
    ):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.sweep", str(path)], cwd=ROOT,
            env={**base_env(tmp_path), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        assert phrase in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
        assert time.monotonic() - started < 30


# -- real sweeps --------------------------------------------------------------------------------------


def sweep_project(tmp_path: Path, url: str, text: str, **kwargs) -> Project:
    """A project with its data prepared and committed (so trials restore it) and a sweep file."""
    project = make_project(tmp_path, env={"MLFLOW_TRACKING_URI": url}, **kwargs)
    (project.root / "sweep.yaml").write_text(text)
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Prepared data and a sweep")
    return project


def run_sweep(project: Project, *args: str, timeout: float = 1500, check: bool = True):
    return project.run(str(VENV_BIN / "mnist-sweep"), "sweep.yaml", *args, timeout=timeout, check=check)


def children(url: str, parent_run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def sweep_run(url: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`sweep.name` = '{name}' and "
                                "tags.`mlflow.runName` LIKE 'sweep %'")  # fmt: skip
    return client, run


def table_rows(stdout: str) -> list[list[str]]:
    """The ranking table's data rows printed at the end, as lists of cells."""
    lines = stdout[stdout.index("ranked by") :].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]


def trial_lines(stdout: str) -> list[str]:
    """The line the sweep prints for each trial that ends (beside Ray's own tables)."""
    return [line for line in stdout.splitlines() if re.match(r"trial \d+/\d+ ", line)]


def interrupt_after_first_trial(project: Project, log: Path) -> subprocess.CompletedProcess:
    """Start the sweep as a terminal would, and press Ctrl-C once its first trial has finished.

    The terminal's Ctrl-C reaches the whole foreground process group: the sweep, Ray's processes it
    started, and the trials' pipelines.
    """
    command = [str(VENV_BIN / "mnist-sweep"), "sweep.yaml"]
    with open(log, "w") as output:
        sweep = subprocess.Popen(
            command, cwd=project.root, env=project.env, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 900
            while "trial 1/4" not in log.read_text() and sweep.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert sweep.poll() is None, f"the sweep ended before a trial had finished:\n{log.read_text()[-3000:]}"
            os.killpg(sweep.pid, signal.SIGINT)
            sweep.wait(timeout=300)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait()
    return subprocess.CompletedProcess(command, sweep.returncode, log.read_text(), "")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_local_sweep_of_four_trials_two_at_a_time(tmp_path, mlflow_server):  # noqa: F811
    url, _ = mlflow_server
    # With a password in the URI (the server does not check it), which the sweep must never print.
    secret = "sweep-secret-pw"
    project = sweep_project(tmp_path, url.replace("http://", f"http://user:{secret}@"), definition(name="local"))

    # Ctrl-C after the first trial: the sweep stops with a short message and leaves nothing RUNNING.
    interrupted = interrupt_after_first_trial(project, tmp_path / "interrupted.log")
    assert interrupted.returncode == 130, interrupted.stdout[-3000:]
    assert "interrupted" in interrupted.stdout and "Traceback" not in interrupted.stdout, interrupted.stdout[-3000:]
    client, parent = sweep_run(url, "local")
    assert parent.info.status == "KILLED"
    # No trial's pipeline goes on running: the trials' processes carry the sweep's run id.
    deadline = time.monotonic() + 60
    while processes_whose_environment_has(parent.info.run_id) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_whose_environment_has(parent.info.run_id), "a trial's pipeline outlived the sweep"
    before = children(url, parent.info.run_id)
    assert before and "RUNNING" not in {run.info.status for run in before}
    finished_before = {run.info.run_id for run in before if run.info.status == "FINISHED"}
    assert finished_before

    # Running the same command again resumes: the finished trials are not run again.
    done = run_sweep(project)
    first, resumed = trial_lines(interrupted.stdout), trial_lines(done.stdout)
    assert first and len(first) + len(resumed) == 4 and resumed[-1].startswith("trial 4/4"), done.stdout
    client, parent = sweep_run(url, "local")
    assert parent.info.status == "FINISHED"
    runs = children(url, parent.info.run_id)
    assert "RUNNING" not in {run.info.status for run in runs}
    runs = [run for run in runs if run.info.status == "FINISHED"]
    assert finished_before <= {run.info.run_id for run in runs}
    assert len(runs) == 4 and len({run.data.tags[TRIAL_TAG] for run in runs}) == 4
    configurations = {
        (float(r.data.params["train.learning_rate"]), int(r.data.params["train.batch_size"])) for r in runs
    }
    assert configurations == {(0.001, 10), (0.001, 20), (0.01, 10), (0.01, 20)}

    # Each run is a DVC experiment of the project, named after its trial, with the run's own metric.
    experiments = project.experiments()
    assert {run.data.tags["dvc.experiment"] for run in runs} == set(experiments)
    for run in runs:
        shown = experiments[run.data.tags["dvc.experiment"]]
        assert shown["metrics"]["metrics/metrics.json"]["test_accuracy"] == pytest.approx(
            run.data.metrics["test_accuracy"], abs=1e-6
        )
        assert run.data.tags["dvc.experiment"] == f"local-{run.data.tags[TRIAL_TAG]}"
        assert run.data.tags["git.commit"] == project.git("rev-parse", "HEAD")

    # The ranking, best first, is the order of the runs' test accuracies, and the parent holds it.
    rows = table_rows(done.stdout)
    by_experiment = {run.data.tags["dvc.experiment"]: run.data.metrics["test_accuracy"] for run in runs}
    ranked = [row[5] for row in rows]
    assert sorted(ranked) == sorted(by_experiment)
    assert [by_experiment[name] for name in ranked] == sorted(by_experiment.values(), reverse=True)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(max(by_experiment.values()), abs=1e-6)
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "ranking.md", "ranking.json", "results.png"} <= artifacts
    # The project's workspace is untouched: the trials ran in their own clones.
    assert project.git("status", "--porcelain") == ""

    assert f"in {url.replace('http://', 'http://user:***@')}" in done.stdout.splitlines()[-1]
    assert secret not in interrupted.stdout + done.stdout + done.stderr

    # A rerun of the finished sweep resumes Ray's state: nothing runs again.
    again = run_sweep(project)
    assert len(children(url, parent.info.run_id)) == len(before) + 4 - len(finished_before)
    assert table_rows(again.stdout) == rows

    # Another sweep: params already run are restored by DVC from its run cache instead of training
    # again, and the trial still gets its one run under its sweep, naming the run that trained;
    # params the pipeline refuses fail their trial alone, with the pipeline's own error.
    (project.root / "sweep.yaml").write_text(
        definition(
            name="again",
            parameters={"train.learning_rate": {"values": [0.001, -1.0]}, "train.batch_size": {"values": [10]}},
        )  # fmt: skip
    )
    project.commit("A sweep repeating a trial, with an invalid learning rate")
    repeated = run_sweep(project)
    rows = {row[1]: row for row in table_rows(repeated.stdout)}
    statuses = sorted((row[-1] for row in rows.values()), key=lambda status: status != "ok")
    assert statuses[0] == "ok"
    assert statuses[1].startswith("failed: error: params.yaml") and "train.learning_rate" in statuses[1], statuses
    _, again = sweep_run(url, "again")
    (restored,) = children(url, again.info.run_id)
    assert restored.info.status == "FINISHED" and float(restored.data.params["train.learning_rate"]) == 0.001
    original = {run.info.run_id: run for run in runs}[restored.data.tags[RESTORED_TAG]]
    assert original.data.params["train.batch_size"] == restored.data.params["train.batch_size"] == "10"
    assert restored.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]
    assert restored.data.tags["dvc.experiment"] == f"again-{restored.data.tags[TRIAL_TAG]}"
    assert restored.data.tags["git.commit"] == project.git("rev-parse", "HEAD")

    # A sweep none of whose trials succeeded found nothing: exit 1, its run FAILED.
    (project.root / "sweep.yaml").write_text(
        definition(name="none", parameters={"train.learning_rate": {"values": [-1.0]}})
    )
    project.commit("A sweep whose only trial the pipeline refuses")
    failed = run_sweep(project, check=False)
    assert failed.returncode == 1 and "error: no trial of sweep none succeeded" in failed.stderr, failed.stderr
    assert sweep_run(url, "none")[1].info.status == "FAILED"


# -- a two-node cluster --------------------------------------------------------------------------------

NODE_MARKER = "MNIST_SWEEP_TEST_NODE"


def processes_whose_environment_has(text: str) -> list[int]:
    """Every process with ``text`` in one of its environment variables (processes inherit them)."""
    marker = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(marker in variable for variable in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def node_processes(name: str) -> list[int]:
    """Every process that inherited ``NODE_MARKER=name``: the node's Ray daemons, workers and trials."""
    return processes_whose_environment_has(f"{NODE_MARKER}={name}")


def kill_node(name: str) -> None:
    for _ in range(3):
        for pid in node_processes(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def start_node(name: str, directory: Path, env: dict, *arguments: str) -> subprocess.Popen:
    """``ray start --block`` with one CPU, its own working directory and explicit agent ports.

    Fixed agent ports spare the raylet its wait for the agents to report theirs, which a loaded
    two-core machine can make it miss.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    ports = [
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    node_env = {**env, NODE_MARKER: name, "TMPDIR": str(directory / "tmp")}
    log = open(directory / "ray.log", "w")  # noqa: SIM115 (closed with the node's process)
    return subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *ports, *arguments],
        cwd=directory,
        env=node_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_node_retrying(name: str, directory: Path, env: dict, *arguments: str, attempts: int = 3) -> subprocess.Popen:
    """Start a node, again if it fails: Ray's raylet gives its agents only 15 s to start, which a
    loaded machine can miss (the node then exits); the next start usually succeeds."""
    for _ in range(attempts):
        process = start_node(name, directory, env, *arguments)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if "Ray runtime started" in (directory / "ray.log").read_text():
                return process
            if process.poll() is not None:
                break
            time.sleep(1)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        kill_node(name)
    pytest.fail(
        f"the Ray {name} node did not start in {attempts} attempts:\n{(directory / 'ray.log').read_text()[-3000:]}"
    )


def wait_for_nodes(address: str, env: dict, count: int, timeout: float = 240) -> dict[str, str]:
    """Wait until ``count`` nodes are alive; return {node id: 'head' or 'worker'}."""
    script = (
        "import json, ray\n"
        f"ray.init(address={address!r}, configure_logging=False, log_to_driver=False)\n"
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0:
            nodes = json.loads(done.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return {node: ("head" if "node:__internal_head__" in res else "worker") for node, res in nodes.items()}
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray cluster did not reach {count} nodes: {done.stderr[-2000:]}")
        time.sleep(2)


def ray_auth(token: Path) -> dict[str, str]:
    """The environment that makes a Ray process use the cluster's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker node on 127.0.0.1; yields (address, environment, nodes dir); stops both.

    The cluster uses Ray's token authentication, as a team's should (Ray enables it on a head that
    finds a token in ~/.ray, which any earlier local ray.init() leaves there, and then refuses nodes
    and drivers without it): a token of its own, given to every node and to the sweep through the
    environment.
    """
    nodes_dir = Path(tempfile.mkdtemp(prefix="ray-nodes-"))
    token = nodes_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**base_env(tmp_path), **ray_auth(token)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    processes = []
    try:
        processes.append(
            start_node(
                "head",
                nodes_dir / "head",
                env,
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                f"--temp-dir={nodes_dir / 'ray'}",
            )  # fmt: skip
        )
        processes.append(
            start_node(
                "worker",
                nodes_dir / "worker",
                env,
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={nodes_dir / 'ray'}",
            )  # fmt: skip
        )
        yield address, env, nodes_dir
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        kill_node("head")
        kill_node("worker")
        subprocess.run(["rm", "-rf", str(nodes_dir)], check=False)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_sweep_on_a_two_node_cluster_survives_a_killed_worker(tmp_path, mlflow_server, cluster):  # noqa: F811
    url, _ = mlflow_server
    address, node_env, nodes_dir = cluster
    # The team's remotes: a bare git repository and a DVC remote directory.
    remote_git, remote_dvc = tmp_path / "remote.git", tmp_path / "dvc-remote"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote_git)], check=True)
    project = make_project(tmp_path / "team", env={"MLFLOW_TRACKING_URI": url, **ray_auth(nodes_dir / "auth_token")})
    (project.root / "sweep.yaml").write_text(definition(name="cluster", retries=2))
    project.dvc("remote", "add", "--default", "shared", str(remote_dvc))
    project.git("remote", "add", "origin", str(remote_git))
    project.dvc("repro", "preprocess", timeout=600)
    project.commit("Shared remotes, prepared data and a sweep")
    project.dvc("push", timeout=300)
    project.git("push", "-q", "-u", "origin", "main")

    roles = wait_for_nodes(address, {**node_env, **project.env}, 2)
    worker = next(node for node, role in roles.items() if role == "worker")

    # A local SQLite store is refused up front, saying why and what to set.
    refused = project.run(
        str(VENV_BIN / "mnist-sweep"), "sweep.yaml", "--address", address,
        env={"MLFLOW_TRACKING_URI": ""}, check=False, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "MLFLOW_TRACKING_URI=http://" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    sweep = subprocess.Popen(
        [str(VENV_BIN / "mnist-sweep"), "sweep.yaml", "--address", address],
        cwd=project.root,
        env=project.env,
        stdout=open(tmp_path / "sweep.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    killed_run = None
    try:
        # Kill the worker node outright while it runs its second trial (after one finished there).
        deadline = time.monotonic() + 600
        while sweep.poll() is None and killed_run is None and time.monotonic() < deadline:
            time.sleep(1)
            runs = all_runs(url)
            on_worker = [run for run in runs if run.data.tags.get(NODE_TAG) == worker]
            running = [run for run in on_worker if run.info.status == "RUNNING"]
            if running and any(run.info.status == "FINISHED" for run in on_worker):
                killed_run = running[0].info.run_id
                kill_node("worker")
        sweep.wait(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    log = (tmp_path / "sweep.log").read_text()
    assert killed_run is not None, f"the worker never ran a second trial to kill:\n{log[-4000:]}"
    assert sweep.returncode == 0, log[-4000:]

    _, parent = sweep_run(url, "cluster")
    runs = children(url, parent.info.run_id)
    # Nothing stays RUNNING: the killed attempt's run ended FAILED; every trial finished once.
    assert {run.info.status for run in runs} == {"FINISHED", "FAILED"}
    (failed,) = [run for run in runs if run.info.status == "FAILED"]
    assert failed.info.run_id == killed_run
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert len(finished) == 4
    assert len({run.data.tags[TRIAL_TAG] for run in finished}) == 4
    assert failed.data.tags[TRIAL_TAG] in {run.data.tags[TRIAL_TAG] for run in finished}
    placement = {run.data.tags["dvc.experiment"]: roles[run.data.tags[NODE_TAG]] for run in finished}
    print("placement of the trials:", placement, "killed attempt on", roles[failed.data.tags[NODE_TAG]])
    assert set(placement.values()) == {"head", "worker"}

    # A fresh clone of the team's remote sees every trial, with its outputs, after dvc exp pull.
    clone = Project(root=tmp_path / "fresh", env=project.env)
    subprocess.run(["git", "clone", "-q", str(remote_git), str(clone.root)], check=True, env=project.env)
    clone.dvc("exp", "pull", "origin", timeout=300)
    experiments = clone.experiments()
    assert set(experiments) == set(placement)
    for run in finished:
        shown = experiments[run.data.tags["dvc.experiment"]]
        assert shown["metrics"]["metrics/metrics.json"]["test_accuracy"] == pytest.approx(
            run.data.metrics["test_accuracy"], abs=1e-6
        )
    name = finished[0].data.tags["dvc.experiment"]
    clone.dvc("exp", "apply", name, timeout=300)
    clone.dvc("pull", "models/test_probabilities.npy", timeout=300)
    assert (clone.root / "models/test_probabilities.npy").stat().st_size > 0


def all_runs(url: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


# -- failing fast -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_wrong_address_fails_within_seconds(tmp_path):
    """A dead port, and a server that is not Ray's: Ray's own connection settings end the wait in ~15 s, not 300."""
    import http.server
    import threading

    # Ray connects to what 127.0.0.1 names as this machine's own address; 127.0.0.2 stays on loopback.
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "import sys\nfrom pipeline.cli import PipelineError\nfrom pipeline.sweep import start_ray\n"
        "try:\n    start_ray(sys.argv[1])\nexcept PipelineError as error:\n    print(error)\n"
    )
    try:
        for address in (f"127.0.0.1:{free_port()}", f"127.0.0.2:{server.server_address[1]}"):
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-c", script, address], cwd=tmp_path,
                env={**base_env(tmp_path), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert time.monotonic() - started < 45, result.stderr
            assert result.stdout.startswith(f"could not start or join the Ray cluster at {address}: "), result.stdout
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_store_that_refuses_the_user_fails_before_ray_starts(tmp_path):
    from test_tracking_server import FakeServer

    server = FakeServer(health_status=200, other_status=401)
    try:
        project = make_project(tmp_path, env={"MLFLOW_TRACKING_URI": server.url})
        (project.root / "sweep.yaml").write_text(definition(name="refused"))
        project.commit("A sweep")
        started = time.monotonic()
        result = run_sweep(project, check=False, timeout=300)
    finally:
        server.close()
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert "failed with error code 401" in " ".join(output.split()), output
    # Ray never started: no Ray session was made, which takes 15 s or more on this machine.
    assert "Started a local Ray instance" not in output and time.monotonic() - started < 60, output
