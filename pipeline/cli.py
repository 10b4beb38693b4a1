"""What every command-line entry point shares: logging set-up and turning errors into clean exits.

A stage's ``main()`` raises :class:`PipelineError` for anything the user can fix (bad params, bad
data, an unreachable server). :func:`run` prints that as one paragraph on stderr and exits non-zero,
so users never see a traceback for their own mistakes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable


class PipelineError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def configure_logging() -> None:
    level = os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def format_error(message: str) -> str:
    """Wrap an error into one readable paragraph."""
    paragraph = " ".join(str(message).split())
    return textwrap.fill(f"error: {paragraph}", width=100, subsequent_indent="  ")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def exit_now(code: int) -> None:
    """Flush what was printed and logged, then end the process without tearing the interpreter down.

    Unloading TensorFlow, MLflow and their thousands of modules at exit takes 0.5-2 s and serves no
    purpose once a stage's outputs are written (each one atomically, and closed) and its MLflow run
    ended. Only entry points call this, once their work is complete.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(main: Callable[[], None], error_exit_code: int = 1) -> None:
    """Run a stage's main(), turning PipelineError and Ctrl-C into a message and an exit code."""
    configure_logging()
    # `kill` (SIGTERM) takes the same clean path as Ctrl-C: temp files are removed and an open
    # MLflow run is marked FAILED instead of being left RUNNING.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        main()
    except PipelineError as error:
        print(format_error(str(error)), file=sys.stderr)
        exit_now(error_exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was left behind.", file=sys.stderr)
        exit_now(130)
    exit_now(0)
