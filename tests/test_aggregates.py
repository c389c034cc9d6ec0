"""Aggregates over billing_events: exact sums, incremental MERGE of touched days only,
late events, idempotence. Real Delta tables on the local filesystem."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from billing_dagster.aggregates import (
    CUSTOMER_METRICS,
    DAILY_REVENUE,
    HOURLY_REVENUE,
    refresh_aggregates,
)
from billing_dagster.contract import BILLING_EVENTS_TABLE
from billing_dagster.delta_lake import LakeLocation, read_table

from .lake_rows import event, write_events

DAY = datetime(2024, 12, 15, tzinfo=UTC)


@pytest.fixture
def lake(tmp_path: Path) -> LakeLocation:
    return LakeLocation(str(tmp_path / "lake"))


def hourly(lake: LakeLocation) -> dict[tuple[datetime, str], tuple[Decimal, int, int]]:
    frame = read_table(lake, HOURLY_REVENUE.name)
    return {
        (r["window_start"], r["currency"]): (
            r["total_revenue"],
            r["transaction_count"],
            r["late_event_count"],
        )
        for r in frame.iter_rows(named=True)
    }


def test_hourly_daily_and_customer_figures_are_exact(lake: LakeLocation):
    h14, h15 = DAY + timedelta(hours=14), DAY + timedelta(hours=15)
    write_events(
        lake,
        [
            event(h14 + timedelta(minutes=1), "10.10"),
            event(h14 + timedelta(minutes=59, seconds=59.999), "0.20", customer_id=1002),
            event(h15, "5.00", currency="EUR"),
            event(h15 + timedelta(minutes=5), "-3.00", kind="REFUND"),
            event(h15 + timedelta(minutes=6), "-2.50", kind="CHARGEBACK", currency="EUR"),
            event(h15 + timedelta(minutes=7), "-0.01", kind="ADJUSTMENT"),
        ],
    )
    refresh = refresh_aggregates(lake)
    assert refresh.days == (date(2024, 12, 15),)

    assert hourly(lake) == {
        (h14, "USD"): (Decimal("10.30"), 2, 0),
        (h15, "EUR"): (Decimal("5.00"), 1, 0),  # refunds are not revenue (reference SQL)
    }
    daily = {r["currency"]: r for r in read_table(lake, DAILY_REVENUE.name).iter_rows(named=True)}
    assert daily["USD"]["gross_revenue"] == Decimal("10.30")
    assert daily["USD"]["refunds"] == Decimal("-3.00")
    assert daily["USD"]["adjustments"] == Decimal("-0.01")
    assert daily["USD"]["net_revenue"] == Decimal("7.29")
    assert daily["USD"]["transaction_count"] == 4
    assert daily["EUR"]["chargebacks"] == Decimal("-2.50")
    assert daily["EUR"]["net_revenue"] == Decimal("2.50")
    assert daily["EUR"]["net_revenue_usd"] == Decimal("2.75")  # 5.50 - 2.75 at 1.10
    assert daily["EUR"]["gross_revenue_usd"] == Decimal("5.50")

    metrics = {
        r["customer_id"]: r for r in read_table(lake, CUSTOMER_METRICS.name).iter_rows(named=True)
    }
    assert metrics[1001]["payments_usd"] == Decimal("15.60")  # 10.10 + 5.50
    assert metrics[1001]["refunds_usd"] == Decimal("-3.00")
    assert metrics[1001]["chargebacks_usd"] == Decimal("-2.75")
    assert metrics[1001]["net_usd"] == Decimal("9.84")
    assert metrics[1001]["transaction_count"] == 5
    assert metrics[1002]["net_usd"] == Decimal("0.20")
    assert read_table(lake, DAILY_REVENUE.name).schema["net_revenue"] == pl.Decimal(18, 2)


def test_each_refresh_merges_only_the_days_it_touched(lake: LakeLocation):
    day1, day2 = DAY, DAY + timedelta(days=1)
    write_events(lake, [event(day1 + timedelta(hours=1), "1.00")])
    write_events(lake, [event(day2 + timedelta(hours=1), "2.00")])
    refresh_aggregates(lake)
    day1_files = {
        p for p in DeltaTable(lake.table_uri(DAILY_REVENUE.name)).file_uris() if "day=15" in p
    }

    write_events(lake, [event(day2 + timedelta(hours=2), "3.00")])
    refresh = refresh_aggregates(lake)
    assert refresh.days == (date(2024, 12, 16),)
    after = DeltaTable(lake.table_uri(DAILY_REVENUE.name))
    assert {p for p in after.file_uris() if "day=15" in p} == day1_files  # not rewritten
    daily = {
        r["revenue_date"]: r["gross_revenue"]
        for r in read_table(lake, DAILY_REVENUE.name).iter_rows(named=True)
    }
    assert daily == {date(2024, 12, 15): Decimal("1.00"), date(2024, 12, 16): Decimal("5.00")}
    # Nothing new: nothing merged, no new commit.
    version = after.version()
    assert not refresh_aggregates(lake).changed
    assert DeltaTable(lake.table_uri(DAILY_REVENUE.name)).version() == version


def test_late_events_land_in_their_hour_and_are_counted(lake: LakeLocation):
    h10 = DAY + timedelta(hours=10)
    write_events(lake, [event(h10 + timedelta(minutes=59, seconds=59), "100.00")])
    assert refresh_aggregates(lake).late_events == 0
    # Newest event time is 10:59:59: 10:59:55 is inside the 5 s watermark, 10:59:53 and
    # 09:30 are behind it. All three land in their own hour.
    write_events(
        lake,
        [
            event(h10 + timedelta(minutes=59, seconds=55), "1.00"),
            event(h10 + timedelta(minutes=59, seconds=53), "2.00"),
            event(h10 - timedelta(minutes=30), "4.00"),
            event(h10 - timedelta(minutes=31), "-1.00", kind="REFUND"),
        ],
    )
    refresh = refresh_aggregates(lake)
    assert refresh.late_events == 3
    assert refresh.late_payments == 2
    assert hourly(lake) == {
        (h10, "USD"): (Decimal("103.00"), 3, 1),
        (h10 - timedelta(hours=1), "USD"): (Decimal("4.00"), 1, 1),
    }
    # Another late payment to 10:00 later on: the count accumulates, the total is exact.
    write_events(lake, [event(h10 + timedelta(minutes=1), "0.01")])
    assert refresh_aggregates(lake).late_events == 1
    assert hourly(lake)[(h10, "USD")] == (Decimal("103.01"), 4, 2)


def test_watermark_is_configurable(lake: LakeLocation):
    h10 = DAY + timedelta(hours=10)
    write_events(lake, [event(h10 + timedelta(minutes=30), "1.00")])
    refresh_aggregates(lake)
    write_events(lake, [event(h10 + timedelta(minutes=29), "1.00")])
    assert refresh_aggregates(lake, allowed_lateness=timedelta(minutes=5)).late_events == 0


def test_removed_events_leave_the_aggregates_and_a_lost_table_is_rebuilt(lake: LakeLocation):
    write_events(
        lake,
        [
            event(DAY + timedelta(hours=3), "7.00", event_id="keep"),
            event(DAY + timedelta(hours=4), "9.00", event_id="drop", customer_id=2002),
        ],
    )
    refresh_aggregates(lake)
    DeltaTable(lake.table_uri(BILLING_EVENTS_TABLE)).delete("event_id = 'drop'")
    refresh_aggregates(lake)
    assert set(hourly(lake)) == {(DAY + timedelta(hours=3), "USD")}
    assert read_table(lake, CUSTOMER_METRICS.name)["customer_id"].to_list() == [1001]

    # A refresh repeated from scratch (the tables deleted) gives the same figures.
    before = read_table(lake, DAILY_REVENUE.name).drop("updated_at")
    import shutil

    shutil.rmtree(Path(lake.root) / "aggregated")
    refresh_aggregates(lake)
    assert read_table(lake, DAILY_REVENUE.name).drop("updated_at").equals(before)
