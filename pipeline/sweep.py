"""Run a hyperparameter sweep on Ray Tune, each trial a DVC experiment and one nested MLflow run.

``mnist-sweep SWEEP.yaml [--address HOST:PORT]`` reads the sweep definition (sweeps/example.yaml
shows every key), the project's params.yaml (for the keys it may set), the tracking settings (see
pipeline.params.tracking_settings) and git state, and writes:

* one DVC experiment per trial, ``<sweep name>-<trial id>``, on the sweep's commit: each trial clones
  the repository at that commit into a temporary directory on whichever machine Ray runs it, runs
  ``dvc exp run -S key=value ...`` there and pushes the experiment back with ``dvc exp push``, so
  ``dvc exp show`` (after ``dvc exp pull`` in another clone) lists every trial;
* one MLflow parent run for the sweep (its definition, the ranking table and a plot of the metric
  against each parameter), under which every trial's training run is nested through MLflow's
  ``mlflow.parentRunId`` tag, passed to the train stage in ``$PIPELINE_RUN_TAGS``;
* Ray Tune's experiment state in ``.dvc/tmp/sweeps/<sweep name>`` (ignored by git), from which a
  rerun of the same sweep resumes: finished trials are not run again.

Without ``--address`` (or ``$RAY_ADDRESS``) Ray runs on this machine, trials clone this repository
and share its DVC cache. With a cluster, trials clone the git remote ``origin``, pull data from
the default DVC remote and push their outputs to it; the MLflow store must then be a server. Ray
schedules the trials, limits how many run at once and restarts those whose worker died
(``FailureConfig``); this module only describes the search and runs one trial.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.cli import PipelineError, configure_logging, format_error, redact
from pipeline.params import credential_keys, load_params, parse_yaml, read_params, tracking_settings
from pipeline.score import SCORES
from pipeline.tracking import record, store, tags

logger = logging.getLogger(__name__)

SEARCHES = ("grid", "random", "optuna")
DISTRIBUTIONS = ("values", "uniform", "loguniform", "randint")
SWEEP_KEYS = {"name", "search", "trials", "seed", "metric", "mode", "max_concurrent", "retries", "parameters"}
# Where Ray Tune keeps each sweep's state (for resuming), inside DVC's own git-ignored temp folder.
STATE_DIR = Path(".dvc/tmp/sweeps")
STATE_FILE = "mnist-sweep.json"
RESULTS_FILE = "results.jsonl"
# The stage output the metric is read from, as dvc.yaml's report stage writes it.
METRICS_FILE = "metrics/metrics.json"
# Tags on the runs: which sweep and trial a run belongs to, and where the trial ran.
SWEEP_TAG = "sweep.name"
TRIAL_TAG = "sweep.trial"
NODE_TAG = "sweep.node"
HOST_TAG = "sweep.host"
PARENT_TAG = "mlflow.parentRunId"
# On the run of a trial that DVC restored from its run cache: the earlier run that trained the model.
RESTORED_TAG = "sweep.restored_from"
# Ray's raylet gives its agent processes a fixed 15 s to start; on a loaded machine they can miss
# it, and the node fails to start. Starting again usually succeeds (the imports are cached then).
RAY_START_ATTEMPTS = 3
# The key of every trial's one result (its DVC experiment's name); a trial without it never ended.
RESULT_KEY = "experiment"
# The longest error text a failed trial keeps for the table.
ERROR_CHARS = 400
# The most trials one sweep may hold (a grid's combinations, or random and optuna draws): far more
# than a sweep of trainings can run, few enough for Ray Tune to plan.
MAX_TRIALS = 10_000
# Ray Tune's samplers seed NumPy, which takes seeds from 0 to 2**32 - 1.
SEED_LIMIT = 2**32
# Ray's own connection settings, for joining a cluster: one attempt (its default is 20, of about 36 s
# each against a dead port or a server that is not Ray's), giving up on an address after 2 s and on
# the cluster's answer after 10 s (a live one answers in milliseconds), so a wrong --address fails
# in about 15 s. The environment can still set each of them.
RAY_JOIN_SETTINGS = {
    "RAY_gcs_server_port_wait_time_s": "1",
    "RAY_gcs_rpc_server_connect_timeout_s": "2",
    "RAY_py_gcs_connect_timeout_s": "10",
}


@dataclasses.dataclass(frozen=True)
class Parameter:
    kind: str
    values: tuple


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    search: str
    trials: int
    seed: int | None
    metric: str
    mode: str
    max_concurrent: int
    retries: int
    parameters: dict[str, Parameter]

    def grid_size(self) -> int:
        return math.prod(len(parameter.values) for parameter in self.parameters.values())


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial needs to know, the same on every machine."""

    git_url: str
    commit: str
    sweep_name: str
    metric: str
    tracking_uri: str
    # The settings that say where trials record their runs, for trials on machines without them.
    settings: dict[str, str]
    experiment_id: str
    parent_run_id: str
    # This repository's DVC cache, shared by local trials; None on a cluster (data from the DVC remote).
    cache_dir: str | None
    # Whether outputs go to (and missing data comes from) a DVC remote.
    dvc_remote: bool
    git_identity: tuple[str, str]


def shown(value: Any) -> str:
    """A value from the sweep file as an error message quotes it: a huge one cut short."""
    return store.short(repr(value), 60)


def distribution_problem(kind: str, values: list, current: Any) -> str | None:
    """Why ``kind: values`` cannot be drawn from for a params.yaml key now set to ``current``, or None."""
    if kind == "values":
        return None if values else "values needs a non-empty list"
    numbers = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    # Compared rather than converted: an integer of 400 digits has no float.
    if not numbers or not all(abs(v) <= sys.float_info.max for v in values):
        return f"{kind} needs [low, high], two finite numbers"
    low, high = values
    if low >= high:
        return f"{kind} needs low < high, got [{low}, {high}]"
    if kind == "loguniform" and low <= 0:
        return "loguniform needs positive bounds"
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        return "randint needs whole numbers [low, high) (high excluded)"
    if kind != "randint" and isinstance(current, int) and not isinstance(current, bool):
        return f"{kind} draws fractions, but params.yaml holds a whole number there; use randint or values"
    return None


def parse_sweep(text: str, params: Mapping[str, Any]) -> Sweep:
    """Validate a sweep definition against the project's params.yaml; report every problem at once."""
    raw = parse_yaml(text, "the sweep file", PipelineError)
    if not isinstance(raw, dict):
        raise PipelineError("the sweep file must be a mapping of keys (see sweeps/example.yaml).")
    problems = [f"unknown key {shown(key)}" for key in raw if key not in SWEEP_KEYS]
    if secrets := credential_keys(raw):
        # The file is committed and uploaded to the sweep's MLflow run.
        problems.append(f"{', '.join(secrets)} must not hold credentials; keep them in the environment")
    name = str(raw.get("name", ""))
    if not name or not all(char.isalnum() or char in "-_" for char in name):
        problems.append(f"name {shown(name)} must be letters, digits, '-' or '_' (it names DVC experiments)")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        problems.append(f"search {shown(search)} must be one of {', '.join(SEARCHES)}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        problems.append(f"mode {shown(mode)} must be max or min")
    metric = raw.get("metric", "test_accuracy")
    if metric not in SCORES:
        problems.append(
            f"metric {shown(metric)} must be one of the scores metrics/metrics.json holds: {', '.join(SCORES)}"
        )
    numbers: dict[str, Any] = {}
    for key, default, low, high in (
        ("trials", 1, 1, MAX_TRIALS),
        ("max_concurrent", 1, 1, 1000),
        ("retries", 2, 0, 100),
        ("seed", None, 0, SEED_LIMIT - 1),
    ):
        value = raw.get(key, default)
        if key == "seed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"{key} must be a whole number from {low} to {high}, not {shown(value)}")
        numbers[key] = value
    parameters: dict[str, Parameter] = {}
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        problems.append("parameters must map at least one params.yaml key to {values: [...]} or a distribution")
    else:
        for key, spec in raw["parameters"].items():
            section, _, field = str(key).partition(".")
            if not isinstance(params.get(section), dict) or field not in params[section]:
                problems.append(f"parameter {shown(key)} is not a key of params.yaml (section.key)")
                continue
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                problems.append(f"parameter {shown(key)} must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}")
                continue
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list):
                problems.append(f"parameter {shown(key)}: {kind} needs a list")
            elif kind != "values" and search == "grid":
                problems.append(f"parameter {shown(key)}: a grid search takes only `values`, not {kind}")
            elif problem := distribution_problem(kind, values, params[section][field]):
                problems.append(f"parameter {shown(key)}: {problem}")
            else:
                parameters[key] = Parameter(kind, tuple(values))
    grid = math.prod(len(parameter.values) for parameter in parameters.values())
    if search == "grid" and grid > MAX_TRIALS:
        problems.append(f"the grid has {grid:,} combinations, more than the {MAX_TRIALS:,} a sweep may run")
    if problems:
        raise PipelineError("the sweep file is invalid: " + "; ".join(problems) + ".")
    return Sweep(
        name=name,
        search=search,
        trials=numbers["trials"],
        seed=raw.get("seed"),
        metric=metric,
        mode=mode,
        max_concurrent=numbers["max_concurrent"],
        retries=numbers["retries"],
        parameters=parameters,
    )


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Ray Tune's search space for the sweep's parameters."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, parameter in sweep.parameters.items():
        values = list(parameter.values)
        if parameter.kind == "values":
            space[key] = tune.grid_search(values) if sweep.search == "grid" else tune.choice(values)
        elif parameter.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif parameter.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(*values)
    return space


def set_param_arguments(config: Mapping[str, Any]) -> list[str]:
    """``dvc exp run`` arguments setting each of the trial's params."""
    arguments = []
    for key, value in sorted(config.items()):
        # Ray hands numpy scalars from its samplers; -S needs plain YAML literals.
        plain = value.item() if hasattr(value, "item") else value
        arguments += ["-S", f"{key}={plain!r}" if isinstance(plain, float) else f"{key}={plain}"]
    return arguments


def failure_message(output: str) -> str:
    """The pipeline's own error from a failed ``dvc exp run``: its `error:` paragraph, else the last lines."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("error: "):
            paragraph = [line]
            paragraph += [more.strip() for more in lines[index + 1 :] if more.startswith("  ")]
            return " ".join(paragraph)[:ERROR_CHARS]
    return " ".join(lines[-3:])[:ERROR_CHARS]


def run_command(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """Run a trial's command in the Ray worker's own process group, its output captured.

    Staying in the worker's process group matters: when Ray stops a trial (Ctrl-C on the sweep) or
    its worker dies, Ray ends the worker's whole group, so no pipeline keeps running unattended.
    """
    return subprocess.run(
        list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def node_identity() -> tuple[str, str]:
    """The Ray node this trial runs on, and this machine's host name."""
    import ray

    return ray.get_runtime_context().get_node_id(), socket.gethostname()


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: clone the sweep's commit, ``dvc exp run`` the trial's params, push the experiment back.

    A failing pipeline (invalid params, a training error) is a result, reported with the pipeline's
    own error, not an exception: Ray restarts only trials whose worker died.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    experiment = f"{setup.sweep_name}-{trial_id}"
    node, host = node_identity()
    started = time.monotonic()
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": setup.tracking_uri,
        **setup.settings,
        record.EXTRA_TAGS_VARIABLE: json.dumps(
            {
                PARENT_TAG: setup.parent_run_id,
                SWEEP_TAG: setup.sweep_name,
                TRIAL_TAG: trial_id,
                NODE_TAG: node,
                HOST_TAG: host,
            }  # fmt: skip
        ),
    }
    for variable in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "RAY_ADDRESS"):
        env.pop(variable, None)
    dvc = str(Path(sys.executable).with_name("dvc"))
    result: dict[str, Any] = {RESULT_KEY: experiment, "node": node, "host": host, "error": ""}
    workdir = Path(tempfile.mkdtemp(prefix=f"mnist-sweep-{trial_id}-"))
    try:
        steps: list[list[str]] = [
            ["git", "clone", "--quiet", "--no-checkout", setup.git_url, str(workdir)],
            ["git", "checkout", "--quiet", setup.commit],
            ["git", "config", "user.name", setup.git_identity[0]],
            ["git", "config", "user.email", setup.git_identity[1]],
        ]
        if setup.cache_dir:
            steps.append([dvc, "config", "--local", "cache.dir", setup.cache_dir])
        pull = ["--pull"] if setup.dvc_remote else []
        steps.append([dvc, "exp", "run", "--name", experiment, *pull, *set_param_arguments(config)])
        push_cache = [] if setup.dvc_remote else ["--no-cache"]
        steps.append([dvc, "exp", "push", "--force", *push_cache, "origin", experiment])
        for command in steps:
            done = run_command(command, workdir, env)
            if done.returncode != 0:
                result["error"] = failure_message(done.stdout) or f"{' '.join(command[:3])} exited {done.returncode}"
                result[setup.metric] = math.nan
                break
        else:
            metrics = json.loads((workdir / METRICS_FILE).read_text())
            result[setup.metric] = float(metrics[setup.metric])
            record_restored_trial(setup, workdir, trial_id, experiment, json.loads(env[record.EXTRA_TAGS_VARIABLE]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    tune.report(result)


def record_restored_trial(setup: TrialSetup, workdir: Path, trial_id: str, experiment: str, trial_tags: dict) -> None:
    """Give a trial that trained nothing its run under the sweep, pointing at the run that did.

    When an earlier experiment had the trial's params, ``dvc exp run`` restores train and report from
    DVC's run cache in seconds instead of training again, so no stage logs a run. The trial still
    gets its one run under the sweep: the earlier run's params and final metrics, this trial's tags,
    and ``sweep.restored_from`` naming the earlier run, which holds the curves, pictures and model.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(setup.tracking_uri)
    own = client.search_runs(
        [setup.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{setup.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if own:
        return
    probabilities = (workdir / "models" / "test_probabilities.npy").read_bytes()
    earlier = record.find_training_run(client, setup.experiment_id, record.sha256(probabilities), setup.tracking_uri)
    # Not the pipeline's own tags: the output digests must keep leading to the run that holds the outputs.
    run_tags = {
        key: value for key, value in earlier.data.tags.items() if not key.startswith(("mlflow.", "sweep.", "pipeline."))
    }
    run_tags.update(tags.git_info(workdir))
    run_tags.update({**trial_tags, "dvc.experiment": experiment, RESTORED_TAG: earlier.info.run_id})
    run = client.create_run(setup.experiment_id, run_name=earlier.info.run_name, tags=run_tags)
    now = record.timestamp_ms()
    client.log_batch(
        run.info.run_id,
        metrics=[
            Metric(key, value, now, 0)
            for key, value in earlier.data.metrics.items()
            if not key.startswith(record.HISTORY_PREFIX)
        ],
        params=[Param(key, value) for key, value in earlier.data.params.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")


# -- the driver --------------------------------------------------------------------------------------


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed in {root}: {store.short(done.stderr)}")
    return done.stdout.strip()


def cluster_problems(uri: str, root: Path) -> list[str]:
    """Why this project cannot sweep on a cluster, if it cannot: trials run on other machines."""
    problems = []
    if urlparse_scheme(uri) not in ("http", "https", "databricks"):
        problems.append(
            f"the MLflow store is {redact(uri)}, a local store that trials on other machines cannot write to; start a "
            "tracking server (mlflow server, see the README's 'A shared tracking server') and set "
            "MLFLOW_TRACKING_URI=http://<server>:5000"
        )
    remotes = subprocess.run(["git", "remote"], cwd=root, capture_output=True, text=True).stdout.split()
    if "origin" not in remotes:
        problems.append("the repository has no git remote 'origin' for the trials to clone and push experiments to")
    elif not subprocess.run(
        ["git", "branch", "-r", "--contains", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip():
        problems.append(
            "the current commit is not on the git remote 'origin' yet, so trials cannot check it out: git push"
        )
    return problems


def urlparse_scheme(uri: str) -> str:
    from urllib.parse import urlparse

    return urlparse(uri).scheme


def sweep_key(text: str, commit: str) -> str:
    return hashlib.sha256(f"{commit}\n{text}".encode()).hexdigest()[:16]


def ranking(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first; failed trials (no metric) last, in trial order."""

    def order(row: dict[str, Any]) -> tuple:
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0.0, row["trial"])
        return (0, -value if mode == "max" else value, row["trial"])

    return sorted(rows, key=order)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown) of ``rows``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.6g}"
        return str(value) if value is not None else "-"

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    lines = ["| " + " | ".join(column.ljust(width) for column, width in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    lines += ["| " + " | ".join(text.ljust(width) for text, width in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines)


def results_plot(rows: list[dict[str, Any]], parameters: Mapping[str, Parameter], metric: str) -> bytes:
    """A PNG with one scatter panel per parameter: the metric against the parameter's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if isinstance(row.get(metric), float) and not math.isnan(row[metric])]
    figure, axes = plt.subplots(1, len(parameters), figsize=(4 * len(parameters), 3.5), squeeze=False)
    for axis, (key, parameter) in zip(axes[0], parameters.items()):
        axis.scatter([row[key] for row in scored], [row[metric] for row in scored])
        if parameter.kind == "loguniform" or (
            parameter.kind == "values"
            and all(isinstance(v, int | float) and v > 0 for v in parameter.values)
            and max(parameter.values) / min(parameter.values) >= 10
        ):
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{metric} of each trial")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def read_trial_records(path: Path) -> dict[str, dict[str, Any]]:
    """The trials recorded so far (see trial_recorder), by trial id; a trial recorded twice keeps its last record."""
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            records[entry["trial"]] = entry
    return records


def trial_rows(records: Mapping[str, dict[str, Any]], runs_by_trial: Mapping[str, Any], sweep: Sweep) -> list[dict]:
    """One row per recorded trial, joined with its MLflow run."""
    rows = []
    for trial_id, entry in records.items():
        run = runs_by_trial.get(trial_id)
        config = entry.get("config") or {}
        row: dict[str, Any] = {"trial": trial_id, **{key: config.get(key) for key in sweep.parameters}}
        value = entry.get(sweep.metric)
        row[sweep.metric] = float(value) if isinstance(value, int | float) else math.nan
        row["experiment"] = entry.get(RESULT_KEY) or "-"
        row["node"] = (entry.get("node") or "-")[:8]
        row["mlflow run"] = run.info.run_id[:8] if run else "-"
        if entry.get("crashed"):
            row["status"] = f"error: {entry['crashed']}"
        elif entry.get("error"):
            row["status"] = f"failed: {entry['error']}"
        else:
            row["status"] = "ok"
        rows.append(row)
    return rows


def trial_recorder(path: Path, total: int, metric: str):
    """A Ray Tune callback that records each trial's outcome as a line of JSON in ``path`` and prints
    one line per finished trial (beside Ray's own progress table).

    The records go to a file rather than into this object because Ray Tune pickles its callbacks
    with the sweep's state and, when a sweep is resumed, calls the unpickled copy; the file then
    collects the trials of every run of the sweep, and the table at the end is made from it.
    """
    from ray.tune import Callback

    def plain(value: Any) -> Any:
        return value.item() if hasattr(value, "item") else value

    class TrialRecorder(Callback):
        def record(self, entry: dict[str, Any]) -> int:
            with open(path, "a") as file:
                file.write(json.dumps(entry, default=str) + "\n")
            return len(read_trial_records(path))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            entry = {"trial": trial.trial_id, "config": {key: plain(value) for key, value in trial.config.items()}}
            entry.update({key: result.get(key) for key in (RESULT_KEY, metric, "node", "host", "seconds", "error")})
            done = self.record(entry)
            params = " ".join(f"{key}={value}" for key, value in sorted(entry["config"].items()))
            outcome = f"failed: {entry['error']}" if entry["error"] else f"{metric} {entry[metric]}"
            where = f"node {str(entry['node'])[:8]}, {entry['seconds']} s"
            print(f"trial {done}/{total} {entry[RESULT_KEY]} {params}: {outcome} ({where})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            # The trial raised or its worker died, as often as the sweep allows retries.
            try:
                lines = Path(trial.error_file).read_text().strip().splitlines()
                reason = store.short(lines[-1], 200) if lines else "no error message"
            except (OSError, TypeError):
                reason = "no error message"
            config = {key: plain(value) for key, value in trial.config.items()}
            done = self.record({"trial": trial.trial_id, "config": config, "crashed": reason})
            print(f"trial {done}/{total} {trial.trial_id}: failed after its retries: {reason}", flush=True)

    return TrialRecorder()


def close_unfinished_runs(client, experiment_id: str, parent_run_id: str, status: str, reason: str) -> list[str]:
    """End the sweep's child runs still RUNNING (their trial's worker died or was stopped)."""
    closed = []
    for run in client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    ):
        client.set_tag(run.info.run_id, record.CLOSED_TAG, reason)
        client.set_terminated(run.info.run_id, status)
        closed.append(run.info.run_id)
    return closed


def start_ray(address: str) -> None:
    """Join the cluster at ``address``, or start Ray on this machine, trying again if its start-up times out."""
    if address:
        # Before Ray's import, which reads some of them.
        for key, value in RAY_JOIN_SETTINGS.items():
            os.environ.setdefault(key, value)
    import psutil  # installed with DVC, which depends on it
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            # Trials report through their results (the pipeline's own error included) and Ray's
            # error files, so the workers' console output is not forwarded here: it adds only the
            # noise of workers being stopped (Ray's SystemExit in a worker on Ctrl-C).
            ray.init(address=address or None, include_dashboard=False, configure_logging=False, log_to_driver=False)
            return
        # Ray reports a node that missed a start-up deadline, or an unreachable cluster, as a bare
        # Exception or a ConnectionError.
        except Exception as error:
            ray.shutdown()
            # A node that failed to start leaves its other processes (GCS, dashboard, monitors)
            # running as this process's children; nothing else of ours runs at this point.
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            if attempt == RAY_START_ATTEMPTS or "timed out" not in str(error):
                where = f"the Ray cluster at {address}" if address else "Ray on this machine"
                raise PipelineError(f"could not start or join {where}: {store.short(str(error))}") from None
            logger.warning("Ray did not start in time (attempt %d of %d); trying again", attempt, RAY_START_ATTEMPTS)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="the sweep definition (sweeps/example.yaml)")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="a Ray cluster to join, HOST:PORT of its head (default $RAY_ADDRESS; none: Ray on this machine)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    root = store.project_root()
    try:
        text = files.read_bytes(args.sweep).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise PipelineError(f"cannot read the sweep file {args.sweep}: {reason}") from None
    load_params()
    settings = tracking_settings()
    sweep = parse_sweep(text, read_params(root / "params.yaml"))
    uri = store.tracking_uri(settings.uri, root)
    if args.address:
        problems = cluster_problems(uri, root)
        if problems:
            raise PipelineError("cannot sweep on the Ray cluster at " + args.address + ": " + "; ".join(problems) + ".")
    store.check_reachable(uri)
    changed = git(root, "status", "--porcelain", "--untracked-files=no")
    if changed:
        raise PipelineError(
            "the working copy has uncommitted changes, which the trials would not see (they run the sweep's "
            f"commit): commit or stash them first. Changed: {' '.join(changed.split()[1::2][:5])}"
        )
    commit = git(root, "rev-parse", "HEAD")
    dvc = str(Path(sys.executable).with_name("dvc"))
    has_remote = bool(
        subprocess.run([dvc, "remote", "default"], cwd=root, capture_output=True, text=True).stdout.strip()
    )
    identity = (
        subprocess.run(["git", "config", "user.name"], cwd=root, capture_output=True, text=True).stdout.strip()
        or "mnist-sweep",
        subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True).stdout.strip()
        or "mnist-sweep@localhost",
    )
    cache_dir = None
    if not args.address:
        cache_dir = subprocess.run([dvc, "cache", "dir"], cwd=root, capture_output=True, text=True).stdout.strip()
        cache_dir = cache_dir or str(root / ".dvc" / "cache")
    git_url = git(root, "remote", "get-url", "origin") if args.address else str(root)

    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    key = sweep_key(text, commit)
    state_root = (root / STATE_DIR).resolve()
    state_path = state_root / sweep.name
    state_file = state_root / f"{sweep.name}.{STATE_FILE}"
    records_path = state_root / f"{sweep.name}.{RESULTS_FILE}"
    previous = json.loads(state_file.read_text()) if state_file.exists() else {}
    if previous and previous.get("key") != key:
        raise PipelineError(
            f"a sweep named {sweep.name!r} was already run with another definition or commit; give this one "
            f"another name, or delete {state_path} and {state_file} to start it again."
        )

    # The store before Ray, so that a store that refuses this user fails before Ray's start-up; Ray
    # before the sweep's run, so that a Ray that fails to start leaves no MLflow run open.
    store.quiet_links(uri)
    client, experiment_id = store.open_store(uri, settings.experiment, store.artifact_location(uri, root))
    start_ray(args.address)
    if previous:
        parent_run_id = previous["parent_run_id"]
        client.update_run(parent_run_id, status="RUNNING")
        logger.info("resuming sweep %s (MLflow run %s)", sweep.name, parent_run_id)
    else:
        parent = client.create_run(
            experiment_id,
            run_name=f"sweep {sweep.name}",
            tags={**tags.git_info(root), SWEEP_TAG: sweep.name, "sweep.key": key},
        )
        parent_run_id = parent.info.run_id
        client.log_text(parent_run_id, text, "sweep.yaml")
        definition = {f"sweep.{k}": v for k, v in dataclasses.asdict(sweep).items() if k != "parameters"}
        for name, parameter in sweep.parameters.items():
            definition[f"sweep.{name}"] = f"{parameter.kind} {list(parameter.values)}"
        for name, value in definition.items():
            client.log_param(parent_run_id, name, str(value))
        state_root.mkdir(parents=True, exist_ok=True)
        records_path.unlink(missing_ok=True)
        state_file.write_text(json.dumps({"key": key, "parent_run_id": parent_run_id}))

    setup = TrialSetup(
        git_url=git_url,
        commit=commit,
        sweep_name=sweep.name,
        metric=sweep.metric,
        tracking_uri=uri,
        settings={"MLFLOW_EXPERIMENT_NAME": settings.experiment, "MNIST_REGISTERED_MODEL": settings.registered_model},
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        cache_dir=cache_dir,
        dvc_remote=bool(args.address) and has_remote,
        git_identity=identity,
    )
    total = sweep.grid_size() if sweep.search == "grid" else sweep.trials
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 1})
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=str(state_root),
        failure_config=tune.FailureConfig(max_failures=sweep.retries),
        callbacks=[trial_recorder(records_path, total, sweep.metric)],
    )
    interrupted, results = False, None
    try:
        if tune.Tuner.can_restore(str(state_path)):
            tuner = tune.Tuner.restore(str(state_path), trainable, resume_unfinished=True, resume_errored=True)
        else:
            if sweep.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch

                searcher: Any = ConcurrencyLimiter(
                    OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seed),
                    max_concurrent=sweep.max_concurrent,
                )
            else:
                searcher = BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=sweep.seed)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(sweep),
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=1 if sweep.search == "grid" else sweep.trials,
                ),
                run_config=run_config,
            )
        results = tuner.fit()
        # Ray Tune returns from a Ctrl-C too, having stopped the trials still running: a trial that
        # neither reported nor failed for good is one it stopped.
        interrupted = len(read_trial_records(records_path)) < total
    except KeyboardInterrupt:
        interrupted = True
    finally:
        ray.shutdown()
        # Whatever ended the sweep, no run of it stays RUNNING.
        if interrupted or results is None:
            reason, status = "the sweep was interrupted or failed", "KILLED" if interrupted else "FAILED"
        else:
            reason, status = "its trial's worker stopped before the run ended", "FAILED"
        for run_id in close_unfinished_runs(client, experiment_id, parent_run_id, status, reason):
            logger.warning("closed MLflow run %s: %s", run_id, reason)
        if interrupted or results is None:
            client.set_terminated(parent_run_id, status)
    if interrupted or results is None:
        raise KeyboardInterrupt

    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    runs_by_trial: dict[str, Any] = {}
    for run in sorted(children, key=lambda run: run.info.start_time):
        if run.info.status == "FINISHED" or run.data.tags.get(TRIAL_TAG) not in runs_by_trial:
            runs_by_trial[run.data.tags.get(TRIAL_TAG, "")] = run
    rows = ranking(trial_rows(read_trial_records(records_path), runs_by_trial, sweep), sweep.metric, sweep.mode)
    columns = ["rank", "trial", *sweep.parameters, sweep.metric, "experiment", "node", "mlflow run", "status"]
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    table = format_table(rows, columns)
    client.log_text(parent_run_id, table + "\n", "ranking.md")
    client.log_text(parent_run_id, json.dumps(rows, indent=1, default=str) + "\n", "ranking.json")
    with tempfile.TemporaryDirectory() as directory:
        plot = Path(directory) / "results.png"
        plot.write_bytes(results_plot(rows, sweep.parameters, sweep.metric))
        client.log_artifact(parent_run_id, str(plot))
    best = rows[0] if rows and rows[0]["status"] == "ok" else None
    if best is not None:
        client.log_metric(parent_run_id, f"best_{sweep.metric}", best[sweep.metric])
        client.set_tag(parent_run_id, "sweep.best_experiment", best["experiment"])
    # A sweep none of whose trials succeeded found nothing: its run and exit status say it failed.
    client.set_terminated(parent_run_id, "FINISHED" if best is not None else "FAILED")
    print(f"\nSweep {sweep.name}: {len(rows)} trials, ranked by {sweep.metric} ({sweep.mode})\n{table}")
    if best is not None:
        chosen = " ".join(f"{key}={best[key]}" for key in sweep.parameters)
        print(f"\nBest: {best['experiment']}: {chosen} ({sweep.metric} {best[sweep.metric]:.6g})")
        print(f"Apply it with: dvc exp apply {best['experiment']}")
    print(f"MLflow: sweep run {parent_run_id} in {redact(uri)}")
    if best is None:
        raise PipelineError(f"no trial of sweep {sweep.name} succeeded; the table above says why each one failed.")


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``mnist-sweep`` command: errors as one paragraph, Ctrl-C as a short message."""
    configure_logging()
    try:
        main(argv)
    except PipelineError as error:
        print(format_error(str(error)), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(
            "error: interrupted; unfinished trials' runs were marked KILLED. Run the same command again to "
            "resume: finished trials are not run again.",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    cli()
