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
from collections.abc import Callable, Sequence
from pathlib import Path


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
        sys.exit(error_exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was left behind.", file=sys.stderr)
        sys.exit(130)
