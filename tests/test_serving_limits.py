"""Rows Postgres cannot take never fail a batch forever: a balance a batch would carry past
DECIMAL(12,2), or a value the serving schema refuses, sends those events alone to
quarantine before the lake decides, and their neighbours go on. Real Kafka, Delta and
Postgres, through the project's sensor and ingest asset."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest

from billing_dagster.balance_overflow import BalanceEvent, overflowing_events
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    QUARANTINE_TABLE,
    RAW_TABLE,
    BillingEvent,
    TransactionType,
)
from billing_dagster.delta_lake import committed_offsets, read_table
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline
from .lake_rows import balances, balances_not_matching_history, expected_balances
from .test_ingest_kafka import evaluate_sensor, materialize, run_batch

BIG = Decimal("9999999000.00")
#: Synthetic streams pick customers Pareto-skewed from 1001: these two see no other event.
BIG_CUSTOMER = 5999


def test_overflow_refuses_only_the_events_that_would_pass_the_limit():
    limit = Decimal("100.00")
    events = [
        BalanceEvent(1, 0, 0, Decimal("60.00")),
        BalanceEvent(1, 0, 1, Decimal("50.00")),  # 110: refused
        BalanceEvent(1, 0, 2, Decimal("-20.00")),  # 40
        BalanceEvent(1, 0, 3, Decimal("60.00")),  # 100: exactly the limit, taken
        BalanceEvent(2, 1, 0, Decimal("-100.01")),  # below -limit: refused
        BalanceEvent(3, 1, 1, Decimal("1.00")),  # 99 + 1 = 100
    ]
    refused = overflowing_events({3: Decimal("99.00")}, events, limit)
    assert [(r.kafka_partition, r.kafka_offset) for r in refused] == [(0, 1), (1, 0)]
    assert all(r.rule == "balance:overflow" for r in refused)
    assert "customer 1's balance 60.00 USD plus this event's 50.00 USD" in refused[0].reason


def _record(customer: int, amount: Decimal, *, valid: bool, event_id: str | None = None):
    event = BillingEvent(
        event_id=event_id or str(uuid.uuid4()),
        customer_id=customer,
        transaction_type=TransactionType.PAYMENT if amount > 0 else TransactionType.REFUND,
        amount=amount,
        created_at=datetime.now(UTC) - timedelta(minutes=1),
    )
    return GeneratedRecord(
        str(customer).encode(),
        event.to_json_bytes(),
        "valid" if valid else "invalid",
        event if valid else None,
    )


def _quarantined(pipeline: Pipeline) -> dict[str, list[str]]:
    frame = read_table(pipeline.lake, QUARANTINE_TABLE)
    return {row["raw_value"].decode(): row["rules"] for row in frame.iter_rows(named=True)}


def test_a_balance_the_batch_would_overflow_quarantines_those_events_alone(
    pipeline: Pipeline,
):
    instance = dg.DagsterInstance.ephemeral()
    reference = SyntheticBillingStream().reference_data()
    neighbours = list(SyntheticBillingStream(seed=5, invalid_rate=0).records(300))
    big = [
        _record(BIG_CUSTOMER, BIG, valid=True),
        _record(BIG_CUSTOMER, Decimal("5000.00"), valid=False),  # 9,999,999,000 + 5,000: over
        _record(BIG_CUSTOMER, Decimal("-1000.00"), valid=True),
        _record(BIG_CUSTOMER, Decimal("500.00"), valid=True),  # 9,999,998,500: fits
    ]
    first = neighbours[:150] + big + neighbours[150:]
    pipeline.produce(first)
    _, cursor = run_batch(pipeline, instance)
    # A later batch meets the balance Postgres holds now.
    again = [
        _record(BIG_CUSTOMER, Decimal("1500.00"), valid=False),
        _record(BIG_CUSTOMER - 1, BIG, valid=True),
    ]
    pipeline.produce(again)
    run_batch(pipeline, instance, cursor)

    url = pipeline.settings.postgres_url
    assert balances(url) == expected_balances(first + again, reference)
    assert balances(url)[BIG_CUSTOMER] == Decimal("9999998500.00")
    assert balances_not_matching_history(url) == []
    quarantined = _quarantined(pipeline)
    for record in (big[1], again[0]):
        assert quarantined[record.value.decode()] == ["balance:overflow"]
    accepted = read_table(pipeline.lake, BILLING_EVENTS_TABLE)["event_id"].to_list()
    assert json_id(big[1]) not in accepted and json_id(big[0]) in accepted


def json_id(record: GeneratedRecord) -> str:
    return json.loads(record.value)["event_id"]


@pytest.fixture
def poisoned(pipeline: Pipeline) -> Pipeline:
    """A serving schema with a constraint the lake's rules know nothing of: a deployment
    that added a CHECK, say."""
    url = pipeline.settings.postgres_url
    migrate(url)
    with connect(url) as connection, connection, connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE transaction_history ADD CONSTRAINT no_poison "
            "CHECK (event_id NOT LIKE 'poison-%')"
        )
    return pipeline


def test_rows_postgres_refuses_go_to_quarantine_and_their_neighbours_go_on(poisoned: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    reference = SyntheticBillingStream().reference_data()
    good = list(SyntheticBillingStream(seed=9, invalid_rate=0).records(400))
    poison = [
        _record(1003 + i, Decimal("10.00"), valid=False, event_id=f"poison-{i}") for i in range(3)
    ]
    records = good[:100] + poison[:1] + good[100:300] + poison[1:] + good[300:]
    poisoned.produce(records)
    (metadata,), _ = run_batch(poisoned, instance)

    url = poisoned.settings.postgres_url
    assert balances(url) == expected_balances(records, reference)
    assert balances_not_matching_history(url) == []
    quarantine = read_table(poisoned.lake, QUARANTINE_TABLE).filter(pl.col("stage") == "serving")
    assert quarantine.height == 3
    assert set(quarantine["rules"].list.first()) == {"serving:refused"}
    assert all("no_poison" in reason for reason in quarantine["reason"])
    assert metadata["counts_balance"].value is True
    accepted = read_table(poisoned.lake, BILLING_EVENTS_TABLE)["event_id"]
    assert not accepted.str.starts_with("poison-").any()


def test_a_batch_postgres_refuses_wholesale_is_held_with_nothing_committed(poisoned: Pipeline):
    """More refused rows than a few bad records explain: a broken deployment. The batch
    fails, not retried, and nothing of it lands anywhere."""
    instance = dg.DagsterInstance.ephemeral()
    records = [
        _record(1001 + i, Decimal("10.00"), valid=False, event_id=f"poison-{i}") for i in range(30)
    ]
    poisoned.produce(records)
    (request,), _, _ = evaluate_sensor(poisoned, instance, None)
    result = materialize(poisoned, request, instance)
    assert not result.success
    failures = " ".join(
        str(e.event_specific_data)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    )
    assert "Postgres refuses more than 20 rows of this batch" in failures
    assert "STEP_UP_FOR_RETRY" not in [e.event_type_value for e in result.all_events]
    topic = poisoned.settings.topic
    for table in (BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE):
        opened = poisoned.lake.open(table)
        # The sensor recorded where processing starts (offset 0), nothing more.
        assert set(committed_offsets(opened, topic, list(range(24))).values()) <= {None, 0}
        assert read_table(poisoned.lake, table).height == 0
    assert balances(poisoned.settings.postgres_url) == {}
