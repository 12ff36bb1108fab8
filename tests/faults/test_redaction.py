"""Secrets in URLs never reach a message: a password in the user part or in the query string
of a landing location, a batch URI or an artifacts URL is masked in errors and stored reasons."""

from __future__ import annotations

import fsspec
import pytest
from flow_support import PipelineEnv

from shiftcost import artifacts, landing, pipeline
from shiftcost.errors import ConfigError, InputError, ShiftcostError
from shiftcost.redaction import redact_text
from shiftcost.store import models as db

SECRETS = ("hunter2", "s3cr3t")


def _clean(text: str) -> str:
    assert not [secret for secret in SECRETS if secret in text], text
    return text


def test_redact_text_masks_every_url_secret_in_a_sentence_and_keeps_the_rest() -> None:
    text = ("Batch s3://alice:hunter2@bucket/x.npz?region=eu&password=s3cr3t cannot be read; "
            "see https://host/a?X-Amz-Signature=s3cr3t#frag and /data/plain.npz?page=2")
    redacted = _clean(redact_text(text))
    assert redacted == ("Batch s3://alice:***@bucket/x.npz?region=eu&password=*** cannot be read; "
                        "see https://host/a?X-Amz-Signature=***#frag and /data/plain.npz?page=2")


def test_every_shiftcost_error_message_is_redacted() -> None:
    error = InputError("The batch postgresql://u:hunter2@db/x?sslpassword=s3cr3t is unusable.")
    assert _clean(str(error)) == "The batch postgresql://u:***@db/x?sslpassword=*** is unusable."
    assert _clean(str(error.args[0]))


@pytest.mark.parametrize("location", [
    "memory://alice:hunter2@nowhere/landing",
    "memory://nowhere/landing?password=s3cr3t&region=eu",
])
def test_a_landing_location_with_a_password_is_redacted_in_its_error(location: str) -> None:
    with pytest.raises(ConfigError) as raised:
        landing.discover(location)
    message = _clean(str(raised.value))
    assert "***" in message and "does not exist" in message


@pytest.mark.parametrize("url", [
    "memory://bob:hunter2@art/models/run-1.safetensors",
    "memory://art/models/run-1.safetensors?X-Amz-Signature=s3cr3t&X-Amz-Date=20261202",
])
def test_an_artifacts_url_with_a_password_is_redacted_in_its_errors(url: str) -> None:
    with pytest.raises(InputError) as raised, artifacts.reading(url):
        pass
    assert "***" in _clean(str(raised.value))
    unknown = url.replace("memory://", "nosuchfs://")
    with pytest.raises(ConfigError) as raised:
        artifacts.Artifacts(unknown).model_weights("digits", "run-1")
    assert "***" in _clean(str(raised.value))


def test_a_batch_uri_with_a_query_secret_is_redacted_in_its_stored_failure_reason(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    uri = "memory://incoming/corrupt.npz?token=s3cr3t"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe(path, b"PK\x03\x04 not a whole archive")
    try:
        with pipeline.connect(env.settings) as database:
            registration = pipeline.register_batch(database, env.settings, uri)
    finally:
        fs.rm(path)
    (batch,) = env.rows(db.Batch)
    assert registration.status == batch.status == "failed"
    assert "corrupt.npz?token=***" in _clean(batch.failure_reason)


def test_a_missing_batch_uri_with_a_password_is_refused_in_one_redacted_sentence(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    with pipeline.connect(env.settings) as database:
        try:
            registration = pipeline.register_batch(database, env.settings, "memory://carol:hunter2@gone/x.npz?password=s3cr3t")
            reason = registration.failure_reason
        except ShiftcostError as error:
            reason = str(error)
    assert "does not exist" in _clean(reason) and "\n" not in reason
    assert [_clean(batch.failure_reason) for batch in env.rows(db.Batch)] in ([], [reason])


def test_the_report_names_a_batch_without_the_secrets_of_its_url() -> None:
    from shiftcost.store.report_queries import short_name

    assert short_name("s3://reader:hunter2@bucket/landing/night.npz?token=abc123") == "night.npz?token=***"
    assert "hunter2" not in short_name("s3://reader:hunter2@bucket/")
