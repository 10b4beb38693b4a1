"""What every command-line entry point shares: its path arguments, logging, and clean error exits.

A stage's ``main()`` raises :class:`PipelineError` for anything the user can fix (bad params, bad
data, an unreachable server). :func:`run` prints that as one paragraph on stderr and exits non-zero,
so users never see a traceback for their own mistakes. The process then ends normally, so that
atexit handlers and the libraries' own clean-up (TensorFlow's temporary files, MLflow's queues) run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# How often a stage started by DVC checks that the dvc process is still there.
OWNER_CHECK_SECONDS = 1.0


class PipelineError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def configure_logging() -> None:
    level = os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


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
    paragraph = " ".join(str(message).split())
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
    except KeyboardInterrupt:
        reason = (
            f"the dvc process that started this stage (pid {owner}) has ended" if owner_gone.is_set() else "interrupted"
        )
        print(
            format_error(f"{reason}; stopped, and no partial output was left behind.{dvc_outputs_note()}"),
            file=sys.stderr,
        )
        sys.exit(130)
