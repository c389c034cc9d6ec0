"""Debezium change events in JSON (JsonConverter, with or without schemas.enable).

A change event's envelope (`before`, `after`, `op`, `source`) is decoded for a whole
batch in one Polars call. Inserts and snapshot reads (`op` c or r) of the OLTP tables
that record money movements become billing events:

| table                | event_id       | transaction_type                      | amount  |
|----------------------|----------------|---------------------------------------|---------|
| billing.transactions | transaction_id | transaction_type column               | amount  |
| billing.payments     | payment_id     | PAYMENT                               | amount  |
| billing.refunds      | refund_id      | kind column (REFUND default, or CHARGEBACK) | -amount |

Everything else is quarantined with stage `cdc` and a reason: updates and deletes of those
rows (billing rows are immutable; a correction is a new ADJUSTMENT), and changes to
billing.subscriptions and billing.invoices, which are reference data, not billing events.
Debezium must run with `decimal.handling.mode=string` so money arrives as exact text.
"""

from __future__ import annotations

import polars as pl

from billing_dagster.contract import WIRE_FIELDS, WIRE_STRUCT
from billing_dagster.decoding import (
    FAILURE_SCHEMA,
    BatchDecoder,
    Failure,
    decode_isolating_failures,
    failures_frame,
    json_decode,
    screen_json,
)
from billing_dagster.json_text import as_text, screen_structure

BILLING_EVENT_TABLES = ("transactions", "payments", "refunds")
REFERENCE_TABLES = ("subscriptions", "invoices")
CDC_TABLES = BILLING_EVENT_TABLES + REFERENCE_TABLES

ROW_FIELDS = (
    "transaction_id",
    "payment_id",
    "refund_id",
    "invoice_id",
    "subscription_id",
    "customer_id",
    "transaction_type",
    "kind",
    "amount",
    "currency",
    "tax_amount",
    "metadata",
    "reason",
    "created_at",
)
_ROW = pl.Struct({name: pl.String for name in ROW_FIELDS})
_SOURCE = pl.Struct({"schema": pl.String, "table": pl.String, "lsn": pl.String})
_ENVELOPE_FIELDS = {"before": _ROW, "after": _ROW, "op": pl.String, "source": _SOURCE}
ENVELOPE = pl.Struct({**_ENVELOPE_FIELDS, "payload": pl.Struct(_ENVELOPE_FIELDS)})

DEBEZIUM_DECODER = BatchDecoder(
    decode=lambda values: json_decode(values, ENVELOPE),
    screen=lambda value: screen_json(value, ()),
    dtype=ENVELOPE,
    fallback=("decode", "json", "value could not be decoded as a Debezium change event"),
)


def _envelope(name: str) -> pl.Expr:
    # schemas.enable=true wraps the envelope in {"schema": ..., "payload": ...}.
    return pl.coalesce(
        pl.col("_env").struct.field("payload").struct.field(name),
        pl.col("_env").struct.field(name),
    )


def _negated(text: pl.Expr) -> pl.Expr:
    text = text.str.strip_chars()
    return pl.when(text.str.starts_with("-")).then(text.str.slice(1)).otherwise(pl.lit("-") + text)


def _json_object(*pairs: tuple[str, pl.Expr]) -> pl.Expr:
    parts = [pl.when(v.is_not_null()).then(pl.format(f'"{k}":"{{}}"', v)) for k, v in pairs]
    joined = pl.concat_list(parts).list.drop_nulls().list.join(",")
    return pl.when(joined != "").then(pl.format("{{{}}}", joined))


def decode_debezium_wire(records: pl.DataFrame) -> tuple[pl.Series, pl.DataFrame]:
    failures: dict[int, Failure] = {}
    # Too deep, or a lone surrogate escape: set aside before the decoders (json_text.py).
    text = screen_structure(as_text(records["value"]), failures)
    envelopes = decode_isolating_failures(text, DEBEZIUM_DECODER, failures)
    for index in envelopes.is_null().arg_true().to_list():
        if index not in failures:
            failures[index] = screen_json(records["value"][index], ()) or DEBEZIUM_DECODER.fallback

    frame = pl.DataFrame({"_env": envelopes}).with_row_index("_row")
    after = _envelope("after")
    row = {name: after.struct.field(name) for name in ROW_FIELDS}
    table = _envelope("source").struct.field("table")
    schema = _envelope("source").struct.field("schema")
    op = _envelope("op")
    qualified = pl.format("{}.{}", schema.fill_null("billing"), table)
    row_id = pl.coalesce(
        _envelope("before").struct.field("transaction_id"),
        _envelope("before").struct.field("payment_id"),
        _envelope("before").struct.field("refund_id"),
        row["transaction_id"],
        row["payment_id"],
        row["refund_id"],
    )

    mapped = frame.with_columns(
        _table=table,
        _op=op,
        event_id=pl.when(table == "transactions")
        .then(row["transaction_id"])
        .when(table == "payments")
        .then(row["payment_id"])
        .when(table == "refunds")
        .then(row["refund_id"]),
        customer_id=row["customer_id"],
        transaction_type=pl.when(table == "payments")
        .then(pl.lit("PAYMENT"))
        .when(table == "refunds")
        .then(pl.coalesce(row["kind"].str.to_uppercase(), pl.lit("REFUND")))
        .otherwise(row["transaction_type"]),
        amount=pl.when(table == "refunds").then(_negated(row["amount"])).otherwise(row["amount"]),
        currency=row["currency"],
        metadata=pl.when(table == "payments")
        .then(_json_object(("invoice_id", row["invoice_id"])))
        .when(table == "refunds")
        .then(_json_object(("payment_id", row["payment_id"]), ("reason", row["reason"])))
        .otherwise(row["metadata"]),
        tax_amount=pl.when(table == "refunds")
        .then(_negated(row["tax_amount"]))
        .otherwise(row["tax_amount"]),
        created_at=row["created_at"],
    )

    decoded = pl.col("_env").is_not_null()
    cdc_checks = [
        (
            decoded & (op.is_null() | table.is_null()),
            "cdc:envelope",
            pl.lit("value is not a Debezium change event (no op or source.table)"),
        ),
        (
            decoded & table.is_not_null() & ~table.is_in(BILLING_EVENT_TABLES),
            "cdc:table",
            pl.when(table.is_in(REFERENCE_TABLES))
            .then(pl.format("changes to {} are reference data, not billing events", qualified))
            .otherwise(pl.format("table {} is not a billing table", qualified)),
        ),
        (
            decoded & table.is_in(BILLING_EVENT_TABLES) & op.is_in(["u", "d", "t"]),
            "cdc:immutable",
            pl.format(
                "{} rows are immutable; op={} on row {} is kept for review (a correction "
                "is a new ADJUSTMENT transaction)",
                qualified,
                op,
                row_id.fill_null("?"),
            ),
        ),
        (
            decoded
            & table.is_in(BILLING_EVENT_TABLES)
            & op.is_not_null()
            & ~op.is_in(["c", "r", "u", "d", "t"]),
            "cdc:envelope",
            pl.format("unknown Debezium op '{}'", op),
        ),
    ]
    cdc_failed = [
        frame.filter(condition).select(
            "_row",
            pl.lit("cdc").alias("_fail_stage"),
            pl.lit(rule).alias("_fail_rule"),
            message.alias("_fail_reason"),
        )
        for condition, rule, message in cdc_checks
    ]
    failed = pl.concat(
        [failures_frame(failures), *[f.cast(FAILURE_SCHEMA) for f in cdc_failed]]
    ).unique("_row", keep="first", maintain_order=True)
    wire = mapped.select(pl.struct(list(WIRE_FIELDS)).alias("w"))["w"].cast(WIRE_STRUCT)
    return wire, failed
