"""Lake maintenance on a schedule: compact the small files micro-batches leave in each
finished event hour, and vacuum files no recent version needs."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.ingest import INGEST_POOL
from billing_dagster.aggregates import refresh_aggregates
from billing_dagster.compaction import acknowledge_compaction, compact_hours, vacuum_table
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.offsets import hour_start
from resources import DeltaLakeResource, RevenueAnalyticsResource

COMPACTED_TABLES = (RAW_TABLE, BILLING_EVENTS_TABLE)


class CompactionConfig(dg.Config):
    """Which event hours to compact: the `hours` full hours before the current one."""

    hours: int = 2


class VacuumConfig(dg.Config):
    #: Files unreferenced for longer than this are deleted; readers of older versions
    #: (time travel, a long reconciliation) need them until then. Delta's default: 7 days.
    retention_hours: int = 168


# Both in the ingest lane: compaction acknowledges its commit only if no batch landed.
@dg.op(
    description="Compact the last finished event hours of raw/ and billing_events/.",
    pool=INGEST_POOL,
)
def compact_event_hours(
    context: dg.OpExecutionContext,
    config: CompactionConfig,
    lake: DeltaLakeResource,
    analytics: RevenueAnalyticsResource,
) -> None:
    location = lake.location()
    now = hour_start(datetime.now(UTC))
    hours = [now - timedelta(hours=back) for back in range(config.hours, 0, -1)]
    # The aggregates reflect billing_events first, so the compacted version can be
    # acknowledged as changing nothing (no ingest run writes meanwhile: same run queue).
    refresh_aggregates(location, allowed_lateness=analytics.allowed_lateness())
    for name in COMPACTED_TABLES:
        result = compact_hours(location, name, hours)
        acknowledged = acknowledge_compaction(location, result)
        context.log.info(
            f"{name}: {result.files_removed} files -> {result.files_added} in "
            f"{result.partitions} hours"
            + (f"; acknowledged by {', '.join(acknowledged)}" if acknowledged else "")
        )


@dg.op(description="Vacuum raw/, billing_events/ and quarantine/.", pool=INGEST_POOL)
def vacuum_lake_tables(
    context: dg.OpExecutionContext, config: VacuumConfig, lake: DeltaLakeResource
) -> None:
    location = lake.location()
    for name in (*COMPACTED_TABLES, QUARANTINE_TABLE):
        deleted = vacuum_table(location, name, config.retention_hours)
        context.log.info(f"{name}: deleted {deleted} unreferenced files")
