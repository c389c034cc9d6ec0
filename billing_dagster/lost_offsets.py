"""Offsets deleted by retention before the lake processed them, and their acknowledgement.

A partition has *lost* offsets when the lake's next offset to read (raw/'s mark) is below
Kafka's low watermark: [mark, low) can never be read. Those offsets are never skipped
silently, and they no longer stop everything either:

- the sensor plans runs for the other partitions and leaves the lost one out;
- a run leaves it out of its reads (its marks stay where they are) and processes the rest;
- `billing-dagster status`, the lag alert and the "Offsets Lost" alert name it;
- an operator acknowledges the loss (`billing-dagster topic acknowledge-gap`): an audited
  row in `control/acknowledged_gaps`, then the partition's marks move past the gap in the
  ingest commit order (billing_events, quarantine, raw/), with no rows. Postgres follows
  through its catch-up from billing_events, which holds nothing for the gap.
"""

from __future__ import annotations

import getpass
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import polars as pl
from deltalake import CommitProperties, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
    QUARANTINE_PARTITIONS,
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    RAW_EVENT_SCHEMA,
    RAW_TABLE,
)
from billing_dagster.delta_lake import (
    LakeLocation,
    append_exactly_once,
    committed_offsets,
    open_or_create,
    read_table,
)
from billing_dagster.kafka_io import KafkaClient, OffsetsLostError
from billing_dagster.offsets import OffsetRange, ReadPlan

GAPS_TABLE = "control/acknowledged_gaps"
GAPS_SCHEMA: dict[str, pl.DataType] = {
    #: The topic key (billing_dagster/topic_identity.py): name, or name@generation.
    "topic": pl.String(),
    "kafka_partition": pl.Int32(),
    "from_offset": pl.Int64(),
    "to_offset": pl.Int64(),
    "reason": pl.String(),
    "acknowledged_at": pl.Datetime("us", "UTC"),
    "acknowledged_by": pl.String(),
}
RUNBOOK = "docs/runbooks/offsets-lost.md"


def lost_offsets(
    marks: Mapping[int, int | None], lows: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """{partition: (lake mark, low watermark)} where retention deleted offsets the lake
    never read. A partition the lake has never seen (mark None) starts at the low
    watermark, so it has lost nothing."""
    return {
        p: (mark, lows[p])
        for p, mark in sorted(marks.items())
        if mark is not None and p in lows and mark < lows[p]
    }


def describe_lost(topic: str, lost: Mapping[int, tuple[int, int]]) -> str:
    ranges = ", ".join(f"{p}:{start}-{low}" for p, (start, low) in sorted(lost.items()))
    count = sum(low - start for start, low in lost.values())
    return (
        f"{count:,} offsets of {topic} were deleted by retention before the lake read them "
        f"(partition:from-to {ranges}); those partitions wait for an operator: "
        f"`billing-dagster topic acknowledge-gap --partition P --reason '...'` ({RUNBOOK})"
    )


def without_lost(plan: ReadPlan, lows: Mapping[int, int]) -> ReadPlan:
    """The plan without the reads that would start below their partition's low
    watermark, those partitions moved to `plan.lost`: reading them would fail the batch,
    and reading from the low watermark would move the marks over the gap unacknowledged."""
    lost = {
        r.partition: OffsetRange(r.partition, r.start, lows[r.partition])
        for r in plan.reads
        if r.partition in lows and r.start < lows[r.partition]
    }
    if not lost:
        return plan
    return replace(
        plan,
        reads=tuple(r for r in plan.reads if r.partition not in lost),
        gaps_covered=tuple(g for g in plan.gaps_covered if g.partition not in lost),
        lost=tuple(sorted((*plan.lost, *lost.values()))),
    )


def read_retained(
    client: KafkaClient, topic: str, plan: ReadPlan
) -> tuple[pl.DataFrame, dict[int, int], ReadPlan]:
    """Read the plan; a partition whose offsets retention deletes meanwhile leaves the
    plan (into `lost`) and the others are read again. Returns (records, offset each
    partition's read stopped at, the plan read)."""
    while True:
        try:
            records, reached = client.read(topic, plan.reads)
            return records, reached, plan
        except OffsetsLostError as exc:
            if exc.partition not in {r.partition for r in plan.reads}:
                raise
            low = client.watermarks(topic)[exc.partition][0]
            # The low watermark only grows: the next read cannot meet this partition again.
            plan = without_lost(plan, {exc.partition: max(low, (exc.offset or 0) + 1)})


# ---- acknowledged gaps ------------------------------------------------------------------


@dataclass(frozen=True)
class AcknowledgedGap:
    topic: str
    partition: int
    start: int
    end: int
    reason: str
    acknowledged_at: datetime
    acknowledged_by: str

    @property
    def size(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "from": self.start,
            "to": self.end,
            "reason": self.reason,
            "acknowledged_at": self.acknowledged_at.isoformat(),
            "acknowledged_by": self.acknowledged_by,
        }


def acknowledged_gaps(lake: LakeLocation, topic: str) -> list[AcknowledgedGap]:
    """The gaps acknowledged on topic key `topic`, oldest first."""
    if lake.open(GAPS_TABLE) is None:
        return []
    rows = read_table(lake, GAPS_TABLE).filter(pl.col("topic") == topic).sort("acknowledged_at")
    return [
        AcknowledgedGap(
            r["topic"],
            r["kafka_partition"],
            r["from_offset"],
            r["to_offset"],
            r["reason"],
            r["acknowledged_at"],
            r["acknowledged_by"],
        )
        for r in rows.iter_rows(named=True)
    ]


def _record_gap(lake: LakeLocation, gap: AcknowledgedGap) -> None:
    """Exactly once per gap end (app transaction `gap:<topic>:<partition>` = the offset
    gaps are acknowledged up to), so a retried acknowledgement does not record it twice."""
    table = open_or_create(lake, GAPS_TABLE, GAPS_SCHEMA, [])
    app = f"gap:{gap.topic}:{gap.partition}"
    recorded = table.transaction_version(app)
    if recorded is not None and recorded >= gap.end:
        return
    row = pl.DataFrame(
        [
            {
                "topic": gap.topic,
                "kafka_partition": gap.partition,
                "from_offset": gap.start,
                "to_offset": gap.end,
                "reason": gap.reason,
                "acknowledged_at": gap.acknowledged_at,
                "acknowledged_by": gap.acknowledged_by,
            }
        ],
        schema=GAPS_SCHEMA,
    )
    properties = CommitProperties(app_transactions=[Transaction(app, gap.end)])
    try:
        write_deltalake(table, row.to_arrow(), mode="append", commit_properties=properties)
    except CommitFailedError:
        # Another acknowledgement of this partition landed first; it holds the audit row.
        return


#: The ingest commit order (billing_dagster/ingest.py): a crash between two of these
#: leaves marks a retry of the acknowledgement, or a run, takes on from.
_ADVANCE_ORDER = (
    (BILLING_EVENTS_TABLE, BILLING_EVENTS_SCHEMA, EVENT_HOUR_PARTITIONS),
    (QUARANTINE_TABLE, QUARANTINE_SCHEMA, QUARANTINE_PARTITIONS),
    (RAW_TABLE, RAW_EVENT_SCHEMA, EVENT_HOUR_PARTITIONS),
)


def acknowledge_gap(
    lake: LakeLocation,
    topic: str,
    partition: int,
    low: int,
    *,
    reason: str,
    by: str | None = None,
) -> AcknowledgedGap:
    """Record the loss of [raw/'s mark, `low`) on `partition` of topic key `topic`, then
    move the lake's marks there. Safe to repeat after a crash: the audit row is written
    once, and each table's mark only moves forward."""
    from billing_dagster.operations import OperationError

    if not reason.strip():
        raise OperationError("--reason is required: say why these offsets may be skipped")
    mark = committed_offsets(lake.open(RAW_TABLE), topic, [partition])[partition]
    if mark is None or mark >= low:
        shown = "has never read it" if mark is None else f"is at offset {mark}"
        raise OperationError(
            f"partition {partition} of {topic} has no lost offsets: the lake {shown} and "
            f"Kafka keeps offsets from {low}"
        )
    gap = AcknowledgedGap(
        topic, partition, mark, low, reason.strip(), datetime.now(UTC), by or getpass.getuser()
    )
    _record_gap(lake, gap)
    for name, schema, partition_by in _ADVANCE_ORDER:
        append_exactly_once(
            lake,
            name,
            pl.DataFrame(schema=schema),
            topic=topic,
            processed_up_to={partition: low},
            partition_by=partition_by,
            table=open_or_create(lake, name, schema, partition_by),
        )
    return gap
