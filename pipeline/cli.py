"""What every command-line entry point shares: its path arguments, logging, and clean error exits.

A stage's ``main()`` raises :class:`PipelineError` for anything the user can fix (bad params, bad
data, an unreachable server). :func:`run` prints that as one paragraph on stderr and exits non-zero,
so users never see a traceback for their own mistakes. The process then ends normally, so that
atexit handlers and the libraries' own clean-up (TensorFlow's temporary files, MLflow's queues) run.

Secrets never leave the environment: :func:`redact` is the one place that turns a URI, or any text
that may hold one, into its printable form, and every error paragraph and log line goes through it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

# How often a stage started by DVC checks that the dvc process is still there.
OWNER_CHECK_SECONDS = 1.0
MASK = "***"
# A URI's scheme and authority (user:password@host:port): the user information ends at the last @.
AUTHORITY = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^\s/?#@]*(?:@[^\s/?#@]*)*)@", re.IGNORECASE)
# A query parameter whose name says it holds a secret (?password=…, &access_token=…, &X-Amz-Signature=…).
SECRET_QUERY = re.compile(r"([?&;][^=&#\s]*(?:pass|pwd|token|secret|key|sig|credential|auth)[^=&#\s]*=)[^&#\s'\"]+",
                          re.IGNORECASE)  # fmt: skip
# Variables whose values are secrets, and variables holding URIs whose passwords are: their values
# are masked wherever they appear, also outside a URI (a driver's error may quote a password alone).
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MNIST_MIRROR", "MNIST_PYPI_INDEX_URL")
# Shorter secrets are not searched for outside URIs: they would mask ordinary words.
SHORTEST_SECRET = 4


class PipelineError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def _mask_user_information(match: re.Match) -> str:
    user, colon, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}:{MASK}@" if colon else f"{match.group(1)}{MASK}@"


def known_secrets(environ: Mapping[str, str] = os.environ) -> set[str]:
    """The secrets the environment gives the pipeline: MLflow's password and token, and its URIs' passwords."""
    found = {environ.get(name, "") for name in SECRET_VARIABLES}
    for name in URI_VARIABLES:
        try:
            password = urlsplit(environ.get(name, "")).password or ""
        except ValueError:
            continue
        found |= {password, unquote(password)}
    return {secret for secret in found if len(secret) >= SHORTEST_SECRET}


def redact(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """``text`` (a URI, or a message that may quote one) with its credentials masked.

    ``scheme://user:password@host`` becomes ``scheme://user:***@host`` (a user alone, which is often
    a token, becomes ``***@``), secret query values (``?password=``, ``&token=``…) become ``***``,
    and the secrets of :func:`known_secrets` are masked wherever they appear. No library masks URIs
    inside free text (SQLAlchemy's ``URL.render_as_string`` masks only its own URLs' passwords).
    """
    text = SECRET_QUERY.sub(rf"\1{MASK}", AUTHORITY.sub(_mask_user_information, str(text)))
    for secret in sorted(known_secrets(environ), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def configure_logging() -> None:
    level = os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # Every log record, whichever library makes it and whichever handler prints it (MLflow's own
    # loggers do not propagate to ours), is masked when it is made.
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record  # A malformed call: the handler reports it as logging does.
        if (masked := redact(message)) != message:
            record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(redacted_record)


def path_arguments(description: str, names: Sequence[str], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a stage's command line: one required ``--name PATH`` per name, as dvc.yaml passes them.

    ``description`` is the stage module's docstring, whose first line becomes the ``--help`` summary.
    Dashes in names become underscores in the result (``--test-probabilities`` → ``test_probabilities``).
    """
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    for name in names:
        parser.add_argument(f"--{name}", type=Path, required=True, metavar="PATH")
    return parser.parse_args(argv)


def format_error(message: str) -> str:
    """Wrap an error into one readable paragraph."""
    paragraph = " ".join(redact(message).split())
    # Paths must survive the wrapping whole, so lines break only at spaces.
    return textwrap.fill(
        f"error: {paragraph}", width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (which tells a pid's reuse apart), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces; the fields after it are plain numbers.
    return stat.rpartition(")")[2].split()[19]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def dvc_process() -> int | None:
    """The dvc process that started this stage, or None when DVC did not start it (or on a system without /proc).

    DVC sets $DVC_STAGE for the commands it runs and runs each through ``$SHELL -c`` (``/bin/sh``
    without $SHELL), which some shells replace by the command and others keep as our parent. So the
    dvc process is our parent, or our grandparent when the parent is that shell.
    """
    if not os.environ.get("DVC_STAGE") or not Path("/proc/self/stat").exists():
        return None
    parent = os.getppid()
    shell = os.path.realpath(os.environ.get("SHELL") or "/bin/sh")
    try:
        if os.path.realpath(f"/proc/{parent}/exe") == shell:
            parent = _parent(parent)
    except OSError:
        return None
    return parent if parent > 1 else None


def watch_owner(pid: int, interval: float = OWNER_CHECK_SECONDS) -> threading.Event:
    """Interrupt this process (as SIGTERM does) once process ``pid`` has ended; return the event set then.

    A supervisor that sends SIGTERM to ``dvc`` alone ends DVC at once, without passing the signal on
    to the stage it is running; the stage would go on as an orphan and write its outputs after DVC
    has gone. Linux tells a child when its parent dies (PR_SET_PDEATHSIG), but DVC's shell can sit
    between the two, so the stage checks on the dvc process itself.
    """
    started = _start_time(pid)
    gone = threading.Event()

    def watch() -> None:
        while _start_time(pid) == started:
            time.sleep(interval)
        gone.set()
        os.kill(os.getpid(), signal.SIGTERM)

    if started is not None:
        threading.Thread(target=watch, name="dvc-watch", daemon=True).start()
    return gone


def dvc_outputs_note() -> str:
    """What a failed stage run by DVC means for its outputs, which DVC deletes before it runs a stage."""
    if not os.environ.get("DVC_STAGE"):
        return ""
    return (
        " (DVC removed this stage's previous outputs before running it; `dvc checkout` brings back the last "
        "good ones from its cache.)"
    )


def run(main: Callable[[], None], error_exit_code: int = 1) -> None:
    """Run a stage's main(), turning PipelineError and Ctrl-C into a message and an exit code."""
    configure_logging()
    # `kill` (SIGTERM) takes the same clean path as Ctrl-C: temp files are removed and an open
    # MLflow run is marked FAILED instead of being left RUNNING.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # A shell without job control starts background commands with SIGINT ignored, and Python then
    # leaves it ignored; Ctrl-C (or `kill -INT`) must stop a stage the same clean way wherever it runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    owner = dvc_process()
    owner_gone = watch_owner(owner) if owner is not None else threading.Event()
    try:
        main()
    except PipelineError as error:
        print(format_error(f"{error}{dvc_outputs_note()}"), file=sys.stderr)
        sys.exit(error_exit_code)
    except KeyboardInterrupt as interrupt:
        reason = (
            f"the dvc process that started this stage (pid {owner}) has ended" if owner_gone.is_set() else "interrupted"
        )
        # What the stage did on its way out (an MLflow run marked FAILED), when it says.
        detail = f" {interrupt}." if interrupt.args else ""
        print(
            format_error(f"{reason}; stopped, and no partial output was left behind.{detail}{dvc_outputs_note()}"),
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        # Python's last garbage collection, at exit, walks every object TensorFlow, Keras and MLflow
        # created: 1-3 s on a 2-core machine, most of the time a stopped stage takes to end. Frozen
        # objects are skipped; the process's end frees them (atexit handlers still run as usual).
        gc.freeze()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null while the block runs.

    TensorFlow's C++ start-up lines ("oneDNN custom operations are on" on CPUs where it enables
    oneDNN, absl's "All log messages before absl::InitializeLog()") are written while it is imported,
    whatever TF_CPP_MIN_LOG_LEVEL says (tensorflow/tensorflow#100442). Its real failures reach
    Python as exceptions, which are reported after the block. Python's import-time profile, which
    tests/test_dependencies.py reads from stderr, is left alone.
    """
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
