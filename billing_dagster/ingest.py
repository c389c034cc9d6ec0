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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import polars as pl

from billing_dagster.batch_commit import BatchTables, commit_decisions
from billing_dagster.circuit_breaker import BreakerPolicy, check_batch
from billing_dagster.cleaning import CleanedBatch, clean_events
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
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
    scan_table,
)
from billing_dagster.enrichment import ReferenceData
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.lake_barrier import committing_batch
from billing_dagster.lost_offsets import read_retained, without_lost
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
from billing_dagster.rules import DEFAULT_LIMITS, RETURN_TYPES, ContractLimits, ValidationPolicy
from billing_dagster.serving import ServingResult
from billing_dagster.timing import PhaseClock


@dataclass(frozen=True)
class CleaningContext:
    """How this topic's values are decoded and judged."""

    reference: ReferenceData
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    value_format: ValueFormat = ValueFormat.JSON
    registry: SchemaSource | None = None
    #: How far apart in event time two deliveries of one event_id are still recognised.
    dedupe_horizon: timedelta = DEFAULT_HORIZON
    #: When one rule's rejects hold the batch instead of going to quarantine.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    #: Sizes past which a record, its event_id or its metadata is quarantined.
    limits: ContractLimits = DEFAULT_LIMITS


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
    tables = BatchTables.open(lake)
    partitions = sorted({r.partition for r in requested})
    committed = committed_offsets(tables.raw, topic, partitions)
    watermarks = client.watermarks(topic)
    ends = {p: high for p, (_, high) in watermarks.items()}
    if any(mark is not None for mark in committed.values()):
        check_topic_not_reset(topic, committed, ends)
    # A partition whose next offset retention deleted is left out (plan.lost, its marks
    # stay until an operator acknowledges the gap); the others are processed.
    plan = without_lost(
        plan_reads(requested, committed), {p: low for p, (low, _) in watermarks.items()}
    )
    decided = decided_marks(
        lake, topic, sorted(ends), events_table=tables.events, raw_table=tables.raw
    )
    clock.lap("plan")

    records, processed_up_to, plan = read_retained(client, topic, plan)
    clock.lap("kafka_read")
    decoded = decode_records(
        records,
        value_format=cleaning.value_format,
        registry=cleaning.registry,
        run_id=run_id,
        now=now,
        limits=cleaning.limits,
    )
    clock.lap("decode")
    prior, caught_up = _accepted_before(
        lake, topic, decoded, cleaning, serving_url, decided, run_id, step
    )
    clock.lap("dedupe_lookup")
    cleaned = _decide(lake, tables, topic, plan, decoded, prior, cleaning, run_id, now)
    clock.lap("clean")
    # Before anything is committed: one rule failing much of the batch holds all of it.
    check_batch(cleaning.breaker, cleaned.quarantine, records, decided, run_id=run_id)
    step("decided")

    # From the first lake commit to the last, readers that compare stores wait (and this
    # waits for them): lake_barrier.py.
    with committing_batch(serving_url):
        cleaned, accepted, quarantined, serving = commit_decisions(
            lake,
            tables,
            topic,
            plan,
            decoded,
            cleaned,
            processed_up_to,
            serving_url,
            run_id,
            now,
            step,
            clock,
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
    tables: BatchTables,
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
