"""The commits of one decided batch, in order: Postgres staged, billing_events (the
decision), Postgres committed, quarantine. raw/ and the consumer group follow in
ingest.py. Each store keeps its own offsets, so a crash between any two commits is
repaired by the retry without duplicating or losing a row anywhere
(docs/architecture.md, "Exactly once").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from deltalake import DeltaTable

from billing_dagster.cleaning import CleanedBatch
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
from billing_dagster.decisions import set_aside_applied_elsewhere, set_aside_refused
from billing_dagster.decoding import DecodedBatch
from billing_dagster.delta_lake import (
    AppendResult,
    LakeLocation,
    append_exactly_once,
    committed_offsets,
    open_or_create,
)
from billing_dagster.offsets import ReadPlan
from billing_dagster.projection import catch_up
from billing_dagster.serving import ServingResult
from billing_dagster.serving_batch import staged_batch
from billing_dagster.timing import PhaseClock

#: The commits of a batch, in order; `on_step` hears each name right after it lands:
#: "caught_up" after Postgres is brought up to the lake's decided offsets (before the
#: dedupe lookup), "decided" once the batch is judged and nothing of it is written yet,
#: "staged" once Postgres holds the batch's transaction, everything done but COMMIT.
COMMIT_STEPS = (
    "caught_up",
    "decided",
    "staged",
    "billing_events",
    "postgres",
    "quarantine",
    "raw",
    "consumer_group",
)


@dataclass
class BatchTables:
    """The snapshots a batch reads its offsets from and commits on top of, so a commit by
    another writer in between fails Delta's conflict check."""

    raw: DeltaTable
    quarantine: DeltaTable
    events: DeltaTable

    @classmethod
    def open(cls, lake: LakeLocation) -> BatchTables:
        return cls(
            open_or_create(lake, RAW_TABLE, RAW_EVENT_SCHEMA, EVENT_HOUR_PARTITIONS),
            open_or_create(lake, QUARANTINE_TABLE, QUARANTINE_SCHEMA, QUARANTINE_PARTITIONS),
            open_or_create(
                lake, BILLING_EVENTS_TABLE, BILLING_EVENTS_SCHEMA, EVENT_HOUR_PARTITIONS
            ),
        )


def commit_decisions(
    lake: LakeLocation,
    tables: BatchTables,
    topic: str,
    plan: ReadPlan,
    decoded: DecodedBatch,
    cleaned: CleanedBatch,
    processed_up_to: dict[int, int],
    serving_url: str | None,
    run_id: str,
    now: datetime,
    step: Callable[[str], None],
    clock: PhaseClock,
) -> tuple[CleanedBatch, AppendResult, AppendResult, ServingResult | None]:
    """billing_events first: its commit is the decision, made once per offset (it advances
    every partition read, even one with nothing accepted). With Postgres, the batch's
    transaction is staged just before that commit, so rows Postgres cannot take (a value
    its types refuse, a balance past DECIMAL(12,2)) go to quarantine while nothing is
    decided yet, and committed just after it. Then quarantine."""
    ranges = {r.partition: (r.start, processed_up_to[r.partition]) for r in plan.reads}
    if serving_url is None:
        accepted = _append_billing_events(lake, tables, topic, cleaned, processed_up_to)
        clock.lap("write_billing_events")
        step("billing_events")
        serving = None
    else:
        # A gap below the batch (a partition Postgres has never seen; a mark lost since
        # the catch-up at the start of the run) is applied from billing_events first.
        catch_up(serving_url, lake, topic, {p: s for p, (s, _) in ranges.items()}, run_id=run_id)
        with staged_batch(
            serving_url, cleaned.accepted, topic=topic, ranges=ranges, run_id=run_id
        ) as staged:
            clock.lap("serving_stage")
            decided = committed_offsets(tables.events, topic, sorted(ranges))
            cleaned = set_aside_refused(
                cleaned, decoded.events, staged.refused, decided, run_id=run_id, now=now
            )
            cleaned = set_aside_applied_elsewhere(
                cleaned, decoded.events, staged.applied_elsewhere, decided, run_id=run_id, now=now
            )
            step("staged")
            accepted = _append_billing_events(lake, tables, topic, cleaned, processed_up_to)
            clock.lap("write_billing_events")
            step("billing_events")
            serving = staged.commit()
            clock.lap("serving_commit")
            step("postgres")
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
    return cleaned, accepted, quarantined, serving


def _append_billing_events(
    lake: LakeLocation,
    tables: BatchTables,
    topic: str,
    cleaned: CleanedBatch,
    processed_up_to: dict[int, int],
) -> AppendResult:
    return append_exactly_once(
        lake,
        BILLING_EVENTS_TABLE,
        cleaned.accepted,
        topic=topic,
        processed_up_to=processed_up_to,
        partition_by=EVENT_HOUR_PARTITIONS,
        table=tables.events,
    )
