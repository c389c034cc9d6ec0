"""How a batch that fails to decode finds its bad records (issue 18): the suspects a
vectorised guess names are screened first and the rest decoded in one call; a cause the
guess misses falls back to screening row by row. Whatever the path, the outcome is the
per-row path's. Pure Polars and Kafka `Message` objects, no servers."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

import polars as pl
from confluent_kafka import KafkaError, Message

from billing_dagster.decoding import (
    JSON_DECODER,
    SEGMENT_ROWS,
    BatchDecoder,
    decode_isolating_failures,
)
from billing_dagster.json_text import as_text, json_suspects, screen_structure
from billing_dagster.kafka_records import error_events, records_below, records_frame
from billing_dagster.synthetic import SyntheticBillingStream

from .hostile_corpus import hostile_corpus

NOW = datetime.now(UTC).replace(microsecond=0)
#: The decoder before issue 18: every row of a failing segment screened in Python.
PER_ROW = replace(JSON_DECODER, suspects=None)


def hostile_batch() -> pl.Series:
    """The hostile corpus spread among synthetic events over several segments, as text
    after the structure screen (what decode_json_wire hands the decoder)."""
    good = [r.value for r in SyntheticBillingStream(seed=18, invalid_rate=0).records(4000)]
    corpus = [h.value for h in hostile_corpus(NOW) if h.value is None or len(h.value) < 10_000]
    random.Random(18).shuffle(corpus)
    values = list(good)
    for index, value in enumerate(corpus):
        values.insert(index * 41 + 5, value)
    return screen_structure(as_text(pl.Series("value", values, dtype=pl.Binary)), {})


def decode(text: pl.Series, decoder: BatchDecoder) -> tuple[pl.Series, dict]:
    failures: dict = {}
    return decode_isolating_failures(text, decoder, failures), failures


def screening(decoder: BatchDecoder, seen: list) -> BatchDecoder:
    """`decoder`, noting each value its per-row screen looks at in `seen`."""

    def screen(value: bytes | None):
        seen.append(value)
        return decoder.screen(value)

    return replace(decoder, screen=screen)


def test_suspects_first_gives_the_per_row_outcome_on_the_hostile_corpus():
    text = hostile_batch()
    assert text.len() > 3 * SEGMENT_ROWS
    suspects = json_suspects(text).to_list()
    screened: dict[str, list[str]] = {"suspects": [], "per row": []}
    wire, failures = decode(text, screening(JSON_DECODER, screened["suspects"]))
    expected_wire, expected_failures = decode(text, screening(PER_ROW, screened["per row"]))
    assert failures == expected_failures
    assert wire.equals(expected_wire)
    # The guess named every record that cannot decode, and few others; only those were
    # screened in Python, where the per-row path screened whole segments.
    assert len(failures) >= 20
    assert set(failures) <= set(suspects)
    assert len(suspects) < 2 * len(failures)
    assert sorted(screened["suspects"]) == sorted(text.gather(suspects).to_list())
    assert len(screened["per row"]) > 3 * SEGMENT_ROWS


def test_a_cause_the_guess_misses_is_found_row_by_row_with_the_same_outcome():
    text = hostile_batch()
    # A guess that names only the first suspect: the rest fails to decode in one call.
    first_only = replace(JSON_DECODER, suspects=lambda values: json_suspects(values).head(1))
    screened: list = []
    wire, failures = decode(text, screening(first_only, screened))
    expected_wire, expected_failures = decode(text, PER_ROW)
    assert failures == expected_failures
    assert wire.equals(expected_wire)
    assert len(screened) > 3 * SEGMENT_ROWS  # the fallback: every row of the segments


def test_records_below_their_range_end_are_kept_and_error_events_located():
    def record(partition: int, offset: int) -> Message:
        return Message(
            topic="t",
            partition=partition,
            offset=offset,
            key=b"k%d" % offset,
            value=None if offset == 11 else b"v%d" % offset,
            timestamp=(2, 1_700_000_000_000 + offset),
        )

    eof = Message(topic="t", partition=1, offset=12, error=KafkaError(KafkaError._PARTITION_EOF))
    messages = [record(1, 10), record(2, 5), record(1, 11), eof, record(2, 6), record(3, 0)]
    errors, at = error_events(messages)
    assert at == [3]
    assert errors[3].code() == KafkaError._PARTITION_EOF
    # Partition 2 ends at 6: its offset 6 is past the range; partition 3 is not read.
    chunk, after = records_below(messages[:3] + messages[4:], {1: 20, 2: 6})
    assert after == {1: 12, 2: 6}
    frame = records_frame("t@1", [chunk])
    assert frame.select("kafka_partition", "kafka_offset").rows() == [(1, 10), (2, 5), (1, 11)]
    assert frame["value"].to_list() == [b"v10", b"v5", None]
    assert frame["kafka_topic"].unique().to_list() == ["t@1"]
    assert frame["kafka_timestamp"][0] == datetime.fromtimestamp(1_700_000_000.010, UTC)
    assert records_frame("t", []).schema == frame.schema
