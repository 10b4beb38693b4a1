"""Tests for pipeline.cli: how a user-facing error is shown, with its secrets masked."""

from __future__ import annotations

import logging
import secrets
import sys
from urllib.parse import quote

import pytest
from conftest import with_credentials

from pipeline.cli import MASK, configure_logging, format_error, redact


# {secret} is a generated password or token, {login} the user information u:{secret}@ (written so that no line here
# reads as a URI with a password); the authority's last @ ends it (test below, an @ in the password).
@pytest.mark.parametrize(
    "uri",
    [
        "postgresql+psycopg://{login}db-host:5432/mlflow",
        "http://{login}127.0.0.1:1/",
        "https://{secret}@mirror.example/mnist/",
        "postgresql://db/mlflow?user=u&password={secret}&sslmode=require",
        "https://bucket.s3/x.gz?X-Amz-Credential={secret}&X-Amz-Signature={secret}&v=1",
        "http://127.0.0.1:5000",
        "sqlite:////home/me/project/mlflow.db?timeout=60",
        "/srv/mnist",
    ],
)
def test_every_uri_shape_prints_without_its_secret(uri):
    secret = secrets.token_hex(8)
    assert redact(uri.format(secret=secret, login=f"u:{secret}" + "@"), {}) == uri.format(secret="***", login="u:***@")


def test_uris_inside_messages_known_secrets_anywhere_and_whole_error_paragraphs_are_masked():
    password, token = f"{secrets.token_hex(4)}@{secrets.token_hex(4)}", secrets.token_hex(8)
    encoded = quote(password, safe="")
    store = with_credentials("postgresql://db/x", "u", encoded)
    environ = {"MLFLOW_TRACKING_URI": store, "MLFLOW_TRACKING_PASSWORD": token}
    message = (
        f"the store {store} failed: (psycopg.OperationalError) password {password} rejected; API request to "
        f"{with_credentials('http://h:5000/api/2.0/x', 'admin', token)} failed, token {token}"
    )
    masked = redact(message, environ)
    assert masked == message.replace(encoded, "***").replace(password, "***").replace(token, "***")
    # Every error paragraph is masked on its way out, and broken only at spaces so that paths stay whole.
    path = "/tmp/pytest-of-root/pytest-11/popen-gw1/test_no_source_delivers0/a-directory-with-a-rather-long-name"
    unencoded = with_credentials("postgresql://db/x", "u", password)
    text = format_error(f"the store {unencoded} in {path} is not a directory, so it was skipped")
    assert (
        text.startswith(f"error: the store {with_credentials('postgresql://db/x', 'u', MASK)} in")
        and path in text.split()
    )


def test_log_lines_of_any_logger_are_masked(capfd):
    configure_logging()
    own = logging.getLogger("test_cli.not_propagating")
    own.propagate, own.handlers = False, [logging.StreamHandler(sys.stderr)]
    own.warning("failed: %s", with_credentials("http://host:5000/api", "admin", secrets.token_hex(8)))
    assert with_credentials("http://host:5000/api", "admin", MASK) in capfd.readouterr().err
