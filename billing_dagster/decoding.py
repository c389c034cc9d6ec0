"""Decode a batch of Kafka records into contract-typed events and quarantine rows.

Each encoding (JSON here; Avro in avro_format.py; Debezium JSON in debezium.py) turns the
record values into one struct column of contract fields as text; `finish_decoding` then
applies the contract rules once, for every encoding, and types the columns.

A JSON batch is decoded by one vectorised Polars call. Only when that call fails (some
value is not UTF-8, not JSON, or has an object where a scalar belongs) is it decoded in
segments of SEGMENT_ROWS. In the segments that fail, the records a vectorised guess names
(json_text.json_suspects: what a Rust JSON parser refuses, a non-object, a structure in a
contract field) are screened one by one with Python's json module and the others decoded
together in one call; if that call fails too (a cause the guess missed), every row of
those segments is screened, as before the guess. Good records always go through the
vectorised decoder; the Python screen sees the suspects, not whole segments.

Records larger than the record limit are quarantined on their size before any encoding
sees them; JSON text is screened for nesting and lone surrogates before its decode, and
its numbers are taken as written after it (json_text.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import polars as pl

from billing_dagster.contract import (
    DEFAULT_CURRENCY,
    EVENT_HOUR_PARTITIONS,
    KAFKA_PROVENANCE_SCHEMA,
    KAFKA_RECORD_SCHEMA,
    MONEY,
    QUARANTINE_SCHEMA,
    RAW_EVENT_SCHEMA,
    WIRE_STRUCT,
)
from billing_dagster.json_text import (
    Failure,
    as_text,
    exact_numbers,
    json_suspects,
    screen_json,
    screen_structure,
)
from billing_dagster.rules import (
    DEFAULT_LIMITS,
    ContractLimits,
    apply_rules,
    contract_rules,
    parse_timestamp,
)

__all__ = ["Failure", "screen_json"]  # re-exported for the other encodings


class SchemaSource(Protocol):
    """What the Avro decoder needs of a Schema Registry: the schema text for an id."""

    def schema_text(self, schema_id: int) -> str: ...


@dataclass(frozen=True)
class DecodedBatch:
    events: pl.DataFrame
    quarantine: pl.DataFrame

    @property
    def counts(self) -> dict[str, int]:
        return {"decoded": self.events.height, "quarantined": self.quarantine.height}

    @property
    def raw_rows(self) -> pl.DataFrame:
        """The decoded deliveries as the raw/ table stores them."""
        return self.events.select(list(RAW_EVENT_SCHEMA))


class ValueFormat(enum.StrEnum):
    """How a topic's record values are encoded (chosen per topic in configuration)."""

    JSON = "json"
    AVRO = "avro"
    DEBEZIUM_JSON = "debezium-json"


def json_decode(values: pl.Series, dtype: pl.DataType = WIRE_STRUCT) -> pl.Series:
    text = values.cast(pl.String)
    # An empty string would be skipped like a blank NDJSON line, shifting every row after it.
    decoded = pl.select(pl.when(text.str.strip_chars() != "").then(text)).to_series()
    decoded = decoded.str.json_decode(dtype)
    if decoded.len() != values.len():
        raise pl.exceptions.ComputeError("decoded row count differs from input")
    return decoded


#: A batch that does not decode in one call is cut into segments of this many rows, each
#: decoded in one call; in the segments that fail, the suspects are screened one by one
#: (every row, for a decoder without a guess). One Polars call costs about what screening
#: a few hundred rows in Python does, and a bad record costs one segment's screening
#: instead of rounds of ever smaller calls.
SEGMENT_ROWS = 1024


@dataclass(frozen=True)
class BatchDecoder:
    """A vectorised decoder for a whole segment plus a per-record screen for failures.

    `decode` turns a segment of values into one struct Series or raises a PolarsError;
    `screen` says why one value cannot decode (None when it can).
    """

    decode: Callable[[pl.Series], pl.Series]
    screen: Callable[[bytes | None], Failure | None]
    dtype: pl.DataType
    fallback: Failure = ("decode", "json", "value could not be decoded as a billing event")
    #: Which of the values likely fail `decode` (row numbers, a vectorised guess): in a
    #: failing segment they alone are screened. None: every row of the segment is.
    suspects: Callable[[pl.Series], pl.Series] | None = None


def decode_isolating_failures(
    values: pl.Series, decoder: BatchDecoder, failures: dict[int, Failure]
) -> pl.Series:
    """Decode `values` in as few vectorised calls as possible; failing rows go to
    `failures` (by row number) and come back as nulls."""
    try:
        return decoder.decode(values)
    except pl.exceptions.PolarsError:
        pass
    decoded: list[tuple[pl.Series, pl.Series]] = []  # (row numbers, decoded structs)
    screened_good: list[int] = []
    failing = _decode_segments(values, decoder, decoded)
    if failing.len() and decoder.suspects is not None:
        suspects = failing.gather(decoder.suspects(values.gather(failing)))
        _screen_rows(values, suspects, decoder, screened_good, failures)
        rest = failing.filter(~failing.is_in(suspects.implode()))
        try:
            if rest.len():
                decoded.append((rest, decoder.decode(values.gather(rest))))
            failing = rest.clear()
        except pl.exceptions.PolarsError:
            failing = rest  # the guess missed a cause: every row is screened
    _screen_rows(values, failing, decoder, screened_good, failures)
    if screened_good:
        decoded.extend(_decode_rows(values, screened_good, decoder, failures))
    if not decoded:
        return pl.Series(values.name, [None] * values.len(), dtype=decoder.dtype)
    placed = pl.DataFrame(
        {
            "_i": pl.concat([rows for rows, _ in decoded]),
            "_s": pl.concat([part for _, part in decoded]),
        }
    )
    return (
        pl.DataFrame({"_i": pl.int_range(0, values.len(), dtype=pl.UInt32, eager=True)})
        .join(placed, on="_i", how="left")
        .sort("_i")["_s"]
        .alias(values.name)
    )


def _decode_segments(
    values: pl.Series, decoder: BatchDecoder, decoded: list[tuple[pl.Series, pl.Series]]
) -> pl.Series:
    """Decode `values` segment by segment into `decoded`; the rows of failing segments."""
    failing = []
    for start in range(0, values.len(), SEGMENT_ROWS):
        rows = _row_numbers(start, min(start + SEGMENT_ROWS, values.len()))
        try:
            decoded.append((rows, decoder.decode(values.slice(start, SEGMENT_ROWS))))
        except pl.exceptions.PolarsError:
            failing.append(rows)
    return pl.concat(failing) if failing else _row_numbers(0, 0)


def _screen_rows(
    values: pl.Series,
    rows: pl.Series,
    decoder: BatchDecoder,
    screened_good: list[int],
    failures: dict[int, Failure],
) -> None:
    """Screen `rows` one by one: each goes to `failures` or to `screened_good`."""
    for row, value in zip(rows.to_list(), values.gather(rows).to_list(), strict=True):
        # A null decodes to a null struct; its caller says why it is null (a tombstone,
        # text that is not UTF-8, a record set aside before decoding).
        problem = None if value is None else decoder.screen(value)
        if problem is None:
            screened_good.append(row)
        else:
            failures[row] = problem


def _row_numbers(start: int, stop: int) -> pl.Series:
    return pl.int_range(start, stop, dtype=pl.UInt32, eager=True)


def _decode_rows(
    values: pl.Series, rows: list[int], decoder: BatchDecoder, failures: dict[int, Failure]
) -> list[tuple[pl.Series, pl.Series]]:
    """Decode rows the screen passed, all in one call when possible."""
    try:
        return [(pl.Series(rows, dtype=pl.UInt32), decoder.decode(values.gather(rows)))]
    except pl.exceptions.PolarsError:
        pass
    # Something the screen did not foresee: one record at a time.
    parts = []
    for row in rows:
        try:
            parts.append((pl.Series([row], dtype=pl.UInt32), decoder.decode(values.slice(row, 1))))
        except pl.exceptions.PolarsError:
            failures[row] = decoder.screen(values[row]) or decoder.fallback
    return parts


JSON_DECODER = BatchDecoder(
    decode=json_decode, screen=screen_json, dtype=WIRE_STRUCT, suspects=json_suspects
)


def _event_columns() -> list[pl.Expr]:
    """Typed contract columns from the validated wire text."""
    created_at = parse_timestamp("created_at")
    return [
        pl.col("event_id").str.strip_chars(),
        pl.col("customer_id").str.strip_chars().cast(pl.Int64),
        pl.col("transaction_type").str.strip_chars().str.to_uppercase(),
        _money("amount"),
        pl.col("currency").str.strip_chars().fill_null(DEFAULT_CURRENCY),
        pl.col("metadata"),
        _money("tax_amount"),
        # A v2.1.0 Avro record carries no event time; such events take the Kafka timestamp.
        pl.coalesce(created_at, pl.col("kafka_timestamp")).alias("created_at"),
    ]


def _money(column: str) -> pl.Expr:
    text = pl.col(column).str.strip_chars()
    # Drop zeros past the second fraction digit ("12.300") before an exact cast.
    text = text.str.replace(r"^(-?\d+\.\d{0,2})0*$", "${1}").str.replace(r"\.$", "")
    return pl.when(text != "").then(text).cast(MONEY).alias(column)


def failures_frame(failures: dict[int, Failure]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "_row": list(failures),
            "_fail_stage": [stage for stage, _, _ in failures.values()],
            "_fail_rule": [rule for _, rule, _ in failures.values()],
            "_fail_reason": [reason for _, _, reason in failures.values()],
        },
        schema=FAILURE_SCHEMA,
    )


FAILURE_SCHEMA = {
    "_row": pl.UInt32,
    "_fail_stage": pl.String,
    "_fail_rule": pl.String,
    "_fail_reason": pl.String,
}


def decode_json_wire(
    records: pl.DataFrame,
) -> tuple[pl.Series, pl.DataFrame]:
    """The plain JSON contract encoding: one JSON object per record value."""
    failures: dict[int, Failure] = {}
    text = screen_structure(as_text(records["value"]), failures)
    wire = decode_isolating_failures(text, JSON_DECODER, failures)
    # A JSON null (or an empty record) decodes without error to a null struct.
    for index in wire.is_null().arg_true().to_list():
        if index not in failures:  # a record set aside is not parsed again
            failures[index] = screen_json(records["value"][index]) or JSON_DECODER.fallback
    # Money and customer_id as the producer wrote them, not as a float made them.
    wire = exact_numbers(text, wire, failures)
    return wire, failures_frame(failures)


def decode_records(
    records: pl.DataFrame,
    *,
    value_format: ValueFormat | str = ValueFormat.JSON,
    registry: SchemaSource | None = None,
    run_id: str,
    now: datetime,
    limits: ContractLimits = DEFAULT_LIMITS,
) -> DecodedBatch:
    """Decode one batch of Kafka records; every record ends up in exactly one output."""
    records = records.select(
        [pl.col(name).cast(dtype) for name, dtype in KAFKA_RECORD_SCHEMA.items()]
    )
    # Oversized values are judged on their size alone: no decoder ever sees them.
    oversized = _oversized(records, limits.max_record_bytes)
    decodable = records
    if oversized.height:
        decodable = records.with_columns(
            value=pl.when(pl.col("value").bin.size() <= limits.max_record_bytes).then(
                pl.col("value")
            )
        )
    value_format = ValueFormat(value_format)
    if value_format is ValueFormat.AVRO:
        if registry is None:
            raise ValueError("Avro topics need a schema registry")
        from billing_dagster.avro_format import decode_avro_wire

        wire, failed = decode_avro_wire(decodable, registry)
    elif value_format is ValueFormat.DEBEZIUM_JSON:
        from billing_dagster.debezium import decode_debezium_wire

        wire, failed = decode_debezium_wire(decodable)
    else:
        wire, failed = decode_json_wire(decodable)
    if oversized.height:
        failed = pl.concat([oversized, failed]).unique("_row", keep="first", maintain_order=True)
    return finish_decoding(records, wire, failed, run_id=run_id, now=now, limits=limits)


def _oversized(records: pl.DataFrame, max_bytes: int) -> pl.DataFrame:
    """Failures (FAILURE_SCHEMA) of the record values larger than `max_bytes`."""
    size = pl.col("value").bin.size()
    return (
        records.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), size.alias("_size"))
        .filter(pl.col("_size") > max_bytes)
        .select(
            "_row",
            _fail_stage=pl.lit("decode"),
            _fail_rule=pl.lit("limit:record_bytes"),
            _fail_reason=pl.format(
                f"record value is {{}} bytes, more than the {max_bytes} allowed "
                "(BILLING_MAX_RECORD_BYTES); it was not decoded",
                pl.col("_size"),
            ),
        )
        .cast(FAILURE_SCHEMA)
    )


def decode_json_records(records: pl.DataFrame, *, run_id: str, now: datetime) -> DecodedBatch:
    return decode_records(records, value_format=ValueFormat.JSON, run_id=run_id, now=now)


def finish_decoding(
    records: pl.DataFrame,
    wire: pl.Series,
    failed: pl.DataFrame,
    *,
    run_id: str,
    now: datetime,
    limits: ContractLimits = DEFAULT_LIMITS,
) -> DecodedBatch:
    """Contract rules over the wire text, then typed events and quarantine rows."""
    checked = apply_rules(
        records.with_row_index("_row").with_columns(wire.alias("_wire")).unnest("_wire"),
        contract_rules(limits),
    ).join(failed, on="_row", how="left")
    failed_early = pl.col("_fail_rule").is_not_null()
    checked = checked.with_columns(
        stage=pl.when(failed_early).then(pl.col("_fail_stage")).otherwise(pl.lit("contract")),
        rules=pl.when(failed_early)
        .then(pl.concat_list(pl.col("_fail_rule")))
        .otherwise(pl.col("rules")),
        reason=pl.coalesce("_fail_reason", "reason"),
    )
    bad = checked.filter(pl.col("rules").list.len() > 0)
    good = checked.filter(pl.col("rules").list.len() == 0)

    events = (
        good.select(*KAFKA_PROVENANCE_SCHEMA, *_event_columns(), "value")
        .with_columns(
            ingested_at=pl.lit(now, dtype=pl.Datetime("us", "UTC")),
            ingest_run_id=pl.lit(run_id),
            **{
                name: getattr(pl.col("created_at").dt, name)().cast(pl.Int32)
                for name in EVENT_HOUR_PARTITIONS
            },
        )
        .select(
            *[pl.col(name).cast(dtype) for name, dtype in RAW_EVENT_SCHEMA.items()],
            pl.col("value").alias(RAW_VALUE),
        )
    )
    quarantine = quarantine_rows(bad.rename({"value": RAW_VALUE}), run_id=run_id, now=now)
    return DecodedBatch(events=events, quarantine=quarantine)


#: The undecoded payload, kept beside decoded events so later rules can quarantine it.
RAW_VALUE = "raw_value"


def quarantine_rows(rows: pl.DataFrame, *, run_id: str, now: datetime) -> pl.DataFrame:
    """Quarantine table rows from frames with provenance, raw_value, stage, rules, reason."""
    return rows.select(
        *KAFKA_PROVENANCE_SCHEMA,
        RAW_VALUE,
        "stage",
        "rules",
        "reason",
        pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("quarantined_at"),
        pl.lit(run_id).alias("ingest_run_id"),
        pl.lit(now.date().isoformat()).alias("quarantine_date"),
    ).select([pl.col(name).cast(dtype) for name, dtype in QUARANTINE_SCHEMA.items()])
