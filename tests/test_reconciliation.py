"""A day of synthetic billing through real Kafka, the Dagster jobs and the lake, then the
daily reconciliation, the monthly report, and injected faults that must be named."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake

from billing_dagster.aggregates import refresh_aggregates
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    DAILY_REVENUE_TABLE,
    DISCREPANCIES_TABLE,
    RECONCILIATION_TABLE,
)
from billing_dagster.delta_lake import read_table
from billing_dagster.reconciliation import discrepancy_pct, within_tolerance
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from sensors.revenue_refresh import evaluate_refresh_alert

from .conftest import Pipeline
from .test_ingest_kafka import evaluate_sensor, run_refresh
from .test_settings_and_cli import run_cli

DAY = (datetime.now(UTC) - timedelta(days=1)).date()


def a_day_of_events(count: int) -> list[GeneratedRecord]:
    """`count` records spread evenly over DAY, with duplicates and invalid ones mixed in."""
    stream = SyntheticBillingStream(seed=11, customers=300, duplicate_rate=0.02, invalid_rate=0.01)
    start = datetime.combine(DAY, datetime.min.time(), tzinfo=UTC)
    step = timedelta(days=1) / count
    records: list[GeneratedRecord] = []
    for i in range(count):
        # Keep clear of midnight: a few events are generated up to 10 minutes late.
        records.extend(stream.records(1, now=start + timedelta(minutes=11) + i * step * 0.99))
    return records


def expected_by_currency(records: list[GeneratedRecord]) -> dict[str, dict[str, Decimal]]:
    """Independent figures: each valid event once, summed with Python Decimals."""
    seen: set[str] = set()
    totals: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for record in records:
        event = record.event
        if record.kind != "valid" or event is None or event.event_id in seen:
            continue
        seen.add(event.event_id)
        if event.created_at.date() != DAY:
            continue
        totals[event.currency]["net"] += event.amount
        if event.transaction_type == "PAYMENT":
            totals[event.currency]["gross"] += event.amount
    return totals


def lone_small_payments(pipeline: Pipeline) -> list[dict]:
    """Payments under 100 of customers with no other event on DAY: losing or changing one
    by 1.00 moves its customer's figures by more than 1 %, far beyond the tolerance (a
    heavy customer could absorb a small change within 0.1 %, which would be correct)."""
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE).filter(
        pl.col("created_at").dt.date() == DAY
    )
    lone = events.filter(
        (pl.len().over("customer_id") == 1)
        & (pl.col("transaction_type") == "PAYMENT")
        & (pl.col("amount_usd") < 100)
    )
    assert lone.height >= 2, "the synthetic day should have light customers"
    return list(lone.sort("event_id").iter_rows(named=True))


def run_ingest(pipeline: Pipeline, instance: dg.DagsterInstance) -> list[dg.ExecuteInProcessResult]:
    """Sensor ticks and ingest runs until nothing is left to request. The ingest runs carry
    the money only: refresh() brings the aggregates up, as the refresh sensor would."""
    job = pipeline.defs.resolve_job_def("ingest_billing_events")
    results, cursor = [], None
    while True:
        requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
        if not requests:
            return results
        for request in requests:
            result = job.execute_in_process(
                run_config=request.run_config,
                partition_key=request.partition_key,
                instance=instance,
                raise_on_error=False,
            )
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            results.append(result)


def refresh(pipeline: Pipeline, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """The revenue refresh sensor's tick and its run, which must succeed."""
    result, _ = run_refresh(pipeline, instance)
    assert result is not None and result.success
    return result


def reconcile(pipeline: Pipeline, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return pipeline.defs.resolve_job_def("reconcile_daily_revenue").execute_in_process(
        partition_key=DAY.isoformat(), instance=instance, raise_on_error=False
    )


def check_passed(result: dg.ExecuteInProcessResult, check: str) -> bool:
    (evaluation,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == check
    ]
    return evaluation.passed


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_a_day_reconciles_exactly_then_injected_faults_are_named(
    pipeline: Pipeline, instance: dg.DagsterInstance
):
    records = a_day_of_events(1_500)
    pipeline.produce(records)
    ingest_runs = run_ingest(pipeline, instance)
    assert ingest_runs
    refresh(pipeline, instance)

    # The refresh after the ingest runs: aggregates match independent Decimal sums.
    expected = expected_by_currency(records)
    daily = read_table(pipeline.lake, DAILY_REVENUE_TABLE).filter(pl.col("revenue_date") == DAY)
    assert {r["currency"]: r["net_revenue"] for r in daily.iter_rows(named=True)} == {
        c: t["net"] for c, t in expected.items()
    }
    assert {r["currency"]: r["gross_revenue"] for r in daily.iter_rows(named=True)} == {
        c: t["gross"] for c, t in expected.items()
    }

    clean = reconcile(pipeline, instance)
    assert clean.success
    assert check_passed(clean, "within_tolerance")
    summary = read_table(pipeline.lake, RECONCILIATION_TABLE)
    assert set(summary["scope"]) == {"currency", "customers"}
    assert summary["discrepancy_pct"].to_list() == [Decimal("0")] * summary.height
    assert summary.filter(pl.col("scope") == "currency")["key"].sort().to_list() == sorted(expected)
    assert read_table(pipeline.lake, DISCREPANCIES_TABLE).is_empty()

    # Inject faults in the real-time path: one event lost, one amount altered (+1.00).
    lost, altered = lone_small_payments(pipeline)[:2]
    table = DeltaTable(pipeline.lake.table_uri(BILLING_EVENTS_TABLE))
    table.delete(f"event_id = '{lost['event_id']}'")
    table.update(
        updates={"amount": "amount + 1", "amount_usd": "amount_usd + 1"},
        predicate=f"event_id = '{altered['event_id']}'",
    )
    refresh_aggregates(pipeline.lake)

    broken = reconcile(pipeline, instance)
    assert broken.success  # the run worked; the check reports the mismatch
    assert not check_passed(broken, "within_tolerance")
    discrepancies = read_table(pipeline.lake, DISCREPANCIES_TABLE)
    by_event = {
        (r["scope"], r["event_id"]): r
        for r in discrepancies.iter_rows(named=True)
        if r["event_id"] is not None
    }
    missing = by_event[("customer", lost["event_id"])]
    assert missing["kind"] == "missing_in_realtime"
    assert missing["customer_id"] == lost["customer_id"]
    assert missing["batch_amount"] == lost["amount"]
    assert missing["realtime_amount"] is None
    assert (missing["kafka_partition"], missing["kafka_offset"]) == (
        lost["kafka_partition"],
        lost["kafka_offset"],
    )
    changed = by_event[("customer", altered["event_id"])]
    assert changed["kind"] == "amount_differs"
    assert changed["realtime_amount"] - changed["batch_amount"] == Decimal("1.00")
    assert ("currency", lost["event_id"]) in by_event
    assert {e for _, e in by_event} == {lost["event_id"], altered["event_id"]}

    # A rerun replaces the day's rows; nothing accumulates.
    reconcile(pipeline, instance)
    again = read_table(pipeline.lake, DISCREPANCIES_TABLE)
    assert again.height == discrepancies.height
    assert read_table(pipeline.lake, RECONCILIATION_TABLE).height == summary.height

    # The CLI says the same in one line per scope, exits 1, and --json names the events.
    out = run_cli("reconcile", "--date", DAY.isoformat(), "--json", **pipeline.env)
    assert out.returncode == 1, out.stderr
    payload = json.loads(out.stdout)
    assert payload["status"] == "mismatch"
    assert set(payload["differing_events"]) == {lost["event_id"], altered["event_id"]}
    # The lake lost a row Postgres holds: the day's history no longer equals billing_events.
    invariants = {i["name"]: i for i in payload["invariants"]}
    assert not invariants["history_matches_billing_events"]["ok"]
    (day_row,) = invariants["history_matches_billing_events"]["offending"]
    assert day_row["history_count"] == day_row["lake_count"] + 1
    assert invariants["balances_equal_history"]["ok"]


def test_monthly_report_and_cli(pipeline: Pipeline, instance: dg.DagsterInstance):
    records = a_day_of_events(400)
    pipeline.produce(records)
    run_ingest(pipeline, instance)
    assert reconcile(pipeline, instance).success

    # A clean day: reconciled, and Postgres agrees with the lake on every invariant.
    clean = run_cli("reconcile", "--date", DAY.isoformat(), "--json", **pipeline.env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert all(i["ok"] for i in json.loads(clean.stdout)["invariants"])

    month = DAY.strftime("%Y-%m")
    out = run_cli("report", "--month", month, "--json", **pipeline.env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "reconciled"
    assert report["days_reconciled"] == 1
    assert report["days_not_reconciled"] == []
    expected = expected_by_currency(records)
    assert {c["currency"]: Decimal(c["batch_net"]) for c in report["currencies"]} == {
        c: t["net"] for c, t in expected.items()
    }
    invalid = sum(1 for r in records if r.kind == "invalid")
    today = datetime.now(UTC).date()
    assert report["quarantined"] == (invalid if today.month == DAY.month else 0)

    text = run_cli("report", "--month", month, **pipeline.env)
    assert "RECONCILED" in text.stdout and "USD" in text.stdout

    bad = run_cli("report", "--month", "December", **pipeline.env)
    assert bad.returncode == 2 and "month must look like 2024-12" in bad.stderr
    bad_date = run_cli("reconcile", "--date", "2024-13-01", **pipeline.env)
    assert bad_date.returncode == 2 and "must be a date like" in bad_date.stderr
    assert "Traceback" not in bad.stderr + bad_date.stderr


@pytest.mark.parametrize(
    ("realtime", "batch", "within"),
    [
        ("1000.00", "1000.00", True),
        ("1001.00", "1000.00", True),  # exactly 0.1 %
        ("1001.01", "1000.00", False),
        ("998.99", "1000.00", False),
        ("0.00", "0.00", True),
        ("0.01", "0.00", False),
    ],
)
def test_tolerance_is_judged_exactly(realtime: str, batch: str, within: bool):
    assert within_tolerance(Decimal(realtime), Decimal(batch), Decimal("0.1")) is within


def test_discrepancy_percentages():
    assert discrepancy_pct(Decimal("1001.00"), Decimal("1000.00")) == Decimal("0.1")
    assert discrepancy_pct(Decimal("-50.00"), Decimal("-100.00")) == Decimal("50")
    assert discrepancy_pct(Decimal("5.00"), Decimal("0")) is None
    assert discrepancy_pct(Decimal("0"), Decimal("0")) == 0


def test_reconciling_a_day_without_events_reports_no_data(pipeline: Pipeline, instance):
    result = reconcile(pipeline, instance)
    assert result.success
    assert check_passed(result, "within_tolerance")
    (materialization,) = result.asset_materializations_for_node("daily_reconciliation")
    assert materialization.metadata["status"].value == "no_data"


def test_a_failing_billing_events_check_blocks_the_aggregates_of_its_refresh(
    pipeline: Pipeline, instance: dg.DagsterInstance
):
    records = a_day_of_events(50)
    pipeline.produce(records)
    run_ingest(pipeline, instance)
    _, cursor = run_refresh(pipeline, instance)
    before = read_table(pipeline.lake, DAILY_REVENUE_TABLE).drop("updated_at")

    # Corrupt billing_events behind the pipeline's back: a second row for an accepted event.
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    victim = events.sort("created_at").row(-1, named=True)
    copy = events.filter(pl.col("event_id") == victim["event_id"]).with_columns(
        kafka_offset=pl.col("kafka_offset") + 1_000_000
    )
    write_deltalake(pipeline.lake.table_uri(BILLING_EVENTS_TABLE), copy.to_arrow(), mode="append")

    # A new event in the same hour: its ingest run commits the money, nothing judges it
    # there; the next refresh judges every row added since the last one, and stops.
    stream = SyntheticBillingStream(seed=99, customers=300, invalid_rate=0, duplicate_rate=0)
    pipeline.produce(list(stream.records(1, now=victim["created_at"])))
    (ingested,) = run_ingest(pipeline, instance)
    assert ingested.success
    result, cursor = run_refresh(pipeline, instance, cursor)
    assert result is not None and not result.success
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.asset_key.path == ["billing_events"]
    ]
    assert not evaluation.passed
    failed = evaluation.metadata["failed"].value
    assert [f["expectation"] for f in failed] == ["expect_column_values_to_be_unique"]
    assert {r["event_id"] for r in failed[0]["sample_rows"]} == {victim["event_id"]}
    materialized = {
        e.asset_key.to_user_string()
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }
    assert not materialized & {"hourly_revenue", "daily_revenue", "customer_metrics"}
    after = read_table(pipeline.lake, DAILY_REVENUE_TABLE).drop("updated_at")
    assert after.sort("currency").equals(before.sort("currency"))
    # Not requested again for the same version; the alert names the failed run.
    assert run_refresh(pipeline, instance, cursor)[0] is None
    alert = evaluate_refresh_alert(instance, pipeline.lake, datetime.now(UTC))
    assert alert.firing and result.run_id in alert.summary
    # Nor does reconciliation merge the rows the check refused: it fails, saying why.
    held = reconcile(pipeline, instance)
    assert not held.success
    (failure,) = [e for e in held.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "fail expectations/billing_events.json" in failure.message + str(
        failure.event_specific_data.user_failure_data.description
    )


def test_aggregates_and_reconciliation_on_an_s3_lake(s3_pipeline: Pipeline):
    records = a_day_of_events(300)
    with dg.instance_for_test() as instance:
        s3_pipeline.produce(records[:150])
        run_ingest(s3_pipeline, instance)
        refresh(s3_pipeline, instance)
        s3_pipeline.produce(records[150:])  # a second batch: the incremental path on S3
        run_ingest(s3_pipeline, instance)
        refresh(s3_pipeline, instance)
        assert s3_pipeline.lake.root.startswith("s3://")
        daily = read_table(s3_pipeline.lake, DAILY_REVENUE_TABLE).filter(
            pl.col("revenue_date") == DAY
        )
        expected = expected_by_currency(records)
        assert {r["currency"]: r["net_revenue"] for r in daily.iter_rows(named=True)} == {
            c: t["net"] for c, t in expected.items()
        }
        result = reconcile(s3_pipeline, instance)
        assert result.success and check_passed(result, "within_tolerance")
        assert read_table(s3_pipeline.lake, DISCREPANCIES_TABLE).is_empty()
