"""Tests for pipeline.cli: how a user-facing error is shown, with its secrets masked."""

from __future__ import annotations

import logging
import secrets
import sys
from urllib.parse import quote

import pytest

from pipeline.cli import configure_logging, format_error, redact


# {secret} is a generated password or token; the authority's last @ ends it (test below, an @ in the password).
@pytest.mark.parametrize(
    "uri",
    [
        "postgresql+psycopg://u:{secret}@db-host:5432/mlflow",
        "http://user:{secret}@127.0.0.1:1/",
        "https://{secret}@mirror.example/mnist/",
        "postgresql://db/mlflow?user=u&password={secret}&sslmode=require",
        "https://bucket.s3/x.gz?X-Amz-Credential={secret}&X-Amz-Signature={secret}&v=1",
        "http://127.0.0.1:5000",
        "sqlite:////home/me/project/mlflow.db?timeout=60",
        "/srv/mnist",
    ],
)
def test_every_uri_shape_prints_without_its_secret(uri):
    assert redact(uri.format(secret=secrets.token_hex(8)), {}) == uri.format(secret="***")


def test_uris_inside_messages_known_secrets_anywhere_and_whole_error_paragraphs_are_masked():
    password, token = f"{secrets.token_hex(4)}@{secrets.token_hex(4)}", secrets.token_hex(8)
    encoded = quote(password, safe="")
    environ = {"MLFLOW_TRACKING_URI": f"postgresql://u:{encoded}@db/x", "MLFLOW_TRACKING_PASSWORD": token}
    message = (
        f"the store postgresql://u:{encoded}@db/x failed: (psycopg.OperationalError) password {password} "
        f"rejected; API request to http://admin:{token}@h:5000/api/2.0/x failed, token {token}"
    )
    masked = redact(message, environ)
    assert masked == message.replace(encoded, "***").replace(password, "***").replace(token, "***")
    # Every error paragraph is masked on its way out, and broken only at spaces so that paths stay whole.
    path = "/tmp/pytest-of-root/pytest-11/popen-gw1/test_no_source_delivers0/a-directory-with-a-rather-long-name"
    text = format_error(f"the store postgresql://u:{password}@db/x in {path} is not a directory, so it was skipped")
    assert text.startswith("error: the store postgresql://u:***@db/x in") and path in text.split()


def test_log_lines_of_any_logger_are_masked(capfd):
    configure_logging()
    own = logging.getLogger("test_cli.not_propagating")
    own.propagate, own.handlers = False, [logging.StreamHandler(sys.stderr)]
    own.warning("failed: %s", f"http://admin:{secrets.token_hex(8)}@host:5000/api")
    assert "http://admin:***@host:5000/api" in capfd.readouterr().err
