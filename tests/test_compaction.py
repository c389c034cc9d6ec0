"""Small-file compaction and vacuum, through the `compact_lake` and `vacuum_lake` jobs, on a
lake that real ingest runs (Kafka, Postgres) filled batch by batch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from billing_dagster.aggregates import AGGREGATE_TABLES, refresh_aggregates
from billing_dagster.compaction import acknowledge_compaction, compact_hours, vacuum_table
from billing_dagster.contract import BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import committed_offsets, read_table
from billing_dagster.offsets import hour_start
from billing_dagster.serving import read_balances
from billing_dagster.synthetic import SyntheticBillingStream

from .conftest import Pipeline
from .test_ingest_kafka import evaluate_sensor, materialize
from .test_reconciliation import refresh, run_ingest


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


def files_of(pipeline: Pipeline, name: str) -> int:
    return len(pipeline.lake.open(name).file_uris())


def snapshot(pipeline: Pipeline) -> dict[str, pl.DataFrame]:
    tables = {
        name: read_table(pipeline.lake, name).sort("kafka_partition", "kafka_offset")
        for name in (RAW_TABLE, BILLING_EVENTS_TABLE)
    }
    for target in AGGREGATE_TABLES:
        frame = read_table(pipeline.lake, target.name).drop("updated_at")
        tables[target.name] = frame.sort(frame.columns)
    tables["balances"] = read_balances(pipeline.settings.postgres_url).drop("last_updated")
    return tables


def test_compaction_rewrites_files_and_changes_no_row_offset_or_aggregate(
    pipeline: Pipeline, instance: dg.DagsterInstance
):
    last_hour = hour_start(datetime.now(UTC)) - timedelta(hours=1)
    stream = SyntheticBillingStream(seed=21, customers=300, invalid_rate=0.01)
    for batch in range(4):  # four micro-batches into the same finished hour
        moment = last_hour + timedelta(minutes=12 + batch * 5)
        pipeline.produce(list(stream.records(40, now=moment)))
        assert all(r.success for r in run_ingest(pipeline, instance))
    refresh(pipeline, instance)  # one refresh for the four batches, as the sensor does
    # Then a batch that accepted nothing (a few malformed records): billing_events gets
    # its empty commit, which compaction's refresh records as reflected, so compaction can
    # still acknowledge its rewrite.
    bad = SyntheticBillingStream(seed=23, invalid_rate=1.0, duplicate_rate=0.0)
    pipeline.produce(list(bad.records(5, now=last_hour + timedelta(minutes=35))))
    version = pipeline.lake.open(BILLING_EVENTS_TABLE).version()
    assert all(r.success for r in run_ingest(pipeline, instance))
    assert pipeline.lake.open(BILLING_EVENTS_TABLE).version() > version
    before = snapshot(pipeline)
    offsets = committed_offsets(pipeline.lake.open(RAW_TABLE), pipeline.settings.topic, [0, 1])
    files_before = {name: files_of(pipeline, name) for name in (RAW_TABLE, BILLING_EVENTS_TABLE)}
    assert files_before[BILLING_EVENTS_TABLE] >= 4

    result = pipeline.defs.resolve_job_def("compact_lake").execute_in_process(instance=instance)
    assert result.success

    # Each partition of the hour is one file now; no row, offset, aggregate or balance moved.
    for name, count in files_before.items():
        assert files_of(pipeline, name) < count
    partitions = pl.DataFrame(
        pipeline.lake.open(BILLING_EVENTS_TABLE).get_add_actions(flatten=True)
    ).select(pl.col("^partition\\..*$"))
    assert partitions.is_duplicated().sum() == 0
    after = snapshot(pipeline)
    assert [name for name, frame in before.items() if not after[name].equals(frame)] == []
    assert committed_offsets(pipeline.lake.open(RAW_TABLE), pipeline.settings.topic, [0, 1]) == (
        offsets
    )
    # The aggregates saw the compaction as no change: nothing recomputed, nothing counted late.
    again = refresh_aggregates(pipeline.lake)
    assert not again.changed and again.late_events == 0
    # The next batch still counts exactly once, and a rerun of the last one adds nothing.
    pipeline.produce(list(stream.records(30, now=datetime.now(UTC))))
    assert all(r.success for r in run_ingest(pipeline, instance))
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    assert events["event_id"].is_duplicated().sum() == 0

    # Vacuum with no retention deletes the compacted-away files; the tables read the same.
    vacuum = pipeline.defs.resolve_job_def("vacuum_lake").execute_in_process(
        instance=instance,
        run_config={"ops": {"vacuum_lake_tables": {"config": {"retention_hours": 0}}}},
    )
    assert vacuum.success
    assert read_table(pipeline.lake, BILLING_EVENTS_TABLE).height == events.height
    for name in (RAW_TABLE, BILLING_EVENTS_TABLE):
        on_disk = list(Path(pipeline.lake.table_uri(name)).rglob("*.parquet"))
        assert len(on_disk) == files_of(pipeline, name)
    assert vacuum_table(pipeline.lake, BILLING_EVENTS_TABLE, 168) == 0  # nothing that old


def test_a_batch_between_refresh_and_compaction_is_not_acknowledged(
    pipeline: Pipeline, instance: dg.DagsterInstance
):
    last_hour = hour_start(datetime.now(UTC)) - timedelta(hours=1)
    stream = SyntheticBillingStream(seed=22, customers=300, invalid_rate=0)
    for batch in range(2):
        pipeline.produce(list(stream.records(20, now=last_hour + timedelta(minutes=20 + batch))))
        run_ingest(pipeline, instance)
    refresh(pipeline, instance)
    # A batch lands in billing_events and no refresh follows (compaction's own refresh is
    # not called here): the aggregates are one version behind when compaction runs.
    pipeline.produce(list(stream.records(20, now=last_hour + timedelta(minutes=40))))
    for request in evaluate_sensor(pipeline, instance, None)[0]:  # a run per lane
        assert materialize(pipeline, request, instance).success

    result = compact_hours(pipeline.lake, BILLING_EVENTS_TABLE, [last_hour])
    assert result.files_removed > result.files_added
    assert acknowledge_compaction(pipeline.lake, result) == []
    # Nor is a compaction that a batch followed before the acknowledgment (a writer that
    # does not take the lake barrier): the aggregates must still see that batch.
    pipeline.produce(list(stream.records(5, now=last_hour + timedelta(minutes=45))))
    assert all(r.success for r in run_ingest(pipeline, instance))
    refresh(pipeline, instance)  # aggregates up to date
    again = compact_hours(pipeline.lake, BILLING_EVENTS_TABLE, [last_hour])
    assert again.files_removed > again.files_added
    pipeline.produce(list(stream.records(5, now=last_hour + timedelta(minutes=50))))
    for request in evaluate_sensor(pipeline, instance, None)[0]:
        assert materialize(pipeline, request, instance).success
    assert acknowledge_compaction(pipeline.lake, again) == []
    # The next refresh recomputes the day and so includes the batch it had not seen.
    pending = refresh_aggregates(pipeline.lake)
    assert pending.changed and last_hour.date() in pending.days
    daily = read_table(pipeline.lake, "aggregated/daily_revenue")
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    assert daily["transaction_count"].sum() == events.height
