"""A Schema Registry outage fails the attempt, which is retried; it never sends records to
quarantine. Only the registry answering "no such schema id" rejects them. The registry is
a real HTTP server on loopback speaking the Schema Registry's REST answers."""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest

from billing_dagster.avro_format import decode_avro_wire, frame_avro
from billing_dagster.contract import AVRO_SCHEMA_V2, BILLING_EVENTS_TABLE, QUARANTINE_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.schema_registry import SchemaRegistrySource, SchemaRegistryUnavailableError
from billing_dagster.synthetic import GeneratedRecord

from .conftest import Pipeline, pipeline_env
from .http_endpoint import Endpoint
from .test_ingest_kafka import evaluate_sensor, materialization, materialize

WHEN = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
SCHEMA_ID = 7
SECRET = "s3cret-registry-password"


class Registry(Endpoint):
    """GET /schemas/ids/<id> answered with `answers` first, one per request, then with
    the v2.1.0 writer schema (the real registry's JSON bodies)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, object]] = []
        self.requests = 0
        super().__init__()
        host, port = self.server.server_address[:2]
        self.url = f"http://svc:{SECRET}@{host}:{port}"

    @property
    def reply(self) -> tuple[int, object]:
        self.requests += 1
        if self.answers:
            return self.answers.pop(0)
        return 200, {"schema": json.dumps(AVRO_SCHEMA_V2)}

    @reply.setter
    def reply(self, _value: tuple[int, object]) -> None:
        pass  # Endpoint's default answer; this registry answers as above


SERVER_ERROR = (500, {"error_code": 50001, "message": "Error in the backend datastore"})
NOT_FOUND = (404, {"error_code": 40403, "message": f"Schema {SCHEMA_ID} not found"})
UNAUTHORIZED = (401, {"error_code": 40101, "message": "Unauthorized"})


@pytest.fixture
def registry() -> Registry:
    server = Registry()
    yield server
    server.server.shutdown()


def payment(amount: str = "12.34") -> bytes:
    return frame_avro(
        SCHEMA_ID,
        AVRO_SCHEMA_V2,
        {
            "event_id": str(uuid.uuid4()),
            "customer_id": 1001,
            "transaction_type": "PAYMENT",
            "amount": Decimal(amount),
            "currency": "USD",
            "metadata": None,
            "created_at": WHEN,
            "tax_amount": None,
        },
    )


def decode(values: list[bytes], url: str) -> pl.DataFrame:
    _, failures = decode_avro_wire(
        pl.DataFrame({"value": values}, schema={"value": pl.Binary}), SchemaRegistrySource(url)
    )
    return failures


def test_only_a_schema_the_registry_does_not_have_rejects_its_records(registry: Registry):
    registry.answers = [NOT_FOUND]
    failures = decode([payment(), payment()], registry.url)
    assert failures["_fail_rule"].to_list() == ["schema:unknown", "schema:unknown"]
    assert f"schema id {SCHEMA_ID} is not in the registry" in failures["_fail_reason"][0]


def test_a_registry_refusing_the_credentials_fails_the_batch_naming_it_without_secrets(
    registry: Registry,
):
    registry.answers = [UNAUTHORIZED]
    with pytest.raises(SchemaRegistryUnavailableError) as raised:
        decode([payment()], registry.url)
    message = str(raised.value)
    assert "Unauthorized (HTTP status code 401" in message
    assert f"127.0.0.1:{registry.server.server_address[1]}" in message
    assert SECRET not in message and "svc" not in message
    assert "BILLING_SCHEMA_REGISTRY_URL" in message and "retries" in message


def test_a_registry_that_is_down_fails_the_batch():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SchemaRegistryUnavailableError, match="ConnectError") as raised:
        decode([payment()], f"http://svc:{SECRET}@127.0.0.1:{port}")
    assert SECRET not in str(raised.value)


def error_chain(error) -> str:
    """A Dagster error's message with those of its causes (the retry wraps the failure)."""
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause or error.context
    return "\n".join(messages)


def test_an_outage_is_retried_and_quarantines_nothing(
    kafka, topic, lake_root, serving_url, registry: Registry
):
    pipeline = Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_TOPIC_FORMATS=f"{topic}=avro",
            BILLING_SCHEMA_REGISTRY_URL=registry.url,
        )
    )
    values = [payment(f"{n}.25") for n in range(1, 31)]
    pipeline.produce([GeneratedRecord(b"1001", v, "crafted") for v in values])
    # The first attempt's request and the client's 3 retries get HTTP 500; the run's
    # retry finds the registry back.
    registry.answers = [SERVER_ERROR] * 4
    instance = dg.DagsterInstance.ephemeral()
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    result = materialize(pipeline, request, instance)

    assert result.success
    (retry,) = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    error = error_chain(retry.event_specific_data.error)
    assert "did not answer for schema id 7" in error
    assert "Error in the backend datastore (HTTP status code 500" in error
    assert SECRET not in error
    assert registry.requests == 5
    metadata = materialization(result, "billing_events").metadata
    assert (metadata["accepted"].value, metadata["quarantined"].value) == (len(values), 0)
    assert read_table(pipeline.lake, QUARANTINE_TABLE).is_empty()
    assert read_table(pipeline.lake, BILLING_EVENTS_TABLE).height == len(values)
