"""Kafka messages into Polars columns without a Python loop per message.

confluent-kafka has no batch-to-Arrow API: consume() hands over a list of `Message`
objects. A Python loop that branched on each of them cost more than librdkafka's own work
(docs/benchmarks.md, "Less work per event"). Here each column is one C-level `map` over
the list, the error events are located the same way, and keeping a range's records is one
Polars filter per consume() call. kafka_io.KafkaClient.read keeps the ranges' state.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from itertools import compress, count, repeat

import polars as pl
from confluent_kafka import KafkaError, Message

from billing_dagster.contract import KAFKA_RECORD_SCHEMA

#: The columns collected per consume() call; kafka_topic is added once, at the end.
CHUNK_SCHEMA: dict[str, pl.DataType] = {
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "kafka_timestamp": pl.Int64(),  # milliseconds since the epoch, as Kafka keeps them
    "kafka_key": pl.Binary(),
    "value": pl.Binary(),
}
_MILLISECONDS = operator.itemgetter(1)  # Message.timestamp() is (type, milliseconds)


def error_events(messages: Sequence[Message]) -> tuple[list[KafkaError | None], list[int]]:
    """Each message's error (None for a record) and the positions of the error events.
    Identity, not `==`: comparing a KafkaError with None raises."""
    errors = list(map(Message.error, messages))
    return errors, list(compress(count(), map(operator.is_not, errors, repeat(None))))


def records_below(
    messages: Sequence[Message], ends: Mapping[int, int]
) -> tuple[pl.DataFrame, dict[int, int]]:
    """The records among `messages` (no error events) below their partition's end in
    `ends` (CHUNK_SCHEMA; partitions not in `ends`: none), and per partition the offset
    after its last record kept.

    librdkafka hands a partition's messages over in offset order, so the largest offset
    kept is the last record, and what follows a range's end is past it."""
    chunk = pl.DataFrame(
        {
            "kafka_partition": list(map(Message.partition, messages)),
            "kafka_offset": list(map(Message.offset, messages)),
            "kafka_timestamp": list(map(_MILLISECONDS, map(Message.timestamp, messages))),
            "kafka_key": list(map(Message.key, messages)),
            "value": list(map(Message.value, messages)),
        },
        schema=CHUNK_SCHEMA,
    )
    end = pl.col("kafka_partition").replace_strict(
        list(ends), list(ends.values()), default=None, return_dtype=pl.Int64
    )
    chunk = chunk.filter(pl.col("kafka_offset") < end)
    last = chunk.group_by("kafka_partition").agg(pl.col("kafka_offset").max() + 1)
    return chunk, dict(last.iter_rows())


def records_frame(key: str, chunks: list[pl.DataFrame]) -> pl.DataFrame:
    """The records of a read (KAFKA_RECORD_SCHEMA) from its chunks, `kafka_topic` = key."""
    frame = pl.concat(chunks) if chunks else pl.DataFrame(schema=CHUNK_SCHEMA)
    made = {
        "kafka_topic": pl.lit(key, dtype=pl.String),
        "kafka_timestamp": pl.col("kafka_timestamp").cast(pl.Datetime("ms", "UTC")),
    }
    return frame.select(
        made.get(name, pl.col(name)).cast(dtype).alias(name)
        for name, dtype in KAFKA_RECORD_SCHEMA.items()
    )
