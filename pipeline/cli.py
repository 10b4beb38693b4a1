"""What every entry point shares: path arguments, logging with secrets masked, and :func:`run`, which prints a
:class:`PipelineError` (what the user can fix) as one paragraph without a traceback and exits non-zero."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import select
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil  # installed with DVC

MASK = "***"
# A URI's scheme and user information (user:password@), which ends at the authority's last @.
AUTHORITY = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^\s/?#@]*(?:@[^\s/?#@]*)*)@", re.IGNORECASE)
# A query parameter whose name says it holds a secret (?password=…, &access_token=…, &X-Amz-Signature=…).
SECRET_QUERY = re.compile(
    r"([?&;][^=&#\s]*(?:pass|pwd|token|secret|key|sig|credential|auth)[^=&#\s]*=)[^&#\s'\"]+", re.IGNORECASE
)


class PipelineError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def redact(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """``text`` with URIs' user information, secret query values and the environment's passwords and tokens masked."""
    text = AUTHORITY.sub(lambda m: f"{m[1]}{m[2].split(':')[0] + ':' if ':' in m[2] else ''}{MASK}@", str(text))
    text = SECRET_QUERY.sub(rf"\1{MASK}", text)
    secrets = {environ.get(name, "") for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
    for name in ("MLFLOW_TRACKING_URI", "MNIST_MIRROR", "MNIST_PYPI_INDEX_URL"):
        with contextlib.suppress(ValueError):
            password = urlsplit(environ.get(name, "")).password or ""
            secrets |= {password, unquote(password)}
    # Shorter secrets would mask ordinary words.
    for secret in sorted((secret for secret in secrets if len(secret) >= 4), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def configure_logging() -> None:
    level = getattr(logging, os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # MLflow's INFO notes and progress bars (copying files into the model) are no results; set before its import.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Records are masked when made, whichever logger or handler (MLflow's do not propagate to ours).
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        with contextlib.suppress(TypeError, ValueError):  # A malformed call: logging reports it as usual.
            if (masked := redact(message := record.getMessage())) != message:
                record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(redacted_record)


def path_arguments(description: str, names: Sequence[str], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """A stage's ``--name PATH`` arguments, all required, as dvc.yaml passes them (``--a-b`` → ``a_b``)."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    for name in names:
        parser.add_argument(f"--{name}", type=Path, required=True, metavar="PATH")
    return parser.parse_args(argv)


def format_error(message: str) -> str:
    """One masked paragraph, broken only at spaces so that paths stay whole."""
    text = "error: " + " ".join(redact(message).split())
    return textwrap.fill(text, 100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


def watch_dvc() -> tuple[int | None, threading.Event]:
    """The dvc process running this stage (not DVC's ``$SHELL -c``), if any, and an event set when it ends."""
    pid, gone = os.getppid(), threading.Event()
    with contextlib.suppress(psutil.Error):
        if psutil.Process(pid).exe() == os.path.realpath(os.environ.get("SHELL") or "/bin/sh"):
            pid = psutil.Process(pid).ppid()

    def watch(pidfd: int) -> None:
        select.select([pidfd], [], [])
        gone.set()
        os.kill(os.getpid(), signal.SIGTERM)

    if not os.environ.get("DVC_STAGE") or pid <= 1:
        return None, gone
    with contextlib.suppress(AttributeError, OSError):  # Gone already, or no pidfd (Linux < 5.3, macOS).
        threading.Thread(target=watch, args=(os.pidfd_open(pid),), name="dvc-watch", daemon=True).start()
    return pid, gone


def run(main: Callable[[], None], error_exit_code: int = 1) -> None:
    """Run a stage's main(), turning PipelineError and Ctrl-C or SIGTERM into one paragraph and an exit code."""
    configure_logging()
    # SIGTERM takes Ctrl-C's clean path (temp files removed, the MLflow run marked FAILED). SIGINT is
    # reset because a shell without job control starts background commands with it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    owner, owner_gone = watch_dvc()
    note = " (DVC removed this stage's previous outputs before running it; `dvc checkout` brings back the last good "
    note = f"{note}ones from its cache.)" if os.environ.get("DVC_STAGE") else ""
    try:
        main()
    except PipelineError as error:
        print(format_error(f"{error}{note}"), file=sys.stderr)
        sys.exit(error_exit_code)
    except KeyboardInterrupt as stop:
        reason = f"the dvc process that started this stage (pid {owner}) has ended" if owner_gone.is_set() else ""
        detail = f" {stop}." if stop.args else ""  # What the stage did on its way out (a run marked FAILED).
        message = f"{reason or 'interrupted'}; stopped, and no partial output was left behind.{detail}{note}"
        print(format_error(message), file=sys.stderr)
        sys.exit(130)
    finally:
        # Python's last collection at exit walks every TensorFlow, Keras and MLflow object (1-3 s on 2 cores).
        gc.freeze()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Native writes to fd 2 go to /dev/null (TensorFlow's start-up lines), except an import-time profile."""
    if os.environ.get("PYTHONPROFILEIMPORTTIME") or "importtime" in sys._xoptions:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
