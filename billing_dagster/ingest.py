"""One micro-batch: Kafka offsets -> decoded events in raw/ and rejects in quarantine/.

Order matters for exactly-once: quarantine first, then raw, then the consumer-group
commit. Each Delta table keeps its own offsets, so a crash between any two steps is
repaired by the retry without duplicating a row in either table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from billing_dagster.contract import (
    EVENT_HOUR_PARTITIONS,
    QUARANTINE_PARTITIONS,
    QUARANTINE_TABLE,
    RAW_EVENT_SCHEMA,
    RAW_TABLE,
)
from billing_dagster.decoding import decode_json_records
from billing_dagster.delta_lake import LakeLocation, append_exactly_once, committed_offsets
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.offsets import OffsetRange, ReadPlan, check_topic_not_reset, plan_reads


@dataclass(frozen=True)
class IngestReport:
    topic: str
    plan: ReadPlan
    processed_up_to: dict[int, int]
    records_read: int
    events_written: int
    events_already_committed: int
    quarantined_written: int
    quarantined_already_committed: int
    raw_table_version: int | None
    event_hours: tuple[str, ...]

    @property
    def balanced(self) -> bool:
        """Every record read is accounted for exactly once."""
        return self.records_read == (
            self.events_written
            + self.events_already_committed
            + self.quarantined_written
            + self.quarantined_already_committed
        )


def ingest_offsets(
    client: KafkaClient,
    lake: LakeLocation,
    topic: str,
    requested: Sequence[OffsetRange],
    *,
    run_id: str,
    now: datetime | None = None,
) -> IngestReport:
    now = now or datetime.now(UTC)
    raw_table = lake.open(RAW_TABLE)
    quarantine_table = lake.open(QUARANTINE_TABLE)
    partitions = sorted({r.partition for r in requested})
    committed = committed_offsets(raw_table, topic, partitions)
    if any(mark is not None for mark in committed.values()):
        check_topic_not_reset(topic, committed, client.end_offsets(topic))
    plan = plan_reads(requested, committed)

    records, processed_up_to = client.read(topic, plan.reads)
    decoded = decode_json_records(records, run_id=run_id, now=now)

    quarantined = append_exactly_once(
        lake,
        QUARANTINE_TABLE,
        decoded.quarantine,
        topic=topic,
        processed_up_to=processed_up_to if decoded.quarantine.height else {},
        partition_by=QUARANTINE_PARTITIONS,
        table=quarantine_table,
    )
    written = append_exactly_once(
        lake,
        RAW_TABLE,
        decoded.events,
        topic=topic,
        processed_up_to=processed_up_to,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=raw_table,
    )
    # Only after the lake holds the batch: ordinary Kafka tools then show true lag.
    client.commit(topic, processed_up_to)

    hours = decoded.events["created_at"].dt.strftime("%Y-%m-%d-%H:00").unique().sort()
    report = IngestReport(
        topic=topic,
        plan=plan,
        processed_up_to=processed_up_to,
        records_read=records.height,
        events_written=written.rows_written,
        events_already_committed=written.rows_already_committed,
        quarantined_written=quarantined.rows_written,
        quarantined_already_committed=quarantined.rows_already_committed,
        raw_table_version=written.table_version,
        event_hours=tuple(hours.to_list()),
    )
    if not report.balanced:
        raise AssertionError(f"record accounting does not balance: {report}")
    return report


def record_origins(lake: LakeLocation, topic: str, origins: dict[int, int]) -> None:
    """Record where processing starts on partitions the lake has never seen (no rows)."""
    if not origins:
        return
    table = lake.open(RAW_TABLE)
    committed = committed_offsets(table, topic, list(origins))
    unseen = {p: o for p, o in origins.items() if committed[p] is None}
    append_exactly_once(
        lake,
        RAW_TABLE,
        pl.DataFrame(schema=RAW_EVENT_SCHEMA),
        topic=topic,
        processed_up_to=unseen,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=table,
    )
