"""Postgres as a projection of the lake: which offsets each store holds, and the catch-up
that brings the serving marks up to the lake's from billing_events.

The lake decides: an offset is *decided* once billing_events (written first) or raw/
(written last) records it in a Delta app transaction. The accept/quarantine decision of
every decided offset is final, and billing_events holds the accepted rows. Postgres may be
behind at any time (a crash between the two commits, a commit lost to non-durable
settings, a restore from backup, a failover to a lagging replica): the missing offsets are
applied from billing_events, never recomputed from Kafka.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import polars as pl
from deltalake import DeltaTable

from billing_dagster.contract import BILLING_EVENTS_SCHEMA, BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import LakeLocation, committed_offsets
from billing_dagster.serving import REPAIR, Ranges, ServingResult, serving_marks
from billing_dagster.serving_batch import apply_batch


def decided_marks(
    lake: LakeLocation,
    topic: str,
    partitions: Sequence[int],
    *,
    events_table: DeltaTable | None = None,
    raw_table: DeltaTable | None = None,
) -> dict[int, int | None]:
    """Next undecided offset per partition (None: the lake has never seen it)."""
    events = committed_offsets(events_table or lake.open(BILLING_EVENTS_TABLE), topic, partitions)
    raw = committed_offsets(raw_table or lake.open(RAW_TABLE), topic, partitions)
    return {
        p: max((m for m in (events[p], raw[p]) if m is not None), default=None) for p in partitions
    }


def processed_offsets(
    lake: Mapping[int, int | None], serving: Mapping[int, int] | None
) -> dict[int, int | None]:
    """An offset counts as processed once both stores hold it: min(lake, serving) per
    partition (`serving` None: Postgres is out of reach, so the lake's alone)."""
    if serving is None:
        return dict(lake)
    return {p: None if m is None else min(m, serving.get(p, 0)) for p, m in lake.items()}


def offsets_filter(topic: str, ranges: Ranges) -> pl.Expr:
    """Rows of `topic` in any of `ranges` ({partition: (start, end)})."""
    within = pl.lit(False)
    for partition, (start, end) in ranges.items():
        within = within | (
            (pl.col("kafka_partition") == partition)
            & (pl.col("kafka_offset") >= start)
            & (pl.col("kafka_offset") < end)
        )
    return (pl.col("kafka_topic") == topic) & within


def committed_events(lake: LakeLocation, topic: str, ranges: Ranges) -> pl.DataFrame:
    """The billing_events rows of `topic` in `ranges`, as committed."""
    empty = pl.DataFrame(schema=BILLING_EVENTS_SCHEMA)
    ranges = {p: r for p, r in ranges.items() if r[1] > r[0]}
    if not ranges or lake.open(BILLING_EVENTS_TABLE) is None:
        return empty
    scan = pl.scan_delta(
        lake.table_uri(BILLING_EVENTS_TABLE), storage_options=lake.storage_options or None
    )
    return scan.filter(offsets_filter(topic, ranges)).collect().cast(BILLING_EVENTS_SCHEMA)


@dataclass(frozen=True)
class CatchUp:
    """What a catch-up applied: offset ranges moved over, events and money applied."""

    applied: dict[int, tuple[int, int]] = field(default_factory=dict)
    events_applied: int = 0
    amount_usd_applied: str = "0"

    @property
    def repaired(self) -> bool:
        """Money was missing from Postgres (not just marks that had not moved yet)."""
        return self.events_applied > 0

    def then(self, later: CatchUp) -> CatchUp:
        """This catch-up followed by a later one (Postgres lost the first in between)."""
        applied = dict(self.applied)
        for p, (start, end) in later.applied.items():
            first = applied.get(p, (start, end))
            applied[p] = (min(first[0], start), max(first[1], end))
        return CatchUp(
            applied,
            self.events_applied + later.events_applied,
            str(Decimal(self.amount_usd_applied) + Decimal(later.amount_usd_applied)),
        )

    def describe(self) -> str:
        ranges = ", ".join(f"{p}:{s}-{e}" for p, (s, e) in sorted(self.applied.items()))
        return (
            f"applied {self.events_applied} billing_events rows "
            f"({self.amount_usd_applied} USD) at offsets {ranges}"
        )


def serving_gaps(
    url: str, topic: str, targets: Mapping[int, int | None]
) -> dict[int, tuple[int, int]]:
    """{partition: (serving mark, target)} where Postgres is behind the target."""
    marks = serving_marks(url, topic)
    return {
        p: (marks.get(p, 0), target)
        for p, target in sorted(targets.items())
        if target is not None and marks.get(p, 0) < target
    }


def catch_up(
    url: str,
    lake: LakeLocation,
    topic: str,
    targets: Mapping[int, int | None],
    *,
    run_id: str,
) -> CatchUp:
    """Apply billing_events rows from each partition's serving mark up to its target
    (usually the lake's decided mark), exactly once: `apply_batch` re-reads the marks
    under lock, so a concurrent catch-up or batch applies each offset once."""
    gaps = serving_gaps(url, topic, targets)
    if not gaps:
        return CatchUp()
    rows = committed_events(lake, topic, gaps)
    result: ServingResult = apply_batch(
        url, rows, topic=topic, ranges=gaps, run_id=run_id, kind=REPAIR
    )
    return CatchUp(result.applied, result.events_applied, result.amount_usd_applied)
