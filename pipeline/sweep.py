"""Hyperparameter sweeps on Ray Tune: each trial a DVC experiment and an MLflow run nested under the sweep's.

Trials run in clones of the sweep's commit, here or on a Ray cluster; the same command resumes a stopped sweep."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from subprocess import DEVNULL, STDOUT
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import psutil  # installed with DVC
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline import files
from pipeline.cli import PipelineError, redact, run
from pipeline.params import MODEL_THREADS, credential_keys, load_params, parse_yaml, read_params, tracking_settings
from pipeline.score import SCORES
from pipeline.tracking import record, store, tags

STATE_DIR = Path(".dvc/tmp/sweeps")
SWEEP_TAG, TRIAL_TAG, NODE_TAG, HOST_TAG = "sweep.name", "sweep.trial", "sweep.node", "sweep.host"
PARENT_TAG, RESTORED_TAG, STOPPED_TAG = "mlflow.parentRunId", "sweep.restored_from", "sweep.stopped_early"
# How often a trial looks for its run's new evaluations: a dense model trains ~1,000 steps a second, so a stop must
# come within a fraction of one for the trial to end near its rung. Once the run is found, a poll is one small query.
POLL_SECONDS = 0.2
MAX_TRIALS = 10_000

Whole = Annotated[int, Field(strict=True)]
Bound = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int64 = Annotated[Whole, Field(ge=-(2**62), le=2**62)]  # NumPy draws randint as 64-bit integers


class Distribution(BaseModel, extra="forbid"):
    """``values``: a list (a grid axis, or a uniform choice); the others: [low, high] (randint excludes high)."""

    values: Annotated[list, Field(min_length=1)] | None = None
    uniform: tuple[Bound, Bound] | None = None
    loguniform: tuple[Annotated[Bound, Field(gt=0)], Annotated[Bound, Field(gt=0)]] | None = None
    randint: tuple[Int64, Int64] | None = None
    kind = property(lambda self: next(kind for kind, value in self if value is not None))
    bounds = property(lambda self: getattr(self, self.kind))

    @model_validator(mode="after")
    def one_kind(self) -> Distribution:
        if sum(value is not None for _, value in self) != 1:
            raise ValueError("give exactly one of values, uniform, loguniform, randint")
        if self.kind != "values" and self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"{self.kind} needs low < high, got {list(self.bounds)}")
        return self


class Scheduler(BaseModel, extra="forbid"):
    """Ray Tune's ASHA: at steps grace_period x reduction_factor^k, a trial below the best 1/reduction_factor stops."""

    kind: Literal["asha"] = "asha"
    grace_period: Annotated[Whole, Field(ge=1)] = 1000  # training steps
    reduction_factor: Annotated[Whole, Field(ge=2, le=100)] = 3


class Sweep(BaseModel, extra="forbid"):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=100)]  # it names DVC experiments (git refs)
    search: Literal["grid", "random", "optuna"] = "grid"
    trials: Annotated[Whole, Field(ge=1, le=MAX_TRIALS)] = 1
    seed: Annotated[Whole, Field(ge=0, lt=2**32)] | None = None
    metric: Literal[SCORES] = "test_accuracy"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    max_concurrent: Annotated[Whole, Field(ge=1, le=1000)] = 1
    retries: Annotated[Whole, Field(ge=0, le=100)] = 2
    scheduler: Scheduler | None = None
    parameters: Annotated[dict[str, Distribution], Field(min_length=1)]

    @field_validator("parameters")
    @classmethod
    def keys_of_params_yaml(cls, parameters: dict[str, Distribution], info: ValidationInfo) -> dict:
        problems, params, grid = [], (info.context or {})["params"], info.data.get("search") == "grid"
        for key, spec in parameters.items():
            section, _, field = key.partition(".")
            if not isinstance(params.get(section), dict) or field not in params[section]:
                problems.append(f"{key} is not a key of params.yaml (section.key)")
            elif spec.kind != "values" and grid:
                problems.append(f"{key}: a grid search takes only values, not {spec.kind}")
            elif spec.kind in ("uniform", "loguniform") and type(params[section][field]) is int:
                problems.append(f"{key}: {spec.kind} draws fractions, but params.yaml holds a whole number there")
        if grid and not problems and (size := math.prod(len(spec.bounds) for spec in parameters.values())) > MAX_TRIALS:
            problems.append(f"the grid has {size:,} combinations, more than the {MAX_TRIALS:,} a sweep may run")
        if problems:
            raise ValueError("; ".join(problems))
        return parameters

    @model_validator(mode="after")
    def scheduled_metric(self) -> Sweep:
        if self.scheduler and self.metric != "test_accuracy":
            raise ValueError("a scheduler needs a metric the train stage logs while it trains: test_accuracy")
        return self

    @property
    def total(self) -> int:  # a grid's combinations, or the random or optuna draws
        grid = math.prod(len(spec.bounds) for spec in self.parameters.values())
        return grid if self.search == "grid" else self.trials


def parse_sweep(text: str, params: Mapping[str, Any]) -> Sweep:
    """Validate a sweep definition against the project's params.yaml, reporting every problem at once."""
    raw = parse_yaml(text, "the sweep file")
    # The file is committed and uploaded to the sweep's MLflow run.
    problems = [f"{key} must not hold credentials; keep them in the environment" for key in credential_keys(raw)]
    try:
        sweep = Sweep.model_validate(raw, context={"params": params})
    except ValidationError as error:
        for found in error.errors():
            where = ".".join(map(str, found["loc"]))[:100] or "the file"
            problems.append(f"{where}: {found['msg'].removeprefix('Value error, ')}")
    if problems:
        raise PipelineError("the sweep file is invalid: " + "; ".join(problems) + ".")
    return sweep


def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    values = tune.grid_search if sweep.search == "grid" else tune.choice
    space = {
        key: getattr(tune, spec.kind)(*spec.bounds) for key, spec in sweep.parameters.items() if spec.kind != "values"
    }
    return space | {key: values(spec.bounds) for key, spec in sweep.parameters.items() if spec.kind == "values"}


def set_param_arguments(config: Mapping[str, Any]) -> list[str]:
    # Ray's samplers give NumPy scalars; dvc needs YAML literals that read back as the same number.
    plain = {key: value.item() if hasattr(value, "item") else value for key, value in sorted(config.items())}
    return [f"--set-param={key}={value}" for key, value in plain.items()]  # str() of a float is its repr()


def failure_message(output: str) -> str:
    """The pipeline's own `error:` paragraph from a failed command's output, else its last lines."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("error: "):
            return " ".join([line] + [more.strip() for more in lines[index + 1 :] if more.startswith("  ")])[:400]
    return " ".join(lines[-3:])[:400]


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, the same on every machine."""

    prepare: list[list[str]]  # clone the sweep's commit (and share this machine's DVC cache)
    remote: bool  # data come from, and outputs go to, the default DVC remote
    env: dict[str, str]  # the tracking settings and git identity, for machines without them
    tags: dict[str, str]  # of every trial's run
    metric: str
    experiment_id: str
    iterations: int  # params.yaml's train.iterations, the last step of a trial that does not set it


def trial_run(client: Any, setup: TrialSetup, trial: str, condition: str = "") -> Any | None:
    """The latest MLflow run of the sweep's ``trial`` that meets ``condition`` (``and ...``), if it has one yet."""
    query = f"tags.`{PARENT_TAG}` = '{setup.tags[PARENT_TAG]}' and tags.`{TRIAL_TAG}` = '{trial}' {condition}"
    runs = client.search_runs([setup.experiment_id], query, max_results=1, order_by=["start_time DESC"])
    return runs[0] if runs else None


def trial_trainable() -> type:
    """Ray Tune's class for one trial: a pipeline in a temporary clone, reporting each evaluation its run logs."""
    import ray
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from ray import tune

    class Trial(tune.Trainable):
        def setup(self, config: dict[str, Any], setup: TrialSetup) -> None:  # type: ignore[override]
            node, self.options = ray.get_runtime_context().get_node_id(), setup
            self.experiment, self.reported, self.process = f"{setup.tags[SWEEP_TAG]}-{self.trial_id}", 0, None
            self.run_tags = {**setup.tags, TRIAL_TAG: self.trial_id, NODE_TAG: node, HOST_TAG: socket.gethostname()}
            self.result = {"experiment": self.experiment, "node": node[:8], setup.metric: math.nan, "error": ""}
            self.last_step, self.run_id = config.get("train.iterations", setup.iterations), None
            # This attempt's run starts after this moment, by this machine's clock (its train stage runs here).
            self.this_attempt = f"and attributes.start_time >= {record.timestamp_ms()}"
            # This worker's environment runs dvc and the stages, wherever the worker is.
            path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            self.env = {**os.environ, **setup.env, "PATH": path, record.EXTRA_TAGS_VARIABLE: json.dumps(self.run_tags)}
            prefix = f"mnist-sweep-{self.trial_id}-"
            self.directory = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
            self.workdir = Path(self.directory.name)
            self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (not a pipe, which the stages' lines could fill)
            self.client = MlflowClient(setup.env["MLFLOW_TRACKING_URI"])
            pull = ["--pull"] if setup.remote else []
            self.run = ["dvc", "exp", "run", *pull, "--name", self.experiment, *set_param_arguments(config)]
            if all(map(self.succeeded, setup.prepare)):
                self.process = self.started(self.run)

        def started(self, command: list[str]) -> subprocess.Popen:
            """``command`` started in the trial's clone, its output in the emptied log."""
            self.log.seek(0)
            self.log.truncate()
            # Ray's workers block SIGINT, and a child inherits the blocked mask: the pipeline would never see the
            # Ctrl-C that stops it and would train to its end. Unblocked in this thread while it forks the child. The
            # child stays in the worker's process group, which Ray ends whole if the worker dies: none outlives it.
            blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            try:
                return subprocess.Popen(
                    command, cwd=self.workdir, env=self.env, stdout=self.log, stderr=STDOUT, stdin=DEVNULL
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

        def succeeded(self, command: list[str], process: subprocess.Popen | None = None) -> bool:
            """Whether ``command`` (run now, unless ``process`` runs it) succeeded; else its error in the result."""
            returncode = (process or self.started(command)).wait()
            if returncode:
                self.log.seek(0)
                self.result["error"] = redact(failure_message(self.log.read())) or f"{' '.join(command[:3])} failed"
            return not returncode

        def evaluation(self) -> Any | None:
            """The earliest new point of the metric's history in this trial's MLflow run, before its last step."""
            if self.run_id is None:
                found = trial_run(self.client, self.options, self.trial_id, self.this_attempt)
                self.run_id = found and found.info.run_id
            key = record.HISTORY_PREFIX + self.options.metric
            history = self.client.get_metric_history(self.run_id, key) if self.run_id else []
            points = [point for point in history if self.reported < point.step < self.last_step]
            return min(points, key=lambda point: point.step, default=None)

        def step(self) -> dict[str, Any]:
            while self.process and self.process.poll() is None:
                if point := self.evaluation():
                    self.reported = point.step
                    return self.result | {self.options.metric: point.value, "step": point.step, "final": False}
                time.sleep(POLL_SECONDS)
            if self.process and self.succeeded(self.run, self.process):
                cache = [] if self.options.remote else ["--no-cache"]
                if self.succeeded(["dvc", "exp", "push", "--force", *cache, "origin", self.experiment]):
                    metrics = json.loads((self.workdir / "metrics/metrics.json").read_text())
                    self.result[self.options.metric] = metrics[self.options.metric]
                    self.record_restored_run()
            return self.result | {"step": self.last_step, "final": True, "done": True}

        def record_restored_run(self) -> None:
            """Give a trial that DVC restored from its run cache its run, copied from the run that trained it."""
            if trial_run(self.client, self.options, self.trial_id, "and attributes.status = 'FINISHED'"):
                return
            digest = record.sha256((self.workdir / "models" / "test_probabilities.npy").read_bytes())
            uri, experiment_id = self.options.env["MLFLOW_TRACKING_URI"], self.options.experiment_id
            earlier = record.find_training_run(self.client, experiment_id, digest, uri)
            # Not the pipeline's own tags: the output digests must keep leading to the run that holds the outputs.
            kept = {
                k: v for k, v in earlier.data.tags.items() if k.split(".")[0] not in ("mlflow", "sweep", "pipeline")
            }
            run_tags = {**kept, **tags.git_info(self.workdir), **self.run_tags, "dvc.experiment": self.experiment}
            run_tags[RESTORED_TAG] = earlier.info.run_id
            run_id = self.client.create_run(experiment_id, run_name=earlier.info.run_name, tags=run_tags).info.run_id
            now, final = record.timestamp_ms(), earlier.data.metrics.items()
            metrics = [
                Metric(key, value, now, 0) for key, value in final if not key.startswith(record.RUN_OWN_PREFIXES)
            ]
            self.client.log_batch(run_id, metrics, [Param(key, value) for key, value in earlier.data.params.items()])
            self.client.set_terminated(run_id, "FINISHED")

        def cleanup(self) -> None:  # after the last step, or when Ray stops the trial (the scheduler, a Ctrl-C)
            # Stopped as Ctrl-C would stop it: its stage ends its MLflow run and leaves no half output.
            if self.process and self.process.poll() is None:
                pipeline = psutil.Process(self.process.pid)  # not yet reaped: it exists, if only as a zombie
                for process in [*pipeline.children(recursive=True), pipeline]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.directory.cleanup()

    return Trial


def stopped_early(metrics: Mapping[str, Any]) -> str:
    """Why the scheduler stopped this trial (Ray marks its last, intermediate result done), else ""."""
    stopped = metrics.get("done") and metrics.get("final") is False
    return f"stopped early by the scheduler at step {metrics['step']}" if stopped else ""


def mark_stopped(client: Any, setup: TrialSetup, experiment: str, reason: str) -> None:
    """A stopped trial's run ends KILLED (its interrupted stage said FAILED) and says why; its history stays."""
    deadline, trial = time.monotonic() + 60, experiment.rpartition("-")[2]
    # Ray returns before the last stopped trial's stage has ended its run, which would then overwrite the status.
    while (found := trial_run(client, setup, trial)) and found.info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    if found:
        client.set_tag(found.info.run_id, STOPPED_TAG, reason)
        client.set_terminated(found.info.run_id, "KILLED")


def ranking(results: list[Any], sweep: Sweep) -> Any:
    """Ray Tune's results of the ended trials as the table's rows: finished best first, then stopped, then failed."""
    import pandas as pd

    def row(result: Any) -> dict[str, Any]:
        metrics, config = result.metrics or {}, result.config or {}
        error = result.error and f"error: {store.short(str(result.error).splitlines()[-1])}"
        status = error or (f"failed: {metrics['error']}" if metrics.get("error") else stopped_early(metrics) or "ok")
        cells = {key: config.get(key) for key in sweep.parameters} | {sweep.metric: metrics.get(sweep.metric, math.nan)}
        return cells | {key: metrics.get(key, "-") for key in ("experiment", "node")} | {"status": status}

    rows = pd.DataFrame([row(result) for result in results])
    rows["order"] = rows["status"].map(lambda status: 0 if status == "ok" else 1 if status.startswith("stopped") else 2)
    by = ["order", sweep.metric, "experiment"]
    rows = rows.sort_values(by, ascending=[True, sweep.mode == "min", True], na_position="last").drop(columns="order")
    rows.insert(0, "rank", range(1, len(rows) + 1))
    return rows


def output(root: Path, *command: str, check: bool = True) -> str:
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise PipelineError(f"{' '.join(command[:3])} failed in {root}: {store.short(done.stderr)}")
    return done.stdout.strip()


def cluster_problems(uri: str, root: Path) -> list[str]:
    """Why this project cannot sweep on a cluster, whose trials run on other machines."""
    problems = []
    if urlparse(uri).scheme not in ("http", "https", "databricks"):
        problems.append(
            f"the MLflow store is {redact(uri)}, a local store that trials on other machines cannot "
            "write to; start a tracking server and set MLFLOW_TRACKING_URI=http://<server>:5000"
        )
    if "origin" not in output(root, "git", "remote").split():
        problems.append("the repository has no git remote 'origin' for the trials to clone and push experiments to")
    elif not output(root, "git", "branch", "-r", "--contains", "HEAD"):
        problems.append("the current commit is not on the git remote 'origin' yet, so trials cannot check it out")
    return problems


def start_ray(address: str) -> Any:
    """Join the cluster at ``address``, or start Ray on this machine, again if its start-up timed out."""
    if address:  # Set before Ray's import, which reads some of them.
        # One join attempt (Ray's default: 20 of about 36 s each), so that a wrong --address fails in about 15 s.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "2")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "10")
    import ray

    for attempts_left in (2, 1, 0):  # Ray gives its agents 15 s to start, which a loaded machine can miss.
        try:
            # Trials report through their results; the workers' output adds only the noise of their stopping.
            return ray.init(address or None, include_dashboard=False, configure_logging=False, log_to_driver=False)
        except Exception as error:  # Ray raises a bare Exception or a ConnectionError
            ray.shutdown()
            # A node that failed to start leaves its other processes running as this process's children.
            for child in psutil.Process().children(recursive=True):
                child.kill()
            if not attempts_left or "timed out" not in str(error):
                where = f"the Ray cluster at {address}" if address else "Ray on this machine"
                raise PipelineError(f"could not start or join {where}: {store.short(str(error))}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="the sweep definition (sweeps/example.yaml)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""), help="a Ray cluster's HOST:PORT")
    args = parser.parse_args(argv)
    root = store.project_root()
    try:
        text = files.read_bytes(args.sweep).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", 0) or error
        raise PipelineError(f"cannot read the sweep file {args.sweep}: {reason}") from None
    load_params()
    settings = tracking_settings()
    params = read_params(root / "params.yaml")
    sweep = parse_sweep(text, params)
    uri = store.tracking_uri(settings.uri, root)
    if args.address and (problems := cluster_problems(uri, root)):
        raise PipelineError(f"cannot sweep on the Ray cluster at {args.address}: {'; '.join(problems)}.")
    store.check_reachable(uri)
    if changed := output(root, "git", "status", "--porcelain", "--untracked-files=no"):
        files_changed = " ".join(changed.split()[1::2][:5])
        raise PipelineError(f"commit or stash the changes first: the trials run the sweep's commit ({files_changed})")
    commit = output(root, "git", "rev-parse", "HEAD")
    key = hashlib.sha256(f"{commit}\n{text}".encode()).hexdigest()[:16]
    # Ray's state of this definition at this commit: a changed file or commit starts a new sweep.
    state, name = (root / STATE_DIR).resolve(), f"{sweep.name}-{key}"

    # The store before Ray (a store refusing this user fails fast), Ray before the run (a failed start leaves none).
    store.quiet_links(uri)
    client, experiment_id = store.open_store(uri, settings.experiment, store.artifact_location(uri, root))
    start_ray(args.address)
    import ray
    from mlflow.entities import Param
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    path = str(state / name)
    resumed = tune.Tuner.can_restore(path) and client.search_runs([experiment_id], f"tags.`sweep.key` = '{key}'")
    if resumed:
        parent_run_id = resumed[0].info.run_id
        client.update_run(parent_run_id, status="RUNNING")
    else:
        run_tags = {**tags.git_info(root), SWEEP_TAG: sweep.name, "sweep.key": key}
        parent_run_id = client.create_run(experiment_id, run_name=f"sweep {sweep.name}", tags=run_tags).info.run_id
        client.log_text(parent_run_id, text, "sweep.yaml")
        definition = sweep.model_dump(exclude={"parameters"})
        definition |= {k: f"{v.kind} {list(v.bounds)}" for k, v in sweep.parameters.items()}
        client.log_batch(parent_run_id, params=[Param(f"sweep.{k}", str(v)) for k, v in definition.items()])

    dvc = str(Path(sys.executable).with_name("dvc"))
    url = output(root, "git", "remote", "get-url", "origin") if args.address else str(root)
    prepare = [["git", "clone", "-q", "--no-checkout", url, "."], ["git", "checkout", "-q", commit]]
    if not args.address:  # trials on this machine share its DVC cache
        prepare.append(["dvc", "config", "--local", "cache.dir", output(root, dvc, "cache", "dir")])
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": settings.experiment}
    env["MNIST_REGISTERED_MODEL"] = settings.registered_model
    for what, default in (("name", "mnist-sweep"), ("email", "mnist-sweep@localhost")):  # for dvc's experiment commits
        found = output(root, "git", "config", f"user.{what}", check=False) or default
        env[f"GIT_AUTHOR_{what.upper()}"] = env[f"GIT_COMMITTER_{what.upper()}"] = found
    remote = bool(args.address and output(root, dvc, "remote", "default", check=False))
    run_tags = {PARENT_TAG: parent_run_id, SWEEP_TAG: sweep.name}
    defaults = params["train"]
    setup = TrialSetup(prepare, remote, env, run_tags, sweep.metric, experiment_id, defaults["iterations"])

    def cpus(config: dict) -> Any:  # as many cores as the model's TensorFlow threads
        return tune.PlacementGroupFactory([{"CPU": MODEL_THREADS[config.get("train.model", defaults["model"])]}])

    trainable = tune.with_resources(tune.with_parameters(trial_trainable(), setup=setup), cpus)
    status = "FAILED"
    try:
        if resumed:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher: Any = BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=sweep.seed)
            if sweep.search == "optuna":
                optuna = tune.create_searcher("optuna", metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)
                searcher = ConcurrencyLimiter(optuna, max_concurrent=sweep.max_concurrent)
            config = tune.TuneConfig(search_alg=searcher, num_samples=1 if sweep.search == "grid" else sweep.trials)
            if sweep.scheduler:
                iterations = sweep.parameters.get("train.iterations")
                last = max(iterations.bounds) if iterations else defaults["iterations"]
                asha = sweep.scheduler.model_dump(exclude={"kind"})
                config.scheduler = ASHAScheduler("step", sweep.metric, sweep.mode, max_t=last, **asha)
            failures = tune.FailureConfig(max_failures=sweep.retries)
            # A trial cannot resume a pipeline half way: it has nothing to save.
            nothing = tune.CheckpointConfig(checkpoint_at_end=False)
            storage = tune.RunConfig(name, storage_path=str(state), failure_config=failures, checkpoint_config=nothing)
            tuner = tune.Tuner(trainable, param_space=param_space(sweep), tune_config=config, run_config=storage)
        # Ray Tune returns from a Ctrl-C too, leaving the trials it stopped unended.
        results: Any = tuner.fit()
        ended = [result for result in results if result.error or (result.metrics or {}).get("done")]
        status = "FINISHED" if len(ended) >= sweep.total else "KILLED"
        for result in ended:
            if reason := stopped_early(result.metrics):
                mark_stopped(client, setup, result.metrics["experiment"], reason)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ray.shutdown()
        # Whatever ended the sweep, none of its runs stays RUNNING.
        reason = "its trial's worker stopped before the run ended" if status == "FINISHED" else "the sweep stopped"
        running = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
        for child in client.search_runs([experiment_id], running, max_results=1000):
            client.set_tag(child.info.run_id, record.CLOSED_TAG, reason)
            client.set_terminated(child.info.run_id, "FAILED" if status == "FINISHED" else status)
        if status != "FINISHED":
            client.set_terminated(parent_run_id, status)
    if status == "KILLED":
        raise KeyboardInterrupt("Unfinished trials' runs were marked KILLED; run the same command again to resume")

    rows = ranking(ended, sweep)
    table = rows.to_markdown(index=False, floatfmt=".6g")
    client.log_text(parent_run_id, table + "\n", "ranking.md")
    client.log_text(parent_run_id, rows.to_json(orient="records", indent=1), "ranking.json")
    print(f"\nSweep {sweep.name}: {len(rows)} trials, ranked by {sweep.metric} ({sweep.mode})\n{table}\n")
    if (best := rows.iloc[0])["status"] != "ok":
        client.set_terminated(parent_run_id, "FAILED")
        raise PipelineError(f"no trial of sweep {sweep.name} succeeded; the table above says why each one failed.")
    client.log_metric(parent_run_id, f"best_{sweep.metric}", best[sweep.metric])
    client.set_tag(parent_run_id, "sweep.best_experiment", best["experiment"])
    client.set_terminated(parent_run_id, "FINISHED")
    print(f"Best: {best['experiment']} ({sweep.metric} {best[sweep.metric]:.6g}): dvc exp apply {best['experiment']}")
    print(f"MLflow: sweep run {parent_run_id} in {redact(uri)}")


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
