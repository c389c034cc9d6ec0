"""The decision rules of the projection, without servers: a retry keeps billing_events'
decision (decisions.keep_decisions), processed = min(lake, Postgres), and the serving
history rows carry each event's Kafka position."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from billing_dagster.cleaning import CleanedBatch, clean_events
from billing_dagster.decisions import REJECTED_EARLIER_RULE, keep_decisions
from billing_dagster.decoding import decode_records
from billing_dagster.dedupe import PRIOR_SCHEMA
from billing_dagster.enrichment import ReferenceData
from billing_dagster.projection import processed_offsets
from billing_dagster.rules import ValidationPolicy
from billing_dagster.serving import history_rows, rows_from
from billing_dagster.synthetic import SyntheticBillingStream

NOW = datetime.now(UTC)
POSITION = ["kafka_partition", "kafka_offset"]


def _batch(count: int = 400):
    stream = SyntheticBillingStream(seed=91, duplicate_rate=0.05, invalid_rate=0.02)
    records = list(stream.records(count))
    frame = pl.DataFrame(
        {
            "kafka_topic": ["t"] * count,
            "kafka_partition": [i % 4 for i in range(count)],
            "kafka_offset": [i // 4 for i in range(count)],
            "kafka_timestamp": [NOW] * count,
            "kafka_key": [r.key for r in records],
            "value": [r.value for r in records],
        }
    )
    decoded = decode_records(frame, run_id="r", now=NOW)
    return stream.reference_data(), decoded


def _clean(decoded, reference: ReferenceData) -> CleanedBatch:
    cleaned = clean_events(
        decoded.events,
        accepted_before=pl.DataFrame(schema=PRIOR_SCHEMA),
        first_payments=pl.DataFrame(
            schema={"customer_id": pl.Int64, "first_payment_at": pl.Datetime("us", "UTC")}
        ),
        reference=reference,
        policy=ValidationPolicy(),
        run_id="r",
        now=NOW,
    )
    return CleanedBatch(
        cleaned.accepted,
        cleaned.duplicates,
        pl.concat([decoded.quarantine, cleaned.quarantine]),
    )


def _usd_only(reference: ReferenceData) -> ReferenceData:
    return ReferenceData.of(
        reference.customers,
        reference.subscriptions,
        reference.fx_rates.filter(pl.col("currency") == "USD"),
    )


def _positions(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(frame.select(POSITION).iter_rows())


@pytest.mark.parametrize("first_with_rates", [True, False])
def test_a_retry_keeps_what_billing_events_committed(first_with_rates: bool):
    reference, decoded = _batch()
    first_ref, now_ref = reference, _usd_only(reference)
    if not first_with_rates:
        first_ref, now_ref = now_ref, first_ref
    first = _clean(decoded, first_ref)
    retry = _clean(decoded, now_ref)
    assert _positions(first.accepted) != _positions(retry.accepted), "the rules must differ"

    # billing_events committed the first attempt's decision below offset 60 per partition.
    decided = {p: 60 for p in range(4)}
    committed = first.accepted.filter(pl.col("kafka_offset") < 60)
    kept = keep_decisions(retry, decoded.events, committed, decided, run_id="r", now=NOW)

    below = pl.col("kafka_offset") < 60
    assert _positions(kept.accepted.filter(below)) == _positions(committed)
    assert _positions(kept.accepted.filter(~below)) == _positions(retry.accepted.filter(~below))
    # Every record in exactly one place, and the accounting still balances.
    everything = [kept.accepted, kept.duplicates, kept.quarantine]
    seen = [p for frame in everything for p in frame.select(POSITION).iter_rows()]
    assert len(seen) == len(set(seen)) == decoded.events.height + decoded.quarantine.height
    late = kept.quarantine.filter(pl.col("rules").list.first() == REJECTED_EARLIER_RULE)
    if first_with_rates:
        assert late.is_empty()  # what was accepted stays accepted, nothing more to reject
    else:
        # The rules accept now what the first attempt rejected: quarantined, not accepted.
        expected = _positions(retry.accepted.filter(below)) - _positions(committed)
        assert expected and _positions(late) == expected


def test_nothing_decided_leaves_the_batch_alone():
    reference, decoded = _batch(80)
    cleaned = _clean(decoded, reference)
    assert (
        keep_decisions(cleaned, decoded.events, cleaned.accepted, {}, run_id="r", now=NOW)
        is cleaned
    )


def test_processed_is_what_both_stores_hold():
    lake = {0: 100, 1: 50, 2: None}
    assert processed_offsets(lake, {0: 80, 1: 70}) == {0: 80, 1: 50, 2: None}
    # A partition Postgres has never seen is at 0; Postgres out of reach: the lake alone.
    assert processed_offsets({3: 10}, {}) == {3: 0}
    assert processed_offsets(lake, None) == lake


def test_serving_applies_rows_from_each_mark_and_records_their_position():
    reference, decoded = _batch(80)
    accepted = _clean(decoded, reference).accepted
    fresh = rows_from(accepted, {0: 10, 1: 0})
    assert set(fresh["kafka_partition"]) <= {0, 1}
    assert fresh.filter(pl.col("kafka_partition") == 0)["kafka_offset"].min() >= 10
    history = history_rows(fresh)
    assert history.columns[-3:] == ["kafka_topic", "kafka_partition", "kafka_offset"]
    assert history.height == fresh.height
