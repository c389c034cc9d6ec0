"""From decoded deliveries to accepted billing events: dedupe, enrich, validate.

Every decoded delivery ends in exactly one of three places:
- accepted: the first delivery of an event_id that passes every rule;
- duplicates: a later delivery of an event_id with the same content (counted, and kept in
  raw/, which holds every delivery);
- quarantine: a rule broken, or an event_id redelivered with different content.

The first delivery is the one already in billing_events, else the lowest (partition,
offset) in the batch. A row already in billing_events at its own Kafka position is the
same delivery seen again (a retry) and is not its own duplicate: the offsets recorded in
the Delta commit drop it at write time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import polars as pl

from billing_dagster.contract import BILLING_EVENTS_SCHEMA
from billing_dagster.decoding import RAW_VALUE, quarantine_rows
from billing_dagster.enrichment import ReferenceData, enrich
from billing_dagster.rules import (
    ORIGINAL_PAYMENT_RULE,
    RETURN_TYPES,
    ValidationPolicy,
    apply_rules,
    business_rules,
)

#: What must match for a redelivery to be a duplicate rather than a conflicting event.
IDENTITY_FIELDS = ("customer_id", "transaction_type", "amount", "currency")
#: Columns read from billing_events to dedupe a batch against what was already accepted.
PRIOR_COLUMNS = ("event_id", "kafka_topic", "kafka_partition", "kafka_offset", *IDENTITY_FIELDS)

#: An event_id delivered again with different content: the first delivery stands.
CONFLICT_RULE = "duplicate:conflict"

DUPLICATES_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "first_partition": pl.Int32(),
    "first_offset": pl.Int64(),
}


@dataclass(frozen=True)
class CleanedBatch:
    accepted: pl.DataFrame
    duplicates: pl.DataFrame
    quarantine: pl.DataFrame

    @property
    def counts(self) -> dict[str, int]:
        return {
            "accepted": self.accepted.height,
            "duplicates": self.duplicates.height,
            "quarantined": self.quarantine.height,
        }


def clean_events(
    events: pl.DataFrame,
    *,
    accepted_before: pl.DataFrame,
    first_payments: pl.DataFrame,
    reference: ReferenceData,
    policy: ValidationPolicy,
    run_id: str,
    now: datetime,
) -> CleanedBatch:
    """`events`: decoded deliveries (raw/ columns plus raw_value). `accepted_before`:
    billing_events rows (PRIOR_COLUMNS) sharing event_ids with the batch.
    `first_payments`: customer_id, first_payment_at of accepted payments so far."""
    owners, duplicates, conflicts = _dedupe(events, accepted_before)
    valid, invalid = _judge(owners, reference, policy)
    accepted, unpaid_returns = _original_payment(valid, first_payments)
    return CleanedBatch(
        accepted=accepted.select(
            [pl.col(name).cast(dtype) for name, dtype in BILLING_EVENTS_SCHEMA.items()]
        ),
        duplicates=duplicates,
        quarantine=_quarantine(
            rejected=(invalid, unpaid_returns), conflicts=conflicts, run_id=run_id, now=now
        ),
    )


# ---- dedupe -----------------------------------------------------------------------------


class _Deduplicated(NamedTuple):
    #: The first delivery of each event_id not accepted before: the one to judge.
    owners: pl.DataFrame
    #: Later deliveries with the owner's content (DUPLICATES_SCHEMA).
    duplicates: pl.DataFrame
    #: Later deliveries with different content, labelled for quarantine.
    conflicts: pl.DataFrame


def _dedupe(events: pl.DataFrame, accepted_before: pl.DataFrame) -> _Deduplicated:
    """Who owns each event_id (billing_events, else the batch's lowest position), and
    whether every other delivery repeats the owner or conflicts with it."""
    deliveries = _beside_prior_delivery(events, accepted_before)
    # An event_id first seen in this batch is owned by its lowest position, except that a
    # delivery already accepted at its own position (a retry) keeps its ownership.
    fresh = deliveries.filter(~pl.col("_seen_before")).sort(
        ["_self", "kafka_partition", "kafka_offset"], descending=[True, False, False]
    )
    owners = fresh.unique("event_id", keep="first", maintain_order=True)
    redeliveries = pl.concat(
        [
            _against_first(deliveries.filter(pl.col("_seen_before")), "_prior_"),
            _against_first(_later_in_batch(fresh, owners), "_first_"),
        ],
        how="diagonal_relaxed",
    )
    return _Deduplicated(owners, _duplicates(redeliveries), _conflicts(redeliveries))


def _beside_prior_delivery(events: pl.DataFrame, accepted_before: pl.DataFrame) -> pl.DataFrame:
    """Each delivery with its event_id's billing_events row (`_prior_*`), `_self` when that
    row is this very delivery and `_seen_before` when it is another one; by position."""
    prior = accepted_before.select([pl.col(c).alias(f"_prior_{c}") for c in PRIOR_COLUMNS]).unique(
        "_prior_event_id", keep="first"
    )
    deliveries = events.join(prior, left_on="event_id", right_on="_prior_event_id", how="left")
    is_self = (
        (pl.col("_prior_kafka_topic") == pl.col("kafka_topic"))
        & (pl.col("_prior_kafka_partition") == pl.col("kafka_partition"))
        & (pl.col("_prior_kafka_offset") == pl.col("kafka_offset"))
    ).fill_null(False)
    seen_before = pl.col("_prior_kafka_offset").is_not_null() & ~is_self
    return deliveries.with_columns(_seen_before=seen_before, _self=is_self).sort(
        ["kafka_partition", "kafka_offset"]
    )


def _later_in_batch(fresh: pl.DataFrame, owners: pl.DataFrame) -> pl.DataFrame:
    """The deliveries of batch-owned event_ids other than the owner, beside the owner's
    position and content (`_first_*`)."""
    first = owners.select(
        "event_id",
        *[
            pl.col(c).alias(f"_first_{c}")
            for c in ("kafka_partition", "kafka_offset", *IDENTITY_FIELDS)
        ],
    )
    return fresh.join(
        owners.select("kafka_partition", "kafka_offset"),
        on=["kafka_partition", "kafka_offset"],
        how="anti",
    ).join(first, on="event_id", how="left")


def _against_first(redeliveries: pl.DataFrame, prefix: str) -> pl.DataFrame:
    """Redeliveries judged against the first delivery in the `prefix` columns: `_dup` when
    the content is the same, else `_reason`; `_first_partition/offset` name the first."""
    return redeliveries.with_columns(
        _dup=_same_content(prefix),
        _reason=_conflict_reason(prefix),
        _first_partition=pl.col(f"{prefix}kafka_partition"),
        _first_offset=pl.col(f"{prefix}kafka_offset"),
    )


def _same_content(prefix: str) -> pl.Expr:
    return pl.all_horizontal(
        [pl.col(f).eq_missing(pl.col(f"{prefix}{f}")) for f in IDENTITY_FIELDS]
    )


def _conflict_reason(prefix: str) -> pl.Expr:
    differing = (
        pl.concat_list(
            [
                pl.when(~pl.col(f).eq_missing(pl.col(f"{prefix}{f}"))).then(
                    pl.format(f"{f} {{}} vs {{}}", pl.col(f"{prefix}{f}"), pl.col(f))
                )
                for f in IDENTITY_FIELDS
            ]
        )
        .list.drop_nulls()
        .list.join(", ")
    )
    return pl.format(
        "event_id {} was first delivered at partition {} offset {} with different content ({})",
        pl.col("event_id"),
        pl.col(f"{prefix}kafka_partition"),
        pl.col(f"{prefix}kafka_offset"),
        differing,
    )


def _duplicates(redeliveries: pl.DataFrame) -> pl.DataFrame:
    """The redeliveries repeating their first delivery, with its position."""
    return (
        redeliveries.filter(pl.col("_dup"))
        .select(
            "event_id",
            "kafka_partition",
            "kafka_offset",
            pl.col("_first_partition").alias("first_partition"),
            pl.col("_first_offset").alias("first_offset"),
        )
        .cast(DUPLICATES_SCHEMA)
    )


def _conflicts(redeliveries: pl.DataFrame) -> pl.DataFrame:
    """The redeliveries differing from their first delivery, labelled for quarantine."""
    return redeliveries.filter(~pl.col("_dup")).with_columns(
        stage=pl.lit("dedupe"),
        rules=pl.lit([CONFLICT_RULE], dtype=pl.List(pl.String)),
        reason=pl.col("_reason"),
    )


# ---- business rules ---------------------------------------------------------------------


def _judge(
    owners: pl.DataFrame, reference: ReferenceData, policy: ValidationPolicy
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(valid, invalid): the owners enriched and judged by the business rules; the rules
    need the reference data (customer, subscription, rate) beside each event."""
    judged = apply_rules(enrich(owners, reference), business_rules(policy))
    return (
        judged.filter(pl.col("rules").list.len() == 0),
        judged.filter(pl.col("rules").list.len() > 0),
    )


def _original_payment(
    valid: pl.DataFrame, first_payments: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accepted, unpaid_returns): a refund or chargeback needs a payment by its customer
    at or before it, accepted earlier or valid in this same batch. Accepted by position."""
    payments_in_batch = (
        valid.filter(pl.col("transaction_type") == "PAYMENT")
        .group_by("customer_id")
        .agg(pl.col("created_at").min().alias("_batch_first_payment"))
    )
    with_payment = (
        valid.join(first_payments, on="customer_id", how="left")
        .join(payments_in_batch, on="customer_id", how="left")
        .with_columns(
            _has_original_payment=pl.min_horizontal("first_payment_at", "_batch_first_payment")
            <= pl.col("created_at")
        )
    )
    returns = apply_rules(
        with_payment.filter(pl.col("transaction_type").is_in(RETURN_TYPES)),
        (ORIGINAL_PAYMENT_RULE,),
    )
    accepted = pl.concat(
        [
            with_payment.filter(~pl.col("transaction_type").is_in(RETURN_TYPES)),
            returns.filter(pl.col("rules").list.len() == 0),
        ],
        how="diagonal_relaxed",
    ).sort(["kafka_partition", "kafka_offset"])
    return accepted, returns.filter(pl.col("rules").list.len() > 0)


# ---- quarantine -------------------------------------------------------------------------


def _quarantine(
    *,
    rejected: Sequence[pl.DataFrame],
    conflicts: pl.DataFrame,
    run_id: str,
    now: datetime,
) -> pl.DataFrame:
    """Quarantine rows for the deliveries that broke a business rule (`rejected`, stage
    validation) and the conflicting redeliveries (already labelled by dedupe)."""
    broken_rules = pl.concat(rejected, how="diagonal_relaxed").with_columns(
        stage=pl.lit("validation")
    )
    return quarantine_rows(
        pl.concat(
            [
                part.select(
                    "kafka_topic",
                    "kafka_partition",
                    "kafka_offset",
                    "kafka_timestamp",
                    "kafka_key",
                    RAW_VALUE,
                    "stage",
                    "rules",
                    "reason",
                )
                for part in (broken_rules, conflicts)
            ],
            how="vertical_relaxed",
        ),
        run_id=run_id,
        now=now,
    )
