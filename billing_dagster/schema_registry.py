"""The Confluent Schema Registry, as the Avro decoder asks it for writer schemas.

Only the registry answering that a schema id does not exist says anything about the
records written with it (they are rejected, `schema:unknown`). A registry that cannot
answer (down, timing out, HTTP 5xx, refusing the credentials) says nothing about them:
SchemaRegistryUnavailableError fails the attempt and the run's retry policy tries again.
"""

from __future__ import annotations

from functools import cache
from urllib.parse import urlsplit

from billing_dagster.redaction import redact_text, redacted


class SchemaNotFoundError(LookupError):
    """The registry answered that the schema id does not exist: its records are rejected."""


class SchemaRegistryUnavailableError(RuntimeError):
    """The registry could not say what a schema id is; the attempt fails and is retried.
    The message names the registry without its password."""


#: Schema Registry error codes for "no schema with this id": 40403 from Confluent's
#: server, 40400 from confluent-kafka's mock:// client (both with HTTP 404).
SCHEMA_NOT_FOUND_CODES = (40403, 40400)


class SchemaRegistrySource:
    """Schema texts by id from a Confluent Schema Registry (`mock://` works in-process).

    `schema_text` raises SchemaNotFoundError only when the registry answers that the id
    does not exist, and SchemaRegistryUnavailableError for anything else that stops it
    answering (connection refused, timeout, HTTP 5xx, 401/403, an unreadable answer)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = registry_client(url)

    def schema_text(self, schema_id: int) -> str:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return self.client.get_schema(schema_id).schema_str
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and exc.error_code in SCHEMA_NOT_FOUND_CODES:
                raise SchemaNotFoundError(str(exc)) from None
            raise self._unavailable(schema_id, exc) from None
        except Exception as exc:
            # Transport errors (httpx), OAuth failures, a body that is not a schema: the
            # registry did not answer the question, so no record is judged on it.
            raise self._unavailable(schema_id, exc) from None

    def _unavailable(self, schema_id: int, exc: Exception) -> SchemaRegistryUnavailableError:
        detail = _without_secrets(f"{type(exc).__name__}: {exc}", self.url)
        return SchemaRegistryUnavailableError(
            f"Schema Registry {redacted_registry_url(self.url)} (BILLING_SCHEMA_REGISTRY_URL) "
            f"did not answer for schema id {schema_id}: {detail}. The batch was not judged "
            "and nothing of it was written; the run retries it."
        )


def redacted_registry_url(url: str) -> str:
    """The registry URL(s) without credentials (a comma-separated list is allowed)."""
    return ",".join(redacted(part.strip()) for part in url.split(","))


def _without_secrets(text: str, url: str) -> str:
    """An error's text with every URL redacted and the configured credentials masked."""
    for part in url.split(","):
        parts = urlsplit(part.strip())
        for secret in (parts.password, parts.username):
            if secret:
                text = text.replace(secret, "***")
    return redact_text(text)


@cache
def registry_client(url: str):
    """One client per URL and process: it caches schemas, and a `mock://` registry only
    exists inside the client object that holds it."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})
