"""Tests for pipeline.cli: how a user-facing error is shown, with its secrets masked."""

from __future__ import annotations

import logging
import sys

import pytest

from pipeline.cli import configure_logging, format_error, redact


def test_error_wrapping_keeps_long_hyphenated_paths_whole():
    path = "/tmp/pytest-of-root/pytest-11/popen-gw1/test_no_source_delivers0/a-directory-with-a-rather-long-name"
    text = format_error(f"the user mirror {path} is not a directory, so it was skipped")
    assert path in text.split() and text.startswith("error: the user mirror")


@pytest.mark.parametrize(
    ("uri", "printable"),
    [
        ("postgresql+psycopg://u:p4ss@db-host:5432/mlflow", "postgresql+psycopg://u:***@db-host:5432/mlflow"),
        ("http://user:p4ss@127.0.0.1:1/", "http://user:***@127.0.0.1:1/"),
        ("https://token123@mirror.example/mnist/", "https://***@mirror.example/mnist/"),
        # An unencoded @ in the password: the user information ends at the authority's last @.
        ("mysql://u:p@ss@db/mlflow", "mysql://u:***@db/mlflow"),
        (
            "postgresql://db/mlflow?user=u&password=p4ss&sslmode=require",
            "postgresql://db/mlflow?user=u&password=***&sslmode=require",
        ),
        (
            "https://bucket.s3/x.gz?X-Amz-Credential=AKIA&X-Amz-Signature=abc&v=1",
            "https://bucket.s3/x.gz?X-Amz-Credential=***&X-Amz-Signature=***&v=1",
        ),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////home/me/project/mlflow.db?timeout=60", "sqlite:////home/me/project/mlflow.db?timeout=60"),
        ("/srv/mnist", "/srv/mnist"),
    ],
)
def test_every_uri_shape_prints_without_its_secret(uri, printable):
    assert redact(uri, {}) == printable


def test_uris_inside_messages_and_known_secrets_anywhere_are_masked():
    environ = {"MLFLOW_TRACKING_URI": "postgresql://u:p%40ss-w0rd@db/x", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-token"}
    message = (
        "the store postgresql://u:p%40ss-w0rd@db/x failed: (psycopg.OperationalError) password p@ss-w0rd "
        "rejected; API request to http://admin:s3cr3t-token@h:5000/api/2.0/x failed, token s3cr3t-token"
    )
    masked = redact(message, environ)
    assert "p%40ss-w0rd" not in masked and "p@ss-w0rd" not in masked and "s3cr3t-token" not in masked
    assert masked.startswith("the store postgresql://u:***@db/x failed: (psycopg.OperationalError) password ***")
    assert "http://admin:***@h:5000/api/2.0/x" in masked
    # Every error paragraph is masked on its way out.
    assert "p@ss-w0rd" not in format_error("bad: postgresql://u:p@ss-w0rd@db/x")


def test_log_lines_of_any_logger_are_masked(capfd):
    configure_logging()
    handler = logging.StreamHandler(sys.stderr)
    own = logging.getLogger("test_cli.not_propagating")
    own.propagate, own.handlers = False, [handler]
    own.warning("failed: %s", "http://admin:hunter22@host:5000/api")
    assert "http://admin:***@host:5000/api" in capfd.readouterr().err
