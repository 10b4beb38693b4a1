"""Tests for pipeline.cli: how a user-facing error is shown."""

from __future__ import annotations

from pipeline.cli import format_error


def test_error_wrapping_keeps_long_hyphenated_paths_whole():
    path = "/tmp/pytest-of-root/pytest-11/popen-gw1/test_no_source_delivers0/a-directory-with-a-rather-long-name"
    text = format_error(f"the user mirror {path} is not a directory, so it was skipped")
    assert path in text.split()
    assert text.startswith("error: the user mirror")
