"""Each Great Expectations suite in expectations/ passes on good rows and fails, naming the
broken expectation with sample rows, on a crafted bad frame."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from billing_dagster.aggregates import customer_metrics, daily_revenue, hourly_revenue
from billing_dagster.batch_check import checked_batch_rows
from billing_dagster.contract import BILLING_EVENTS_SCHEMA
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.offsets import OffsetRange
from billing_dagster.quality import (
    QualitySuiteError,
    bounds_in_units,
    load_suite_file,
    money_as_units,
    validate_frame,
)
from billing_dagster.rules import DEFAULT_SUPPORTED_CURRENCIES

from .lake_rows import event, write_events

NOW = datetime.now(UTC)
HOUR = datetime(2024, 12, 15, 14, tzinfo=UTC)
PARAMETERS = {
    "supported_currencies": list(DEFAULT_SUPPORTED_CURRENCIES),
    "freshness_floor": NOW - timedelta(minutes=15),
}


def events(*changes: dict[str, object]) -> pl.DataFrame:
    rows = [
        event(HOUR + timedelta(minutes=1), "10.00"),
        event(HOUR + timedelta(minutes=2), "-4.00", kind="REFUND"),
        event(HOUR + timedelta(minutes=3), "25.50", currency="EUR", customer_id=1002),
        event(HOUR + timedelta(minutes=4), "-0.01", kind="ADJUSTMENT", customer_id=1003),
    ]
    for row, change in zip(rows, changes, strict=False):
        row.update(change)
    return pl.DataFrame(rows, schema=BILLING_EVENTS_SCHEMA, orient="row")


def failed(frame: pl.DataFrame, suite: str, **parameters: object) -> dict[tuple[str, str], dict]:
    report = validate_frame(frame, suite, parameters={**PARAMETERS, **parameters})
    assert report.success is (not report.failed)
    metadata = report.to_metadata()
    json.dumps(metadata)  # shown in the Dagster UI: must be plain JSON
    return {(f["expectation"], f["column"]): f for f in metadata["failed"]}


def test_good_billing_events_pass():
    report = validate_frame(events(), "billing_events", parameters=PARAMETERS)
    assert report.success, report.summary()
    assert report.evaluated == len(load_suite_file("billing_events").expectations)


def test_bad_billing_events_fail_with_the_rows_that_break_them():
    bad = events(
        {"event_id": "evt-dup"},
        {"event_id": "evt-dup", "transaction_type": "GIFT"},
        {"currency": "XTS", "customer_id": None},
    ).with_columns(
        # A wider column, as a bug upstream could produce: the range still holds the line.
        amount=pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.lit(Decimal("99999999999.99")))
        .otherwise(pl.col("amount"))
        .cast(pl.Decimal(18, 2))
    )
    failures = failed(bad, "billing_events")
    assert set(failures) == {
        ("expect_column_values_to_be_unique", "event_id"),
        ("expect_column_values_to_be_in_set", "transaction_type"),
        ("expect_column_values_to_be_in_set", "currency"),
        ("expect_column_values_to_not_be_null", "customer_id"),
        ("expect_column_values_to_be_between", "amount"),
    }
    dup = failures[("expect_column_values_to_be_unique", "event_id")]
    assert dup["unexpected_count"] == 2
    assert {r["event_id"] for r in dup["sample_rows"]} == {"evt-dup"}
    amount = failures[("expect_column_values_to_be_between", "amount")]
    assert amount["sample_rows"][0]["amount"] == "99999999999.99"  # exact, not a float
    assert (
        failures[("expect_column_values_to_be_in_set", "currency")]["sample_rows"][0]["currency"]
        == "XTS"
    )


def test_freshness_is_judged_only_when_a_floor_is_given():
    stale = events(*[{"ingested_at": NOW - timedelta(hours=2)}] * 4)
    assert ("expect_column_max_to_be_between", "ingested_at") in failed(stale, "billing_events")
    report = validate_frame(
        stale, "billing_events", parameters={"supported_currencies": ["USD", "EUR"]}
    )
    assert report.success
    assert report.skipped == ["expect_column_max_to_be_between (no freshness_floor given)"]


def test_supported_currencies_come_from_the_setting():
    only_usd = failed(events(), "billing_events", supported_currencies=["USD"])
    assert set(only_usd) == {("expect_column_values_to_be_in_set", "currency")}


def balances(*rows: tuple[int, str, str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        [(c, Decimal(b), cur, NOW, v) for c, b, cur, v in rows],
        schema={
            "customer_id": pl.Int64,
            "current_balance": pl.Decimal(12, 2),
            "currency": pl.String,
            "last_updated": pl.Datetime("us", "UTC"),
            "version": pl.Int64,
        },
        orient="row",
    )


def test_customer_balances_suite():
    good = balances((1001, "10.00", "USD", 1), (1002, "-3.50", "USD", 4))
    assert validate_frame(good, "customer_balances").success
    bad = balances((1001, "10.00", "EUR", 1), (1001, "1.00", "USD", 0))
    assert set(failed(bad, "customer_balances")) == {
        ("expect_column_values_to_be_unique", "customer_id"),
        ("expect_column_values_to_be_in_set", "currency"),
        ("expect_column_values_to_be_between", "version"),
    }


@pytest.mark.parametrize(
    ("suite", "build", "break_it", "broken"),
    [
        (
            "hourly_revenue",
            lambda e: hourly_revenue(e, now=NOW),
            lambda f: pl.concat([f, f.head(1)]).with_columns(
                pl.when(pl.int_range(pl.len()) == 0)
                .then(pl.lit(Decimal("-1.00")))
                .otherwise(pl.col("total_revenue"))
                .cast(f.schema["total_revenue"])
                .alias("total_revenue")
            ),
            {
                ("expect_compound_columns_to_be_unique", "window_start, currency"),
                ("expect_column_values_to_be_between", "total_revenue"),
            },
        ),
        (
            "daily_revenue",
            lambda e: daily_revenue(e, now=NOW),
            lambda f: pl.concat([f, f.head(1)]).with_columns(
                refunds=pl.lit(Decimal("5.00")).cast(f.schema["refunds"])
            ),
            {
                ("expect_compound_columns_to_be_unique", "revenue_date, currency"),
                ("expect_column_values_to_be_between", "refunds"),
            },
        ),
        (
            "customer_metrics",
            lambda e: customer_metrics(e, now=NOW),
            lambda f: pl.concat([f, f.head(1)]).with_columns(transaction_count=pl.lit(0, pl.Int64)),
            {
                ("expect_compound_columns_to_be_unique", "metric_date, customer_id"),
                ("expect_column_values_to_be_between", "transaction_count"),
            },
        ),
    ],
)
def test_aggregate_suites(suite, build, break_it, broken):
    good = build(events())
    assert not good.is_empty()
    assert validate_frame(good, suite).success
    assert set(failed(break_it(good), suite)) == broken


def test_an_empty_frame_passes_and_a_missing_suite_is_named(tmp_path: Path):
    assert validate_frame(pl.DataFrame(schema=BILLING_EVENTS_SCHEMA), "billing_events").success
    with pytest.raises(QualitySuiteError, match=r"no expectation suite .*nope\.json"):
        validate_frame(events(), "nope")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(QualitySuiteError, match=r"invalid expectation suite .*broken\.json"):
        load_suite_file("broken", tmp_path)


def test_money_bounds_are_exact_decimals():
    suite = load_suite_file("billing_events")
    bounds = [
        e["kwargs"]["max_value"]
        for e in suite.expectations
        if e["type"] == "expect_column_values_to_be_between"
    ]
    assert bounds and all(b == Decimal("9999999999.99") for b in bounds)


def test_the_billing_events_check_judges_its_batch_and_repeats_in_its_hours(tmp_path: Path):
    """checked_batch_rows: a batch's own rows, plus rows of its hours that repeat an event_id or a
    Kafka position; the rest of the hours (earlier batches) are left out."""
    lake = LakeLocation(str(tmp_path))
    earlier = [event(HOUR + timedelta(minutes=m), "1.00") for m in range(5)]
    write_events(lake, earlier)
    # The batch: two new events, one of which repeats the id of an earlier one.
    batch = [
        event(HOUR + timedelta(minutes=10), "2.00"),
        event(HOUR + timedelta(minutes=11), "3.00", event_id=earlier[1]["event_id"]),
    ]
    write_events(lake, batch)
    # Behind the pipeline's back: another earlier event appears twice.
    write_events(lake, [{**earlier[3], "kafka_offset": batch[-1]["kafka_offset"] + 100}])
    offsets = [r["kafka_offset"] for r in batch]
    ranges = [OffsetRange(0, min(offsets), max(offsets) + 1)]

    frame = checked_batch_rows(lake, "billing-events", [HOUR.strftime("%Y-%m-%d-%H:00")], ranges)

    assert frame["kafka_offset"].to_list()[:2] == offsets
    assert sorted(frame["event_id"].to_list()[2:]) == sorted(
        [earlier[1]["event_id"], earlier[3]["event_id"], earlier[3]["event_id"]]
    )
    report = validate_frame(frame, "billing_events", parameters=PARAMETERS)
    (failure,) = report.failed
    assert failure.type == "expect_column_values_to_be_unique"
    assert failure.unexpected_count == 4
    # Another hour, or offsets outside the batch, are not read as the batch.
    assert checked_batch_rows(lake, "billing-events", ["2024-12-15-15:00"], ranges).is_empty()
    only_repeats = checked_batch_rows(
        lake, "other-topic", [HOUR.strftime("%Y-%m-%d-%H:00")], ranges
    )
    assert only_repeats.height == 4


def test_money_goes_to_great_expectations_as_exact_whole_units():
    frame = pl.DataFrame(
        {"amount": [Decimal("-9999999999.99"), Decimal("0.01"), None], "id": ["a", "b", "c"]},
        schema={"amount": pl.Decimal(12, 2), "id": pl.String},
    )
    units, scales = money_as_units(frame)
    assert units["amount"].to_list() == [-999_999_999_999, 1, None]
    assert scales == {"amount": 2} and units["id"].to_list() == ["a", "b", "c"]
    # Bounds finer than the column's scale round inward, so no value is judged wrongly.
    assert bounds_in_units(
        {"column": "amount", "min_value": Decimal("0.005"), "max_value": Decimal("9.999")}, 2
    ) == {"column": "amount", "min_value": 1, "max_value": 999}
    # A value one cent past the bound fails, the bound itself passes; reports keep decimals.
    edge = pl.DataFrame(
        {"customer_id": [1, 2], "current_balance": [Decimal("9999999999.99"), Decimal("0")]},
        schema={"customer_id": pl.Int64, "current_balance": pl.Decimal(18, 2)},
    )
    edge = edge.with_columns(
        currency=pl.lit("USD"), last_updated=pl.lit(NOW), version=pl.lit(1, dtype=pl.Int64)
    )
    assert validate_frame(edge, "customer_balances").success
    over = edge.with_columns(current_balance=pl.col("current_balance") + pl.lit(Decimal("0.01")))
    (failure,) = validate_frame(over, "customer_balances").failed
    assert failure.unexpected_count == 1
    assert failure.kwargs["max_value"] == "9999999999.99"
