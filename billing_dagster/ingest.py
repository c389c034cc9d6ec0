"""One micro-batch: Kafka offsets -> every delivery in raw/, accepted events in
billing_events/, rejects in quarantine/.

Order matters for exactly-once: quarantine, then billing_events, then the Postgres serving
layer (balances and history, one transaction), then raw (whose offsets mark a finished
batch), then the consumer-group commit. Each Delta table keeps its own
offsets, so a crash between any two steps is repaired by the retry without duplicating a
row in any table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import polars as pl

from billing_dagster.cleaning import PRIOR_COLUMNS, clean_events
from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
    QUARANTINE_PARTITIONS,
    QUARANTINE_TABLE,
    RAW_EVENT_SCHEMA,
    RAW_TABLE,
)
from billing_dagster.decoding import SchemaSource, ValueFormat, decode_records
from billing_dagster.delta_lake import (
    LakeLocation,
    append_exactly_once,
    committed_offsets,
    partition_filter,
    scan_table,
)
from billing_dagster.enrichment import ReferenceData
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.offsets import (
    HOUR_KEY_FORMAT,
    OffsetRange,
    ReadPlan,
    check_topic_not_reset,
    parse_hour_key,
    plan_reads,
)
from billing_dagster.rules import RETURN_TYPES, ValidationPolicy
from billing_dagster.serving import ServingResult, apply_batch
from billing_dagster.timing import PhaseClock

T = TypeVar("T")


@dataclass(frozen=True)
class CleaningContext:
    """How this topic's values are decoded and judged."""

    reference: ReferenceData
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    value_format: ValueFormat = ValueFormat.JSON
    registry: SchemaSource | None = None


@dataclass(frozen=True)
class IngestReport:
    topic: str
    plan: ReadPlan
    processed_up_to: dict[int, int]
    records_read: int
    accepted_written: int
    accepted_already_committed: int
    duplicates: int
    quarantined_written: int
    quarantined_already_committed: int
    raw_written: int
    raw_table_version: int | None
    billing_events_version: int | None
    event_hours: tuple[str, ...]
    quarantined_by_rule: dict[str, int]
    serving: ServingResult | None = None
    #: Seconds per phase of the batch (read, decode, lookups, clean, each write, commit).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.accepted_written + self.accepted_already_committed

    @property
    def quarantined(self) -> int:
        return self.quarantined_written + self.quarantined_already_committed

    @property
    def balanced(self) -> bool:
        """Every record read is accepted, a duplicate or quarantined: exactly one of them."""
        return self.records_read == self.accepted + self.duplicates + self.quarantined


def _hour_filter(hours: pl.DataFrame) -> pl.Expr:
    """A predicate on the year/month/day/hour partition columns of these rows' hours."""
    return partition_filter(
        EVENT_HOUR_PARTITIONS, hours.select(EVENT_HOUR_PARTITIONS).unique().iter_rows()
    )


def _hour_keys_filter(hour_keys: Sequence[str]) -> pl.Expr:
    hours = [parse_hour_key(k) for k in hour_keys]
    return partition_filter(
        EVENT_HOUR_PARTITIONS, [(h.year, h.month, h.day, h.hour) for h in hours]
    )


def _offsets_filter(topic: str, ranges: Sequence[OffsetRange]) -> pl.Expr:
    within = pl.lit(False)
    for r in ranges:
        within = within | (
            (pl.col("kafka_partition") == r.partition)
            & (pl.col("kafka_offset") >= r.start)
            & (pl.col("kafka_offset") < r.end)
        )
    return (pl.col("kafka_topic") == topic) & within


POSITION = ("kafka_topic", "kafka_partition", "kafka_offset")


def batch_events(
    lake: LakeLocation, topic: str, hour_keys: Sequence[str], ranges: Sequence[OffsetRange]
) -> pl.DataFrame:
    """What the quality check judges: the billing_events rows of one batch (its offset
    ranges, in the event hours it touched, as in the ingest metadata '2024-12-15-14:00'),
    followed by every other row of those hours that shares an event_id or a Kafka position
    with another row there.

    The aggregates recompute the touched hours, so a second row for any event there
    matters; finding them takes the event_id and position columns only. The expectations
    then run over the batch and those rows, not over hours that grow all day."""
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    if scan is None or not hour_keys or not ranges:
        return pl.DataFrame(schema=BILLING_EVENTS_SCHEMA)
    hours = scan.filter(_hour_keys_filter(hour_keys))
    own = _offsets_filter(topic, ranges)
    batch = hours.filter(own).collect()
    repeated_ids = hours.group_by("event_id").len().filter(pl.col("len") > 1).collect()["event_id"]
    repeated_positions = (
        hours.group_by(POSITION).len().filter(pl.col("len") > 1).drop("len").collect()
    )
    suspects = pl.concat([batch["event_id"], repeated_ids]).unique()
    others = hours.filter(~own)
    twins = others.filter(pl.col("event_id").is_in(suspects.implode())).collect()
    if repeated_positions.height:
        same_position = others.join(repeated_positions.lazy(), on=POSITION, how="semi")
        twins = pl.concat(
            [twins, same_position.filter(~pl.col("event_id").is_in(suspects.implode())).collect()]
        )
    return pl.concat([batch, twins])


def accepted_before(lake: LakeLocation, events: pl.DataFrame) -> pl.DataFrame:
    """billing_events rows sharing an event_id with the batch. A redelivery carries the
    same event, so the same created_at: only the batch's event hours are read."""
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    if scan is None or events.is_empty():
        return pl.DataFrame(schema={c: BILLING_EVENTS_SCHEMA[c] for c in PRIOR_COLUMNS})
    return (
        scan.filter(_hour_filter(events))
        .filter(pl.col("event_id").is_in(events["event_id"].unique().implode()))
        .select(PRIOR_COLUMNS)
        .collect()
    )


def first_payments(lake: LakeLocation, events: pl.DataFrame) -> pl.DataFrame:
    """Earliest accepted PAYMENT per customer, for customers with a refund or chargeback
    in the batch."""
    empty = pl.DataFrame(
        schema={"customer_id": pl.Int64, "first_payment_at": pl.Datetime("us", "UTC")}
    )
    customers = events.filter(pl.col("transaction_type").is_in(RETURN_TYPES))["customer_id"]
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    if scan is None or customers.is_empty():
        return empty
    return (
        scan.filter(
            (pl.col("transaction_type") == "PAYMENT")
            & pl.col("customer_id").is_in(customers.unique().implode())
        )
        .group_by("customer_id")
        .agg(pl.col("created_at").min().alias("first_payment_at"))
        .collect()
        .cast(empty.schema)
    )


def ingest_offsets(
    client: KafkaClient,
    lake: LakeLocation,
    topic: str,
    requested: Sequence[OffsetRange],
    *,
    cleaning: CleaningContext,
    serving_url: str | None = None,
    run_id: str,
    now: datetime | None = None,
) -> IngestReport:
    """`serving_url`: the Postgres serving layer to apply accepted events to (None: the lake
    only, as the lake benchmarks do)."""
    now = now or datetime.now(UTC)
    clock = PhaseClock()
    # raw/ is written last, so its offsets mark batches that are completely done.
    raw_table = lake.open(RAW_TABLE)
    quarantine_table = lake.open(QUARANTINE_TABLE)
    events_table = lake.open(BILLING_EVENTS_TABLE)
    partitions = sorted({r.partition for r in requested})
    committed = committed_offsets(raw_table, topic, partitions)
    if any(mark is not None for mark in committed.values()):
        check_topic_not_reset(topic, committed, client.end_offsets(topic))
    plan = plan_reads(requested, committed)
    clock.lap("plan")

    records, processed_up_to = client.read(topic, plan.reads)
    clock.lap("kafka_read")
    decoded = decode_records(
        records,
        value_format=cleaning.value_format,
        registry=cleaning.registry,
        run_id=run_id,
        now=now,
    )
    clock.lap("decode")
    prior = accepted_before(lake, decoded.events)
    payments = first_payments(lake, decoded.events)
    clock.lap("dedupe_lookups")
    cleaned = clean_events(
        decoded.events,
        accepted_before=prior,
        first_payments=payments,
        reference=cleaning.reference,
        policy=cleaning.policy,
        run_id=run_id,
        now=now,
    )
    quarantine = pl.concat([decoded.quarantine, cleaned.quarantine])
    clock.lap("clean")

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="serving") as pool:
        # The Postgres transaction and the two Delta appends are independent (each store
        # keeps its own offsets) and both wait on I/O or native code: run them side by
        # side. raw/, the mark of a finished batch, still waits for all of them.
        applying = (
            pool.submit(
                _timed,
                apply_batch,
                serving_url,
                cleaned.accepted,
                topic=topic,
                processed_up_to=processed_up_to,
                run_id=run_id,
            )
            if serving_url is not None
            else None
        )
        quarantined = append_exactly_once(
            lake,
            QUARANTINE_TABLE,
            quarantine,
            topic=topic,
            processed_up_to=processed_up_to if quarantine.height else {},
            partition_by=QUARANTINE_PARTITIONS,
            table=quarantine_table,
        )
        clock.lap("write_quarantine")
        accepted = append_exactly_once(
            lake,
            BILLING_EVENTS_TABLE,
            cleaned.accepted,
            topic=topic,
            processed_up_to=processed_up_to if cleaned.accepted.height else {},
            partition_by=EVENT_HOUR_PARTITIONS,
            table=events_table,
        )
        clock.lap("write_billing_events")
        serving = None
        if applying is not None:
            serving, serving_s = applying.result()
            clock.lap("serving_wait")
            clock.laps["serving (beside the Delta appends)"] = serving_s
    raw = append_exactly_once(
        lake,
        RAW_TABLE,
        decoded.raw_rows,
        topic=topic,
        processed_up_to=processed_up_to,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=raw_table,
    )
    clock.lap("write_raw")
    # Only after the lake holds the batch: ordinary Kafka tools then show true lag.
    client.commit(topic, processed_up_to)
    clock.lap("kafka_commit")

    hours = cleaned.accepted["created_at"].dt.strftime(HOUR_KEY_FORMAT).unique().sort()
    by_rule = (
        quarantine.select(pl.col("rules").list.first().alias("rule"))
        .group_by("rule")
        .len()
        .sort("rule")
    )
    report = IngestReport(
        topic=topic,
        plan=plan,
        processed_up_to=processed_up_to,
        records_read=records.height,
        accepted_written=accepted.rows_written,
        accepted_already_committed=accepted.rows_already_committed,
        duplicates=cleaned.duplicates.height,
        quarantined_written=quarantined.rows_written,
        quarantined_already_committed=quarantined.rows_already_committed,
        raw_written=raw.rows_written,
        raw_table_version=raw.table_version,
        billing_events_version=accepted.table_version,
        event_hours=tuple(hours.to_list()),
        quarantined_by_rule=dict(by_rule.iter_rows()),
        serving=serving,
        timings=clock.laps,
    )
    if not report.balanced:
        raise AssertionError(f"record accounting does not balance: {report}")
    return report


def _timed(function: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


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
