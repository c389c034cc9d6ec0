"""Small-file compaction and vacuum of the lake.

Every micro-batch appends one file per event hour to raw/ and billing_events/; at one run
every few seconds an hour ends up as hundreds of small files, and every read of it (the
dedupe lookups, the quality check, the aggregate refresh, reconciliation) pays per file.
Compacting a finished hour rewrites its files as a few large ones without changing a row.

Compaction must not look like new data to the aggregate refresh, which recomputes the
days whose billing_events files changed and counts events in new files as late. It runs
while no batch can commit (the lake barrier, lake_barrier.lake_at_rest: ingest lanes
append in parallel), brings the aggregates up to date first, and afterwards records the
compacted version as reflected by them, only if its own commits are all that happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from deltalake import CommitProperties, Transaction, write_deltalake

from billing_dagster.aggregates import (
    AGGREGATE_TABLES,
    SOURCE_APP_ID,
    AggregateTable,
    reflected_version,
)
from billing_dagster.contract import BILLING_EVENTS_TABLE, EVENT_HOUR_PARTITIONS
from billing_dagster.delta_lake import LakeLocation

#: Files compacted towards this size (delta-rs' default is 100 MiB).
TARGET_FILE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class CompactionResult:
    table: str
    partitions: int
    files_removed: int
    files_added: int
    version_before: int | None
    version_after: int | None


def _hour_filter(hour: datetime) -> list[tuple[str, str, str]]:
    values = (hour.year, hour.month, hour.day, hour.hour)
    return [
        (column, "=", str(value))
        for column, value in zip(EVENT_HOUR_PARTITIONS, values, strict=True)
    ]


def compact_hours(lake: LakeLocation, name: str, hours: Sequence[datetime]) -> CompactionResult:
    """Rewrite the files of these event hours of table `name` (partitioned by
    year/month/day/hour) as few large files. Rows, and the table's exactly-once offsets,
    are unchanged."""
    table = lake.open(name)
    if table is None:
        return CompactionResult(name, 0, 0, 0, None, None)
    before = table.version()
    removed = added = touched = 0
    for hour in hours:
        metrics = table.optimize.compact(
            partition_filters=_hour_filter(hour), target_size=TARGET_FILE_BYTES
        )
        removed += int(metrics.get("numFilesRemoved", 0))
        added += int(metrics.get("numFilesAdded", 0))
        touched += int(metrics.get("partitionsOptimized", 0))
    return CompactionResult(name, touched, removed, added, before, table.version())


def acknowledge_compaction(lake: LakeLocation, result: CompactionResult) -> list[str]:
    """Record in each aggregate table that it reflects billing_events after `result`, if
    it reflected billing_events right before it (compaction changed no row). Returns the
    tables acknowledged; a table that was behind is left to the next refresh."""
    if result.table != BILLING_EVENTS_TABLE or result.version_before == result.version_after:
        return []
    source = lake.open(BILLING_EVENTS_TABLE)
    assert source is not None and result.version_before is not None
    # Only if compaction's commits are all that happened since: a batch appended meanwhile
    # (a writer that does not take the lake barrier) must still reach the aggregates.
    between = [
        commit.get("operation")
        for commit in source.history(source.version() - result.version_before)
        if commit.get("version", -1) > result.version_before
    ]
    if source.version() != result.version_after or set(between) != {"OPTIMIZE"}:
        return []
    acknowledged = []
    for target in AGGREGATE_TABLES:
        if reflected_version(lake, target) != result.version_before:
            continue
        _record_reflected(lake, target, result.version_after)
        acknowledged.append(target.name)
    return acknowledged


def acknowledge_unchanged(lake: LakeLocation, version: int) -> list[str]:
    """Record billing_events `version` as reflected by each aggregate table behind it, for
    a refresh that found no file added or removed since (commits of a batch that accepted
    nothing): otherwise those versions would look pending forever, to the refresh sensor,
    its lag alert and compaction's acknowledgment alike. Returns the tables advanced."""
    advanced = []
    for target in AGGREGATE_TABLES:
        reflected = reflected_version(lake, target)
        if reflected is None or reflected >= version:
            continue
        _record_reflected(lake, target, version)
        advanced.append(target.name)
    return advanced


def _record_reflected(lake: LakeLocation, target: AggregateTable, version: int) -> None:
    """An empty commit to `target` carrying its new billing_events version."""
    table = lake.open(target.name)
    assert table is not None  # it has a reflected version
    write_deltalake(
        table,
        table.to_pyarrow_dataset().schema.empty_table(),
        mode="append",
        commit_properties=CommitProperties(app_transactions=[Transaction(SOURCE_APP_ID, version)]),
    )


def vacuum_table(lake: LakeLocation, name: str, retention_hours: int) -> int:
    """Delete files no version younger than `retention_hours` refers to. Returns how many
    expired files it removed (delta-rs counts every expired tombstone, so a file an earlier
    vacuum deleted is counted again until a checkpoint forgets it)."""
    table = lake.open(name)
    if table is None:
        return 0
    # The configured retention rules, even below the table's own default (delta-rs refuses
    # that unless told): the operator chose it knowing who reads old versions.
    deleted = table.vacuum(
        retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False
    )
    return len(deleted)
