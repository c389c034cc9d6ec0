"""Exactly-once appends to Delta tables, keyed by Kafka offsets.

Each commit carries, per Kafka partition, a Delta application transaction
(app id `kafka:<topic>:<partition>`, version = next offset to process). Rows below a
partition's committed version are dropped before writing, and a commit that races
another writer of the same app id fails Delta's conflict check instead of landing twice.
Re-running any range therefore never duplicates a row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError


@dataclass(frozen=True)
class LakeLocation:
    """Where the lake lives: a local folder or s3://bucket/prefix, with object-store options."""

    root: str
    storage_options: dict[str, str] = field(default_factory=dict)

    def table_uri(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def open(self, name: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None


def open_or_create(
    lake: LakeLocation,
    name: str,
    schema: Mapping[str, pl.DataType],
    partition_by: Sequence[str],
) -> DeltaTable:
    """The table, created empty if it does not exist yet.

    A writer must hold a snapshot to commit on top of: an append to a table that does not
    exist creates it without any conflict check, so two writers racing on a new lake
    would both land. Created first, the second one's commit fails as on any table."""
    table = lake.open(name)
    if table is not None:
        return table
    try:
        return DeltaTable.create(
            lake.table_uri(name),
            pl.DataFrame(schema=dict(schema)).to_arrow().schema,
            mode="ignore",
            partition_by=list(partition_by),
            storage_options=lake.storage_options or None,
        )
    except (CommitFailedError, DeltaError):
        # Another writer created it at the same moment.
        table = lake.open(name)
        if table is None:
            raise
        return table


def app_id(topic: str, partition: int) -> str:
    return f"kafka:{topic}:{partition}"


def committed_offsets(
    table: DeltaTable | None, topic: str, partitions: Sequence[int]
) -> dict[int, int | None]:
    """Next offset to process per partition, as recorded by this table's commits."""
    if table is None:
        return dict.fromkeys(partitions)
    return {p: table.transaction_version(app_id(topic, p)) for p in partitions}


@dataclass(frozen=True)
class AppendResult:
    rows_written: int
    rows_already_committed: int
    table_version: int | None


def append_exactly_once(
    lake: LakeLocation,
    name: str,
    rows: pl.DataFrame,
    *,
    topic: str,
    processed_up_to: Mapping[int, int],
    partition_by: Sequence[str],
    table: DeltaTable | None = None,
) -> AppendResult:
    """Append `rows` (each with kafka_partition/kafka_offset) and advance the offsets.

    `processed_up_to` is the next offset per partition once this batch is in. `table`
    should be the snapshot the caller read its offsets from, so that a commit by another
    writer in between is caught by the conflict check.
    """
    if table is None:
        table = lake.open(name)
    committed = committed_offsets(table, topic, list(processed_up_to))
    advance = {
        p: offset
        for p, offset in processed_up_to.items()
        if committed[p] is None or offset > committed[p]
    }
    marks = pl.DataFrame(
        {
            "kafka_partition": list(committed),
            "_committed": [-1 if o is None else o for o in committed.values()],
        },
        schema={"kafka_partition": pl.Int32, "_committed": pl.Int64},
    )
    fresh = (
        rows.join(marks, on="kafka_partition", how="left")
        .filter(pl.col("kafka_offset") >= pl.col("_committed").fill_null(-1))
        .drop("_committed")
    )
    if not advance:
        return AppendResult(0, rows.height, table.version() if table else None)
    properties = CommitProperties(
        app_transactions=[Transaction(app_id(topic, p), o) for p, o in sorted(advance.items())]
    )
    if table is not None:
        # Writing through the snapshot object moves it to the new version in place.
        write_deltalake(table, fresh.to_arrow(), mode="append", commit_properties=properties)
        version = table.version()
    else:
        write_deltalake(
            lake.table_uri(name),
            fresh.to_arrow(),
            mode="append",
            partition_by=list(partition_by),
            storage_options=lake.storage_options or None,
            commit_properties=properties,
        )
        version = lake.open(name).version()
    return AppendResult(fresh.height, rows.height - fresh.height, version)


def partition_filter(columns: Sequence[str], partitions: Iterable[Sequence[int]]) -> pl.Expr:
    """Rows in any of these partitions: `columns` = values for one of `partitions` (a
    predicate on partition columns, so scans read only those files)."""
    terms = [
        pl.all_horizontal([pl.col(c) == v for c, v in zip(columns, values, strict=True)])
        for values in partitions
    ]
    return pl.any_horizontal(terms) if terms else pl.lit(False)


def partition_predicate(
    columns: Sequence[str], partitions: Iterable[Sequence[int]], alias: str | None = None
) -> str:
    """The same as Delta SQL, for MERGE and overwrite predicates."""
    prefix = f"{alias}." if alias else ""
    return " OR ".join(
        "(" + " AND ".join(f"{prefix}{c} = {v}" for c, v in zip(columns, values, strict=True)) + ")"
        for values in partitions
    )


def replace_partition(
    lake: LakeLocation,
    name: str,
    rows: pl.DataFrame,
    partition: Mapping[str, int],
    *,
    partition_by: Sequence[str],
) -> None:
    """Atomically replace the rows of one partition (a rerun overwrites, never appends);
    creates the table on first use."""
    exists = lake.open(name) is not None
    write_deltalake(
        lake.table_uri(name),
        rows.to_arrow(),
        mode="overwrite",
        predicate=partition_predicate(list(partition), [list(partition.values())])
        if exists
        else None,
        partition_by=list(partition_by),
        storage_options=lake.storage_options or None,
    )


def read_table(lake: LakeLocation, name: str) -> pl.DataFrame:
    """The whole table as a frame (for tests, the CLI and small reference tables)."""
    return pl.read_delta(lake.table_uri(name), storage_options=lake.storage_options or None)


def scan_table(lake: LakeLocation, name: str) -> pl.LazyFrame | None:
    """A lazy scan (partition filters prune files), or None if the table does not exist."""
    if lake.open(name) is None:
        return None
    return pl.scan_delta(lake.table_uri(name), storage_options=lake.storage_options or None)
