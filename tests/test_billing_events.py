"""billing_events against real Kafka: dedupe, every business rule, enrichment and the
billing scenarios, with expected money computed by hand."""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest

from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import ReferenceData, usd_amount_of, write_reference_data
from billing_dagster.proration import prorated_charge
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline
from .test_ingest_kafka import evaluate_sensor, materialization, materialize, run_batch

NOW = datetime.now(UTC)
WHEN = NOW - timedelta(minutes=2)


def assert_balanced(metadata) -> None:
    for m in metadata:
        assert m["counts_balance"].value is True
        assert (
            m["input_records"].value
            == m["accepted"].value + m["duplicates"].value + m["quarantined"].value
        )


def payload(**fields: object) -> bytes:
    body = {
        "event_id": str(uuid.uuid4()),
        "customer_id": 501,
        "transaction_type": "PAYMENT",
        "amount": "10.00",
        "currency": "USD",
        "metadata": None,
        "tax_amount": None,
        "created_at": WHEN.isoformat().replace("+00:00", "Z"),
    }
    body.update(fields)
    return json.dumps(body).encode()


def record(value: bytes, key: bytes = b"501") -> GeneratedRecord:
    return GeneratedRecord(key=key, value=value, kind="crafted")


RATES = {"EUR": Decimal("1.08345000"), "GBP": Decimal("1.26750000"), "JPY": Decimal("0.00667000")}
PLAN_CHANGE = WHEN - timedelta(hours=1)


def scenario_reference() -> ReferenceData:
    """Customers 501-503; 501 moved from starter to pro an hour ago; 503 has no plan; FX
    rates for today and yesterday (no CHF rate at all)."""
    days = [WHEN.date(), WHEN.date() - timedelta(days=1)]
    return ReferenceData.of(
        pl.DataFrame(
            {"customer_id": [501, 502, 503], "customer_tier": ["enterprise", "growth", "standard"]}
        ),
        pl.DataFrame(
            {
                "subscription_id": ["s-1", "s-2", "s-3"],
                "customer_id": [501, 501, 502],
                "plan": ["starter", "pro", "enterprise"],
                "started_at": [
                    datetime(2026, 1, 1, tzinfo=UTC),
                    PLAN_CHANGE,
                    datetime(2026, 1, 1, tzinfo=UTC),
                ],
            }
        ),
        pl.DataFrame(
            [(d, c, r) for d in days for c, r in RATES.items()],
            schema={"rate_date": pl.Date, "currency": pl.String, "usd_rate": pl.Decimal(18, 8)},
            orient="row",
        ),
    )


@pytest.fixture
def scenario(pipeline: Pipeline) -> Pipeline:
    write_reference_data(pipeline.lake, scenario_reference())
    return pipeline


def accepted(pipeline: Pipeline) -> pl.DataFrame:
    return read_table(pipeline.lake, BILLING_EVENTS_TABLE)


def quarantined(pipeline: Pipeline) -> pl.DataFrame:
    return read_table(pipeline.lake, QUARANTINE_TABLE)


def test_duplicates_within_and_across_batches_count_once(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    stream = SyntheticBillingStream(seed=31, duplicate_rate=0.05, invalid_rate=0.01)
    first = list(stream.records(2_000))
    pipeline.produce(first)
    first_meta, cursor = run_batch(pipeline, instance)

    # The second batch redelivers 300 events of the first (a producer resend, an upstream
    # replay) among new ones: each must count as a duplicate, not a second event.
    redelivered = [r for r in first if r.kind == "valid"][:300]
    second = list(stream.records(1_000)) + redelivered
    pipeline.produce(second)
    second_meta, _ = run_batch(pipeline, instance, cursor)

    events = accepted(pipeline)
    valid = {r.event.event_id: r.event for r in first + second if r.kind != "invalid"}
    assert events["event_id"].n_unique() == events.height == len(valid)
    assert set(events["event_id"]) == set(valid)
    assert events["amount"].sum() == sum((e.amount for e in valid.values()), Decimal("0.00"))

    meta = first_meta + second_meta
    assert_balanced(meta)
    kinds = Counter(r.kind for r in first + second)
    # Every delivery of a valid event beyond its first is a duplicate.
    assert (
        sum(m["duplicates"].value for m in meta)
        == len(first) + len(second) - len(valid) - kinds["invalid"]
    )
    assert sum(m["duplicates"].value for m in second_meta) >= len(redelivered)
    # raw/ keeps every delivery; billing_events keeps each event once.
    assert (
        read_table(pipeline.lake, RAW_TABLE).height == len(first) + len(second) - kinds["invalid"]
    )


def test_a_rerun_of_a_batch_is_not_its_own_duplicate(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce(list(SyntheticBillingStream(seed=32).records(800)))
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    first = materialize(pipeline, request, instance)
    first_meta = materialization(first, "billing_events").metadata
    before = accepted(pipeline).sort("event_id")

    # Delete raw/'s record of the batch as if the run crashed before its last write: the
    # retry re-reads the offsets, and billing_events must neither grow nor lose a row.
    shutil.rmtree(pipeline.lake.table_uri(RAW_TABLE))
    rerun = materialize(pipeline, request, instance)
    assert rerun.success
    meta = materialization(rerun, "billing_events").metadata
    # The stream's own redeliveries are duplicates again; the batch's events are not.
    assert meta["duplicates"].value == first_meta["duplicates"].value
    assert meta["accepted_already_committed"].value == before.height
    assert meta["accepted_written"].value == 0
    assert accepted(pipeline).sort("event_id").equals(before)


def test_a_redelivery_with_different_content_is_quarantined_not_dropped(scenario: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    event_id = str(uuid.uuid4())
    original = payload(event_id=event_id, amount="50.00")
    scenario.produce([record(original)])
    _, cursor = run_batch(scenario, instance)
    altered = payload(event_id=event_id, amount="5000.00")
    scenario.produce([record(altered)])
    meta, _ = run_batch(scenario, instance, cursor)
    assert_balanced(meta)

    events = accepted(scenario)
    assert events.height == 1 and events["amount"][0] == Decimal("50.00")
    (row,) = quarantined(scenario).iter_rows(named=True)
    assert row["rules"] == ["duplicate:conflict"]
    assert "amount 50.00 vs 5000.00" in row["reason"]
    assert row["raw_value"] == altered


RULE_CASES = {
    "sign:payment_positive": (payload(amount="-10.00"), "PAYMENT amount must be positive"),
    "sign:return_negative": (
        payload(transaction_type="REFUND", amount="10.00"),
        "REFUND amount must be negative",
    ),
    "sign:adjustment_nonzero": (
        payload(transaction_type="ADJUSTMENT", amount="0.00"),
        "ADJUSTMENT amount must not be zero",
    ),
    "tax:within_amount": (payload(amount="10.00", tax_amount="12.00"), "must have the sign"),
    "currency:supported": (payload(currency="XYZ"), "unsupported currency XYZ"),
    "time:future": (
        payload(created_at=(NOW + timedelta(days=2)).isoformat()),
        "after the record's Kafka timestamp",
    ),
    "reference:customer": (payload(customer_id=999), "customer 999 is not in reference"),
    "reference:subscription": (payload(customer_id=503), "customer 503 has no subscription"),
    "reference:fx_rate": (payload(currency="CHF"), "no USD rate for CHF"),
    "decimal_12_2:amount_usd": (
        payload(currency="GBP", amount="9999999999.00"),
        "exceeds decimal(12,2) in USD",
    ),
    "refund:original_payment": (
        payload(customer_id=502, transaction_type="CHARGEBACK", amount="-5.00"),
        "CHARGEBACK for customer 502 has no accepted PAYMENT",
    ),
    # Contract rules, judged before these, quarantine the same way.
    "required:event_id": (payload(event_id=None), "missing required field event_id"),
    "decimal_12_2:amount": (payload(amount="10.001"), "must be a decimal(12,2)"),
}


def test_every_rule_quarantines_with_its_name_message_offset_and_payload(scenario: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    good = payload(amount="25.00")
    scenario.produce([record(value) for value, _ in RULE_CASES.values()] + [record(good)])
    meta, _ = run_batch(scenario, instance)
    assert_balanced(meta)

    rows = {tuple(r["rules"]): r for r in quarantined(scenario).iter_rows(named=True)}
    assert set(rows) == {(name,) for name in RULE_CASES}
    for name, (value, message) in RULE_CASES.items():
        row = rows[(name,)]
        assert message in row["reason"], (name, row["reason"])
        assert row["raw_value"] == value
        assert row["kafka_offset"] is not None and row["kafka_partition"] is not None
    assert accepted(scenario)["amount"].to_list() == [Decimal("25.00")]
    (m,) = meta
    assert m["quarantined_by_rule"].value == {name: 1 for name in RULE_CASES}


def test_billing_scenarios_with_hand_computed_money(scenario: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    # Proration: 501 upgrades starter (29.00) to pro (99.00) with 20 of 30 days left:
    # (99.00 - 29.00) x 20 / 30 = 46.666... -> 46.67 charged; the downgrade credits it.
    upgrade = prorated_charge(
        Decimal("29.00"),
        Decimal("99.00"),
        period_start=date(2026, 11, 1),
        period_end=date(2026, 12, 1),
        changed_on=date(2026, 11, 11),
    )
    assert upgrade == Decimal("46.67")
    downgrade = prorated_charge(
        Decimal("99.00"),
        Decimal("29.00"),
        period_start=date(2026, 11, 1),
        period_end=date(2026, 12, 1),
        changed_on=date(2026, 11, 11),
    )
    assert downgrade == Decimal("-46.67")
    earlier = (PLAN_CHANGE - timedelta(minutes=5)).isoformat()
    cases = {
        # name: (payload, amount, amount_usd, plan)
        "eur_payment": (
            payload(amount="100.05", currency="EUR", tax_amount="16.01", created_at=earlier),
            "100.05",
            "108.40",
            "starter",
        ),  # 108.3991725
        "gbp_payment": (
            payload(amount="19.99", currency="GBP"),
            "19.99",
            "25.34",
            "pro",
        ),  # 25.337325
        "jpy_payment": (
            payload(amount="1234.00", currency="JPY"),
            "1234.00",
            "8.23",
            "pro",
        ),  # 8.23078
        "proration": (
            payload(
                transaction_type="ADJUSTMENT",
                amount=str(upgrade),
                metadata='{"proration": {"days_left": 20, "days": 30}}',
            ),
            "46.67",
            "46.67",
            "pro",
        ),
        "credit": (
            payload(transaction_type="ADJUSTMENT", amount=str(downgrade), currency="EUR"),
            "-46.67",
            "-50.56",
            "pro",
        ),  # -50.5646115
        "refund": (
            payload(transaction_type="REFUND", amount="-19.99", currency="GBP"),
            "-19.99",
            "-25.34",
            "pro",
        ),
        "chargeback": (
            payload(transaction_type="CHARGEBACK", amount="-100.05", currency="EUR"),
            "-100.05",
            "-108.40",
            "pro",
        ),
        "usd_payment": (payload(amount="0.01"), "0.01", "0.01", "pro"),
    }
    ids = {name: json.loads(value)["event_id"] for name, (value, *_rest) in cases.items()}
    # The payments first (one batch), then the returns, judged against them (next batch).
    first = ["eur_payment", "gbp_payment", "jpy_payment", "usd_payment"]
    scenario.produce([record(cases[n][0]) for n in first])
    meta, cursor = run_batch(scenario, instance)
    scenario.produce([record(cases[n][0]) for n in cases if n not in first])
    more, _ = run_batch(scenario, instance, cursor)
    assert_balanced(meta + more)

    events = {r["event_id"]: r for r in accepted(scenario).iter_rows(named=True)}
    assert quarantined(scenario).is_empty() if scenario.lake.open(QUARANTINE_TABLE) else True
    for name, (_, amount, amount_usd, plan) in cases.items():
        row = events[ids[name]]
        assert row["amount"] == Decimal(amount), name
        assert row["amount_usd"] == Decimal(amount_usd), name
        # The same rounding, independently, on Python Decimals.
        assert usd_amount_of(Decimal(amount), row["usd_rate"]) == Decimal(amount_usd), name
        assert row["subscription_plan"] == plan, name
        assert row["customer_tier"] == "enterprise"
    assert events[ids["eur_payment"]]["tax_amount"] == Decimal("16.01")
    assert sum((r["amount_usd"] for r in events.values()), Decimal("0")) == Decimal("4.35")


def test_half_cent_rounds_away_from_zero():
    assert usd_amount_of(Decimal("1.00"), Decimal("1.005")) == Decimal("1.01")
    assert usd_amount_of(Decimal("-1.00"), Decimal("1.005")) == Decimal("-1.01")
    frame = pl.DataFrame(
        {
            "a": [Decimal("1.00"), Decimal("-1.00"), Decimal("0.01")],
            "r": [Decimal("1.005"), Decimal("1.005"), Decimal("0.00000001")],
        },
        schema={"a": pl.Decimal(12, 2), "r": pl.Decimal(18, 8)},
    )
    from billing_dagster.enrichment import usd_amount

    out = frame.select(usd_amount(pl.col("a"), pl.col("r")).alias("usd"))["usd"].to_list()
    assert out == [Decimal("1.01"), Decimal("-1.01"), Decimal("0.00")]


def test_missing_reference_tables_fail_the_run_with_a_clear_message(pipeline: Pipeline):
    shutil.rmtree(pipeline.lake.table_uri("reference"))
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce([record(payload())])
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    result = materialize(pipeline, request, instance)
    assert not result.success
    error = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert "reference/customers does not exist" in error
    assert "billing-dagster reference load" in error
    assert "STEP_UP_FOR_RETRY" not in [e.event_type_value for e in result.all_events]
