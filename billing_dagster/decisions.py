"""An offset is decided once: a retry keeps what an earlier attempt committed.

The cleaning step judges a batch from its records, the reference data and what
billing_events already holds. Between two attempts at the same offsets any of those can
change (a `reference load`, a concurrent writer), so a retry could decide differently. For
offsets billing_events has already committed, its rows are the decision: they stay
accepted whatever the rules say now, and a record the rules would accept now but that is
not among them was rejected when first decided: it goes to quarantine, never to the
balances a second way.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import polars as pl

from billing_dagster.cleaning import CONFLICT_RULE, DUPLICATES_SCHEMA, CleanedBatch
from billing_dagster.decoding import quarantine_rows

#: The rule of a record the rules accept now that an earlier attempt did not accept.
REJECTED_EARLIER_RULE = "decision:rejected_earlier"
_POSITION = ["kafka_partition", "kafka_offset"]


def _in_decided(decided: Mapping[int, int]) -> pl.Expr:
    within = pl.lit(False)
    for partition, mark in decided.items():
        within = within | (
            (pl.col("kafka_partition") == partition) & (pl.col("kafka_offset") < mark)
        )
    return within


def keep_decisions(
    cleaned: CleanedBatch,
    events: pl.DataFrame,
    committed: pl.DataFrame,
    decided: Mapping[int, int],
    *,
    run_id: str,
    now: datetime,
) -> CleanedBatch:
    """`decided`: per partition, the offset below which billing_events has committed this
    batch's decisions; `committed`: billing_events' rows there. `events`: the batch's
    decoded deliveries (raw_value beside them), for quarantine rows."""
    if not decided:
        return cleaned
    earlier = _in_decided(decided)
    positions = committed.select(_POSITION)
    rejected_earlier = cleaned.accepted.filter(earlier).join(positions, on=_POSITION, how="anti")
    late_quarantine = quarantine_rows(
        events.join(rejected_earlier.select(_POSITION), on=_POSITION, how="semi").with_columns(
            stage=pl.lit("dedupe"),
            rules=pl.lit([REJECTED_EARLIER_RULE], dtype=pl.List(pl.String)),
            reason=pl.lit(
                "an earlier attempt at this offset did not accept it and billing_events "
                "committed that decision; the rules accept it now (reference data or "
                "rules changed in between): re-validate it from quarantine if it should count"
            ),
        ),
        run_id=run_id,
        now=now,
    )
    return CleanedBatch(
        accepted=pl.concat([cleaned.accepted.filter(~earlier), committed]).sort(_POSITION),
        duplicates=cleaned.duplicates.join(positions, on=_POSITION, how="anti"),
        quarantine=pl.concat(
            [cleaned.quarantine.join(positions, on=_POSITION, how="anti"), late_quarantine]
        ),
    )


class RefusedAfterDecisionError(RuntimeError):
    """Postgres refuses rows at offsets billing_events has already decided."""


def set_aside_refused(
    cleaned: CleanedBatch,
    events: pl.DataFrame,
    refused: pl.DataFrame,
    decided: Mapping[int, int | None],
    *,
    run_id: str,
    now: datetime,
) -> CleanedBatch:
    """Move the accepted rows Postgres refused (`refused`: position, rule, reason; see
    serving_batch.py) to quarantine, before billing_events decides. `decided`: per
    partition, billing_events' mark in the batch's snapshot: a row below it is decided
    already and cannot be set aside any more."""
    if refused.is_empty():
        return cleaned
    late = refused.filter(_in_decided({p: m for p, m in decided.items() if m is not None}))
    if not late.is_empty():
        raise RefusedAfterDecisionError(
            "Postgres refuses rows billing_events has already accepted: "
            + "; ".join(f"{p}:{o} {reason}" for p, o, _, reason in late.head(3).iter_rows())
            + ". Fix the serving schema (docs/serving.md) and the run's retry applies them."
        )
    quarantined = quarantine_rows(
        events.join(refused, on=_POSITION, how="inner").with_columns(
            stage=pl.lit("serving"),
            rules=pl.concat_list(pl.col("rule")),
        ),
        run_id=run_id,
        now=now,
    )
    return CleanedBatch(
        accepted=cleaned.accepted.join(refused.select(_POSITION), on=_POSITION, how="anti"),
        duplicates=cleaned.duplicates,
        quarantine=pl.concat([cleaned.quarantine, quarantined]),
    )


def set_aside_applied_elsewhere(
    cleaned: CleanedBatch,
    events: pl.DataFrame,
    applied: pl.DataFrame,
    decided: Mapping[int, int | None],
    *,
    run_id: str,
    now: datetime,
) -> CleanedBatch:
    """Accepted rows whose event Postgres already holds from another Kafka position
    (`applied`: serving_batch.APPLIED_ELSEWHERE_SCHEMA): another lane accepted the same
    event_id while this batch was deciding (the same customer's events on partitions of
    two lanes, after a repartition). Postgres' primary key decided first: a delivery with
    the same content becomes a duplicate, one that differs goes to quarantine as
    `duplicate:conflict`, as they would have in one batch. Rows billing_events already
    decided (below `decided`) stay as they are."""
    if applied.is_empty():
        return cleaned
    marks = {p: m for p, m in decided.items() if m is not None}
    applied = applied.filter(~_in_decided(marks)) if marks else applied
    if applied.is_empty():
        return cleaned
    same = applied.filter(pl.col("same_content"))
    duplicates = (
        cleaned.accepted.select("event_id", *_POSITION)
        .join(same, on=_POSITION, how="inner")
        .select("event_id", *_POSITION, "first_partition", "first_offset")
        .cast(DUPLICATES_SCHEMA)
    )
    differing = applied.filter(~pl.col("same_content"))
    conflicts = quarantine_rows(
        events.join(differing, on=_POSITION, how="inner").with_columns(
            stage=pl.lit("dedupe"),
            rules=pl.lit([CONFLICT_RULE], dtype=pl.List(pl.String)),
            reason=pl.format(
                "event_id was accepted with different content from {} partition {} offset {} "
                "(by another lane, while this batch was deciding)",
                "first_topic",
                "first_partition",
                "first_offset",
            ),
        ),
        run_id=run_id,
        now=now,
    )
    return CleanedBatch(
        accepted=cleaned.accepted.join(applied.select(_POSITION), on=_POSITION, how="anti"),
        duplicates=pl.concat([cleaned.duplicates, duplicates]),
        quarantine=pl.concat([cleaned.quarantine, conflicts]),
    )
