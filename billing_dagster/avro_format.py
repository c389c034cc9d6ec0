"""Confluent Avro wire format (magic byte 0, 4-byte schema id, Avro binary body).

Records are grouped by schema id. Each group's bodies are concatenated into one Avro
object-container block, with the writer schema from the registry, and read by Polars in
one call: no Python dict per event. A schema the contract cannot read (a required field
missing or of another type) sends its records to quarantine with the schema id named; an
undecodable body is isolated the same way JSON failures are (split, then screen).

Only the registry saying a schema id does not exist makes that id's records a per-record
reject (`schema:unknown`); any other registry error fails the batch, to be retried
(schema_registry.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import fastavro
import polars as pl
import pyarrow as pa

from billing_dagster.contract import (
    AVRO_SCHEMA_V1,
    AVRO_SCHEMA_V2,
    TRANSACTION_TYPES,
    WIRE_FIELDS,
    WIRE_STRUCT,
    BillingEvent,
)
from billing_dagster.decoding import (
    BatchDecoder,
    Failure,
    SchemaSource,
    decode_isolating_failures,
    failures_frame,
)
from billing_dagster.schema_registry import SchemaNotFoundError, registry_client

# Importable from here, where it lived before schema_registry.py.
from billing_dagster.schema_registry import SchemaRegistrySource as SchemaRegistrySource

MAGIC_BYTE = 0
HEADER_BYTES = 5
_SYNC = b"billing-dagster!"  # any 16 bytes: the block is ours, read once, never stored


# ---- what the contract needs of a writer schema ---------------------------------------

_MONEY_LOGICAL = {"logicalType": "decimal", "scale": 2}
_TIMESTAMPS = {"timestamp-millis", "timestamp-micros"}


def _branches(field_type: object) -> tuple[list[object], bool]:
    """A field's non-null type branches, and whether null is allowed."""
    if isinstance(field_type, list):
        return [t for t in field_type if t != "null"], "null" in field_type
    return [field_type], False


def _is_money(t: object) -> bool:
    return (
        isinstance(t, dict)
        and t.get("type") in ("bytes", "fixed")
        and all(t.get(k) == v for k, v in _MONEY_LOGICAL.items())
        and int(t.get("precision", 99)) <= 12
    )


def _is_string(t: object) -> bool:
    return t == "string" or (isinstance(t, dict) and t.get("type") == "string")


def _is_long(t: object) -> bool:
    return t in ("long", "int") or (
        isinstance(t, dict) and t.get("type") in ("long", "int") and "logicalType" not in t
    )


def _is_transaction_type(t: object) -> bool:
    if _is_string(t):
        return True
    return (
        isinstance(t, dict)
        and t.get("type") == "enum"
        and set(t.get("symbols", ())) <= set(TRANSACTION_TYPES)
    )


def _is_timestamp(t: object) -> bool:
    return isinstance(t, dict) and t.get("type") == "long" and t.get("logicalType") in _TIMESTAMPS


_FIELD_CHECKS = {
    # field: (accepts a branch, required, what it must be)
    "event_id": (_is_string, True, "a string"),
    "customer_id": (_is_long, True, "a long"),
    "transaction_type": (_is_transaction_type, True, "a TransactionType enum or a string"),
    "amount": (_is_money, True, "a decimal(12,2) (bytes, logicalType decimal, scale 2)"),
    "currency": (_is_string, False, "a string"),
    "metadata": (_is_string, False, "a string"),
    "tax_amount": (_is_money, False, "a decimal(12,2)"),
    "created_at": (_is_timestamp, False, "a timestamp-millis or timestamp-micros long"),
}


def incompatibility(schema: Mapping[str, object]) -> str | None:
    """Why records written with `schema` cannot become billing events, or None if they can.

    Missing optional fields are fine (v1 has no tax_amount); extra fields are ignored.
    """
    if schema.get("type") != "record":
        return "writer schema is not an Avro record"
    fields = {f["name"]: f for f in schema.get("fields", [])}  # type: ignore[union-attr]
    for name, (accepts, required, expected) in _FIELD_CHECKS.items():
        if name not in fields:
            if required:
                return f"writer schema has no field {name}"
            continue
        branches, _ = _branches(fields[name]["type"])
        if len(branches) != 1 or not accepts(branches[0]):
            return f"field {name} must be {expected}, writer schema has {fields[name]['type']}"
    return None


def _without_defaults(node: object) -> object:
    # Defaults matter only to readers resolving schemas; Polars' reader rejects some of them.
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


# ---- decoding ----------------------------------------------------------------------


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _container(schema_json: str, bodies: pl.Series) -> bytes:
    """An Avro object container file holding `bodies` as one block."""
    arrow = bodies.to_arrow()
    if len(arrow) == 0:
        data = b""
    else:
        # The bodies sit back to back in the array's data buffer: one slice, no per-row copy.
        offsets = pa.Array.from_buffers(
            pa.int64(), len(arrow) + 1, [None, arrow.buffers()[1]], offset=arrow.offset
        )
        start, stop = offsets[0].as_py(), offsets[-1].as_py()
        data = arrow.buffers()[2].to_pybytes()[start:stop]
    header = bytearray(b"Obj\x01")
    meta = {"avro.schema": schema_json.encode(), "avro.codec": b"null"}
    header += _zigzag(len(meta))
    for key, value in meta.items():
        header += _zigzag(len(key)) + key.encode() + _zigzag(len(value)) + value
    header += b"\x00" + _SYNC
    return bytes(header) + _zigzag(len(bodies)) + _zigzag(len(data)) + data + _SYNC


def _as_wire_text(frame: pl.DataFrame) -> pl.Series:
    """Typed Avro columns as contract wire text, so one set of rules judges every format."""
    columns = []
    for name in WIRE_FIELDS:
        if name not in frame.columns:
            columns.append(pl.lit(None, dtype=pl.String).alias(name))
        elif frame.schema[name] == pl.Datetime or isinstance(frame.schema[name], pl.Datetime):
            columns.append(
                pl.col(name)
                .dt.convert_time_zone("UTC")
                .dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                .alias(name)
            )
        else:
            columns.append(pl.col(name).cast(pl.String).alias(name))
    return frame.select(pl.struct(columns).alias("wire"))["wire"].cast(WIRE_STRUCT)


def _avro_decoder(schema_json: str, parsed_schema: object) -> BatchDecoder:
    def decode(bodies: pl.Series) -> pl.Series:
        frame = pl.read_avro(io.BytesIO(_container(schema_json, bodies)))
        if frame.height != bodies.len():
            raise pl.exceptions.ComputeError("Avro block row count differs from input")
        return _as_wire_text(frame)

    def screen(body: bytes | None) -> Failure | None:
        stream = io.BytesIO(body or b"")
        try:
            fastavro.schemaless_reader(stream, parsed_schema, None)
        except Exception as exc:
            return "decode", "avro", f"Avro body does not match its writer schema ({exc})"
        if stream.tell() != len(body or b""):
            extra = len(body or b"") - stream.tell()
            return "decode", "avro", f"Avro body has {extra} bytes beyond its writer schema"
        return None

    return BatchDecoder(
        decode=decode,
        screen=screen,
        dtype=WIRE_STRUCT,
        fallback=("decode", "avro", "Avro body could not be decoded"),
    )


def decode_avro_wire(
    records: pl.DataFrame, registry: SchemaSource
) -> tuple[pl.Series, pl.DataFrame]:
    values = records["value"]
    size = values.bin.size().fill_null(0)
    framed = (size >= HEADER_BYTES) & values.bin.starts_with(bytes([MAGIC_BYTE])).fill_null(False)
    schema_ids = (
        values.bin.slice(1, 4).bin.reinterpret(dtype=pl.UInt32, endianness="big").fill_null(0)
    )
    rows = pl.DataFrame(
        {
            "_row": pl.int_range(0, len(values), dtype=pl.UInt32, eager=True),
            "framed": framed,
            "schema_id": schema_ids,
        }
    )
    failures: dict[int, Failure] = {}
    for row in rows.filter(~pl.col("framed"))["_row"].to_list():
        failures[row] = (
            "decode",
            "avro_framing",
            "value is not in Confluent Avro wire format (magic byte 0 and a 4-byte schema id)",
        )

    parts: list[pl.DataFrame] = []
    for (schema_id,), group in rows.filter(pl.col("framed")).group_by("schema_id"):
        row_numbers = group["_row"]
        problem, schema = _writer_schema(registry, int(schema_id))
        if problem is not None:
            for row in row_numbers.to_list():
                failures[row] = problem
            continue
        decoder = _avro_decoder(json.dumps(_without_defaults(schema)), _parsed(schema))
        group_failures: dict[int, Failure] = {}
        bodies = values.gather(row_numbers).bin.slice(HEADER_BYTES)
        wire = decode_isolating_failures(bodies, decoder, group_failures)
        for index, failure in group_failures.items():
            failures[row_numbers[index]] = failure
        parts.append(pl.DataFrame({"_row": row_numbers, "_wire": wire}))

    placed = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(schema={"_row": pl.UInt32, "_wire": WIRE_STRUCT})
    )
    wire = rows.select("_row").join(placed, on="_row", how="left").sort("_row")["_wire"]
    return wire, failures_frame(failures)


def _writer_schema(
    registry: SchemaSource, schema_id: int
) -> tuple[Failure | None, dict[str, object]]:
    """The writer schema of `schema_id`, or why its records are rejected. Only a registry
    that answers "no such id" rejects them; any other error propagates and fails the
    attempt (SchemaRegistrySource raises SchemaRegistryUnavailableError)."""
    try:
        text = registry.schema_text(schema_id)
    except SchemaNotFoundError as exc:
        return (
            "schema",
            "schema:unknown",
            f"schema id {schema_id} is not in the registry ({exc})",
        ), {}
    try:
        schema = json.loads(text)
    except ValueError:
        # The registry answered: the id names a schema that is not Avro (Protobuf, say).
        return (
            "schema",
            "schema:incompatible",
            f"schema id {schema_id}: writer schema is not an Avro JSON schema",
        ), {}
    if not isinstance(schema, dict):
        return (
            "schema",
            "schema:incompatible",
            f"schema id {schema_id}: writer schema is not an Avro record",
        ), {}
    problem = incompatibility(schema)
    if problem is not None:
        return ("schema", "schema:incompatible", f"schema id {schema_id}: {problem}"), schema
    return None, schema


def _parsed(schema: dict[str, object]) -> object:
    return fastavro.parse_schema(schema)


# ---- encoding (producers, tests, the demo) --------------------------------------------


def avro_record(event: BillingEvent) -> dict[str, object]:
    """An event as the Avro writer takes it (v2.1.0 fields; v1 drops tax_amount)."""
    return {
        "event_id": event.event_id,
        "customer_id": event.customer_id,
        "transaction_type": event.transaction_type.value,
        "amount": event.amount,
        "currency": event.currency,
        "metadata": event.metadata,
        "created_at": event.created_at,
        "tax_amount": event.tax_amount,
    }


class AvroEventEncoder:
    """Confluent-framed Avro for billing events, registering v1 and v2.1.0 on first use."""

    def __init__(self, registry_url: str, subject: str) -> None:
        from confluent_kafka.schema_registry import Schema

        client = registry_client(registry_url)
        self._schemas: dict[bool, tuple[int, object]] = {}
        for with_tax, schema in ((False, AVRO_SCHEMA_V1), (True, AVRO_SCHEMA_V2)):
            schema_id = client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
            self._schemas[with_tax] = (schema_id, fastavro.parse_schema(dict(schema)))

    def encode(self, event: BillingEvent, *, include_tax_field: bool = True) -> bytes:
        schema_id, parsed = self._schemas[include_tax_field]
        body = avro_record(event)
        if not include_tax_field:
            body.pop("tax_amount")
        out = io.BytesIO()
        out.write(bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big"))
        fastavro.schemaless_writer(out, parsed, body)
        return out.getvalue()


def frame_avro(schema_id: int, schema: Mapping[str, object], body: Mapping[str, object]) -> bytes:
    """One record in Confluent wire format under any schema (tests of odd writers)."""
    out = io.BytesIO()
    out.write(bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(out, fastavro.parse_schema(dict(schema)), dict(body))
    return out.getvalue()
