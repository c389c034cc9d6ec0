"""One micro-batch: Kafka offsets -> every delivery in raw/, accepted events in
billing_events/, rejects in quarantine/, the accepted events' money in Postgres.

Order matters for exactly-once (docs/architecture.md): billing_events first (its commit is
the batch's decision, made once per offset), then quarantine beside the Postgres
transaction (which applies exactly the rows billing_events committed), then raw/ (whose
offsets mark a finished batch), then the consumer-group commit. Each store keeps its own
offsets, so a crash between any two steps is repaired by the retry without duplicating or
losing a row anywhere; before deciding, Postgres is caught up to every offset the lake has
decided, so it can serve as the dedupe index.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import polars as pl
from deltalake import DeltaTable

from billing_dagster.cleaning import CleanedBatch, clean_events
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
from billing_dagster.decisions import keep_decisions
from billing_dagster.decoding import DecodedBatch, SchemaSource, ValueFormat, decode_records
from billing_dagster.dedupe import (
    DEFAULT_HORIZON,
    ServingBehindError,
    accepted_before_in_lake,
    accepted_before_in_serving,
)
from billing_dagster.delta_lake import (
    AppendResult,
    LakeLocation,
    append_exactly_once,
    committed_offsets,
    open_or_create,
    scan_table,
)
from billing_dagster.enrichment import ReferenceData
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.offsets import (
    HOUR_KEY_FORMAT,
    OffsetRange,
    ReadPlan,
    check_topic_not_reset,
    plan_reads,
)
from billing_dagster.projection import (
    CatchUp,
    catch_up,
    committed_events,
    decided_marks,
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
    #: How far apart in event time two deliveries of one event_id are still recognised.
    dedupe_horizon: timedelta = DEFAULT_HORIZON


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
    #: What the run applied from billing_events before its batch (Postgres was behind).
    serving_repair: CatchUp = field(default_factory=CatchUp)
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


#: The commits of a batch, in order; `on_step` hears each name right after it lands:
#: "caught_up" after Postgres is brought up to the lake's decided offsets (before the
#: dedupe lookup), "decided" once the batch is judged and nothing of it is written yet.
COMMIT_STEPS = (
    "caught_up",
    "decided",
    "billing_events",
    "quarantine",
    "postgres",
    "raw",
    "consumer_group",
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
    on_step: Callable[[str], None] | None = None,
) -> IngestReport:
    """`serving_url`: the Postgres serving layer to apply accepted events to (None: the lake
    only, as the lake benchmarks do). `on_step`: called after each of COMMIT_STEPS (the
    crash tests kill the process there)."""
    now = now or datetime.now(UTC)
    step = on_step or (lambda _name: None)
    clock = PhaseClock()
    tables = _BatchTables.open(lake)
    partitions = sorted({r.partition for r in requested})
    committed = committed_offsets(tables.raw, topic, partitions)
    ends = client.end_offsets(topic)
    if any(mark is not None for mark in committed.values()):
        check_topic_not_reset(topic, committed, ends)
    plan = plan_reads(requested, committed)
    decided = decided_marks(
        lake, topic, sorted(ends), events_table=tables.events, raw_table=tables.raw
    )
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
    prior, caught_up = _accepted_before(
        lake, topic, decoded, cleaning, serving_url, decided, run_id, step
    )
    clock.lap("dedupe_lookup")
    cleaned = _decide(lake, tables, topic, plan, decoded, prior, cleaning, run_id, now)
    clock.lap("clean")
    step("decided")

    accepted, quarantined, serving = _commit_decisions(
        lake, tables, topic, plan, cleaned, processed_up_to, serving_url, run_id, step, clock
    )
    raw = append_exactly_once(
        lake,
        RAW_TABLE,
        decoded.raw_rows,
        topic=topic,
        processed_up_to=processed_up_to,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=tables.raw,
    )
    clock.lap("write_raw")
    step("raw")
    # Only after the lake holds the batch: ordinary Kafka tools then show true lag. The
    # lake's marks of ranges read earlier too: a retry after raw/ reads nothing.
    client.commit(
        topic, {**{p: m for p, m in committed.items() if m is not None}, **processed_up_to}
    )
    clock.lap("kafka_commit")
    step("consumer_group")

    report = _report(
        topic, plan, processed_up_to, records.height, cleaned, accepted, quarantined, raw
    )
    report = replace(report, serving=serving, serving_repair=caught_up, timings=clock.laps)
    if not report.balanced:
        raise AssertionError(f"record accounting does not balance: {report}")
    return report


@dataclass
class _BatchTables:
    """The snapshots a batch reads its offsets from and commits on top of, so a commit by
    another writer in between fails Delta's conflict check."""

    raw: DeltaTable
    quarantine: DeltaTable
    events: DeltaTable

    @classmethod
    def open(cls, lake: LakeLocation) -> _BatchTables:
        return cls(
            open_or_create(lake, RAW_TABLE, RAW_EVENT_SCHEMA, EVENT_HOUR_PARTITIONS),
            open_or_create(lake, QUARANTINE_TABLE, QUARANTINE_SCHEMA, QUARANTINE_PARTITIONS),
            open_or_create(
                lake, BILLING_EVENTS_TABLE, BILLING_EVENTS_SCHEMA, EVENT_HOUR_PARTITIONS
            ),
        )


def _accepted_before(
    lake: LakeLocation,
    topic: str,
    decoded: DecodedBatch,
    cleaning: CleaningContext,
    serving_url: str | None,
    decided: dict[int, int | None],
    run_id: str,
    step: Callable[[str], None],
) -> tuple[pl.DataFrame, CatchUp]:
    """Earlier deliveries of the batch's event_ids, and what Postgres had to be caught up
    by first: the lookup reads transaction_history, so it must hold every offset the lake
    decided, checked in the lookup's own snapshot."""
    if serving_url is None:
        return accepted_before_in_lake(lake, decoded.events, cleaning.dedupe_horizon), CatchUp()
    caught_up = CatchUp()
    for attempt in range(3):
        caught_up = caught_up.then(catch_up(serving_url, lake, topic, decided, run_id=run_id))
        step("caught_up")
        try:
            prior = accepted_before_in_serving(
                serving_url,
                decoded.events,
                cleaning.dedupe_horizon,
                topic=topic,
                caught_up_to=decided,
            )
            return prior, caught_up
        except ServingBehindError:
            # Postgres lost the catch-up's commit (it restarted without it): again.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _decide(
    lake: LakeLocation,
    tables: _BatchTables,
    topic: str,
    plan: ReadPlan,
    decoded: DecodedBatch,
    prior: pl.DataFrame,
    cleaning: CleaningContext,
    run_id: str,
    now: datetime,
) -> CleanedBatch:
    """Enrich and judge the batch, deduped against `prior`; offsets billing_events
    already decided keep that decision."""
    payments = first_payments(lake, decoded.events)
    cleaned = clean_events(
        decoded.events,
        accepted_before=prior,
        first_payments=payments,
        reference=cleaning.reference,
        policy=cleaning.policy,
        run_id=run_id,
        now=now,
    )
    cleaned = CleanedBatch(
        cleaned.accepted,
        cleaned.duplicates,
        pl.concat([decoded.quarantine, cleaned.quarantine]),
    )
    starts = {r.partition: r.start for r in plan.reads}
    decided = committed_offsets(tables.events, topic, sorted(starts))
    earlier = {p: mark for p, mark in decided.items() if mark is not None and mark > starts[p]}
    if not earlier:
        return cleaned
    committed = committed_events(lake, topic, {p: (starts[p], m) for p, m in earlier.items()})
    return keep_decisions(cleaned, decoded.events, committed, earlier, run_id=run_id, now=now)


def _commit_decisions(
    lake: LakeLocation,
    tables: _BatchTables,
    topic: str,
    plan: ReadPlan,
    cleaned: CleanedBatch,
    processed_up_to: dict[int, int],
    serving_url: str | None,
    run_id: str,
    step: Callable[[str], None],
    clock: PhaseClock,
) -> tuple[AppendResult, AppendResult, ServingResult | None]:
    """billing_events first: its commit is the decision, made once per offset (it advances
    every partition read, even one with nothing accepted). Then quarantine beside the
    Postgres transaction, which applies exactly the rows billing_events now holds."""
    accepted = append_exactly_once(
        lake,
        BILLING_EVENTS_TABLE,
        cleaned.accepted,
        topic=topic,
        processed_up_to=processed_up_to,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=tables.events,
    )
    clock.lap("write_billing_events")
    step("billing_events")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="serving") as pool:
        # Independent stores, both waiting on I/O or native code: side by side.
        applying = (
            pool.submit(
                _timed,
                _apply_to_serving,
                serving_url,
                lake,
                topic,
                cleaned.accepted,
                {r.partition: (r.start, processed_up_to[r.partition]) for r in plan.reads},
                run_id,
            )
            if serving_url is not None
            else None
        )
        quarantined = append_exactly_once(
            lake,
            QUARANTINE_TABLE,
            cleaned.quarantine,
            topic=topic,
            processed_up_to=processed_up_to if cleaned.quarantine.height else {},
            partition_by=QUARANTINE_PARTITIONS,
            table=tables.quarantine,
        )
        clock.lap("write_quarantine")
        step("quarantine")
        serving = None
        if applying is not None:
            serving, serving_s = applying.result()
            clock.lap("serving_wait")
            clock.laps["serving (beside the quarantine append)"] = serving_s
            step("postgres")
    return accepted, quarantined, serving


def _apply_to_serving(
    url: str,
    lake: LakeLocation,
    topic: str,
    accepted: pl.DataFrame,
    ranges: dict[int, tuple[int, int]],
    run_id: str,
) -> ServingResult:
    """The batch's committed rows, after any gap below its ranges (a partition Postgres
    has never seen; a mark lost since the catch-up at the start of the run)."""
    catch_up(url, lake, topic, {p: start for p, (start, _) in ranges.items()}, run_id=run_id)
    return apply_batch(url, accepted, topic=topic, ranges=ranges, run_id=run_id)


def _report(
    topic: str,
    plan: ReadPlan,
    processed_up_to: dict[int, int],
    records_read: int,
    cleaned: CleanedBatch,
    accepted: AppendResult,
    quarantined: AppendResult,
    raw: AppendResult,
) -> IngestReport:
    hours = cleaned.accepted["created_at"].dt.strftime(HOUR_KEY_FORMAT).unique().sort()
    by_rule = (
        cleaned.quarantine.select(pl.col("rules").list.first().alias("rule"))
        .group_by("rule")
        .len()
        .sort("rule")
    )
    return IngestReport(
        topic=topic,
        plan=plan,
        processed_up_to=processed_up_to,
        records_read=records_read,
        accepted_written=accepted.rows_written,
        accepted_already_committed=cleaned.accepted.height - accepted.rows_written,
        duplicates=cleaned.duplicates.height,
        quarantined_written=quarantined.rows_written,
        quarantined_already_committed=cleaned.quarantine.height - quarantined.rows_written,
        raw_written=raw.rows_written,
        raw_table_version=raw.table_version,
        billing_events_version=accepted.table_version,
        event_hours=tuple(hours.to_list()),
        quarantined_by_rule=dict(by_rule.iter_rows()),
    )


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
