"""The revenue refresh off the latency path: the ingest job carries only the money, and one
coalescing `refresh_revenue` run (its sensor's decision, its blocking check over the rows
added since the previous refresh, its merge of exactly those) brings revenue up."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from billing_dagster.aggregates import DAILY_REVENUE, HOURLY_REVENUE, reflected_version
from billing_dagster.alerts import FinishedRun
from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    DAILY_REVENUE_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_definitions
from billing_dagster.delta_lake import LakeLocation, append_exactly_once, read_table
from billing_dagster.revenue_refresh import (
    REFRESH_KIND,
    RevenueState,
    aggregates_reflect,
    decide_refresh,
    judge_new_rows,
    refresh_to,
    revenue_refresh_alert,
    revenue_state,
)
from billing_dagster.settings import ConfigError, load_settings
from billing_dagster.synthetic import SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .lake_rows import event, write_events
from .test_ingest_kafka import run_batch, run_refresh

NOW = datetime(2024, 12, 15, 14, 30, tzinfo=UTC)
HOUR = datetime(2024, 12, 15, 10, tzinfo=UTC)


def empty_commit(lake: LakeLocation) -> None:
    """What a batch that accepted nothing commits to billing_events: its marks, no row."""
    table = lake.open(BILLING_EVENTS_TABLE)
    append_exactly_once(
        lake,
        BILLING_EVENTS_TABLE,
        pl.DataFrame(schema=BILLING_EVENTS_SCHEMA),
        topic="billing-events",
        processed_up_to={0: table.transaction_version("kafka:billing-events:0") + 1},
        partition_by=EVENT_HOUR_PARTITIONS,
    )


@pytest.mark.parametrize(
    ("current", "reflected", "in_flight", "last", "requested"),
    [
        (None, None, 0, None, None),  # no billing_events yet
        (3, None, 0, None, 3),  # aggregates never built
        (7, 4, 0, 4, 7),  # batches landed since the last refresh: one request for all
        (7, 7, 0, 4, None),  # reflected: nothing to do
        (7, 8, 0, None, None),  # ahead (reconciliation refreshed): never backwards
        (7, 4, 1, 4, None),  # a refresh queued or running: wait, whatever landed
        (9, 7, 0, 7, 9),  # after it finished: what landed meanwhile (no starving)
        (7, 4, 0, 7, None),  # requested 7 already (its run failed): not every tick
        (2, 1, 0, 7, 2),  # a lake younger than the cursor: requested anyway
    ],
)
def test_the_sensor_requests_one_refresh_for_what_the_aggregates_lack(
    current, reflected, in_flight, last, requested
):
    decision = decide_refresh(current, reflected, in_flight, last)
    assert decision.version == requested
    assert decision.reason


def test_revenue_refresh_failed_fires_on_a_failed_run_or_a_lagging_refresh():
    def run(minutes_ago: int, succeeded: bool) -> FinishedRun:
        ended = NOW - timedelta(minutes=minutes_ago)
        return FinishedRun(
            f"run-{minutes_ago}", REFRESH_KIND, succeeded, ended, "boom http://u:pw@h/x"
        )

    current = RevenueState(12, 12)
    quiet = revenue_refresh_alert([run(9, False), run(3, True)], current, now=NOW)
    assert not quiet.firing
    failed = revenue_refresh_alert([run(9, True), run(3, False)], current, now=NOW)
    assert failed.firing and "run-3" in failed.summary and "pw" not in failed.summary
    assert failed.title == "Revenue Refresh Failed"
    assert failed.runbook == "revenue-refresh-failed.md"
    recent = RevenueState(12, 10, NOW - timedelta(minutes=1))
    assert not revenue_refresh_alert([], recent, now=NOW).firing
    behind = revenue_refresh_alert([], RevenueState(12, 10, NOW - timedelta(minutes=6)), now=NOW)
    assert behind.firing and "6 min behind" in behind.summary


def test_the_refresh_interval_setting():
    assert load_settings({}).revenue_refresh_interval_s == 5
    assert (
        load_settings({"BILLING_REVENUE_REFRESH_INTERVAL_SECONDS": "2"}).revenue_refresh_interval_s
        == 2
    )
    for bad in ("0", "soon"):
        with pytest.raises(ConfigError, match="BILLING_REVENUE_REFRESH_INTERVAL_SECONDS"):
            load_settings({"BILLING_REVENUE_REFRESH_INTERVAL_SECONDS": bad})


def test_the_ingest_job_selects_only_the_ingest_step():
    defs = build_definitions(load_settings({}))
    ingest = defs.resolve_job_def("ingest_billing_events")
    assert list(ingest.graph.node_names()) == ["ingest_billing_batch"]
    assert {k.to_user_string() for k in ingest.asset_layer.selected_asset_keys} == {
        "raw_billing_events",
        "billing_events",
        "customer_balances",
        "transaction_history",
    }
    refresh = defs.resolve_job_def("refresh_revenue")
    assert set(refresh.graph.node_names()) == {
        "refresh_revenue_aggregates",
        "billing_events_great_expectations",
        "customer_balances_great_expectations",
    }
    assert refresh.tags[INGEST_CONCURRENCY_TAG] == REFRESH_KIND
    sensor = defs.resolve_sensor_def("revenue_refresh_sensor")
    assert sensor.minimum_interval_seconds == 5
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_what_a_refresh_judges_and_merges(tmp_path: Path):
    """The rows added since the version the aggregates reflect (and their twins in those
    hours); the merge stops at the judged version, never goes back, and versions that add
    no row are recorded as reflected instead of looking pending forever."""
    lake = LakeLocation(str(tmp_path / "lake"))
    earlier = [event(HOUR + timedelta(minutes=m), "1.00") for m in range(4)]
    write_events(lake, earlier)
    judged = judge_new_rows(lake)
    assert (judged.since, judged.rows.height) == (None, 4)
    refresh_to(lake, judged.version)
    assert aggregates_reflect(lake) == judged.version
    assert judge_new_rows(lake).rows.is_empty()

    # Two batches since: one new event, one repeating an earlier event_id.
    write_events(lake, [event(HOUR + timedelta(minutes=10), "2.00")])
    write_events(lake, [event(HOUR + timedelta(minutes=11), "3.00", event_id="evt-x")])
    write_events(
        lake, [event(HOUR + timedelta(minutes=12), "5.00", event_id=earlier[2]["event_id"])]
    )
    state = revenue_state(lake)
    assert state.reflected == judged.version and state.current == judged.version + 3
    assert state.behind_since is not None and state.behind_since <= datetime.now(UTC)
    new = judge_new_rows(lake)
    assert new.since == judged.version and new.version == state.current
    assert sorted(new.rows["amount"].to_list()) == [
        Decimal(v) for v in ("1.00", "2.00", "3.00", "5.00")
    ]
    assert new.hours() == ["2024-12-15-10:00"]

    # A later batch does not enter a merge pinned to the judged version.
    write_events(lake, [event(HOUR + timedelta(minutes=20), "100.00")])
    refresh_to(lake, new.version)
    assert reflected_version(lake, HOURLY_REVENUE) == new.version
    daily = read_table(lake, DAILY_REVENUE.name)
    assert daily["gross_revenue"].to_list() == [Decimal("14.00")]
    # Back to an older version: nothing moves.
    refresh_to(lake, judged.version)
    assert aggregates_reflect(lake) == new.version

    # A commit that adds no row (a batch that accepted nothing): recorded, not recomputed.
    refresh_to(lake, None)
    empty_commit(lake)
    assert revenue_state(lake).current == aggregates_reflect(lake) + 1
    refresh_to(lake, None)
    assert revenue_state(lake).behind_since is None
    assert read_table(lake, DAILY_REVENUE.name)["gross_revenue"].to_list() == [Decimal("114.00")]


@pytest.fixture
def one_lane(kafka, topic, lake_root, serving_url) -> Pipeline:
    """One ingest lane: a run per batch (the refresh does not care how many lanes)."""
    return Pipeline(pipeline_env(kafka, topic, lake_root, serving_url, BILLING_INGEST_LANES="1"))


def test_two_batches_then_one_refresh_tick_give_one_refresh_that_reflects_both(
    one_lane: Pipeline,
):
    pipeline = one_lane
    stream = SyntheticBillingStream(seed=31, invalid_rate=0.0, duplicate_rate=0.0)
    with dg.instance_for_test() as instance:
        accepted = []
        for _ in range(2):
            pipeline.produce(list(stream.records(60)))
            runs, _ = run_batch(pipeline, instance)  # a run per ingest lane
            accepted.append(sum(m["accepted"].value for m in runs))
        # The ingest runs carried only the money: no aggregate exists yet.
        assert pipeline.lake.open(DAILY_REVENUE_TABLE) is None
        current = pipeline.lake.open(BILLING_EVENTS_TABLE).version()

        # While a refresh run is in flight the sensor requests nothing, whatever landed.
        queued = DagsterRun(
            job_name="refresh_revenue",
            run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.STARTED,
            tags={INGEST_CONCURRENCY_TAG: REFRESH_KIND},
        )
        instance.add_run(queued)
        assert run_refresh(pipeline, instance) == (None, None)
        instance.delete_run(queued.run_id)

        result, cursor = run_refresh(pipeline, instance)
        assert result is not None and result.success
        assert cursor == str(current)
        (check,) = [
            e
            for e in result.get_asset_check_evaluations()
            if e.asset_key.path == ["billing_events"]
        ]
        assert check.passed
        # It judged exactly the rows both batches added, and the aggregates reflect both.
        assert check.metadata["rows_validated"].value == sum(accepted)
        assert check.metadata["billing_events_version"].value == current
        assert aggregates_reflect(pipeline.lake) == current
        daily = read_table(pipeline.lake, DAILY_REVENUE_TABLE)
        events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
        assert daily["transaction_count"].sum() == events.height == sum(accepted)
        assert daily["net_revenue_usd"].sum() == events["amount_usd"].sum()
        # Nothing new: the next tick requests nothing.
        assert run_refresh(pipeline, instance, cursor)[0] is None
