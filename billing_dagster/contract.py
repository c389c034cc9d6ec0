"""The billing event contract, defined once (reference design's BillingEvent v2.1.0).

Everything that reads or writes events (producer, decoder, lake tables, tests) takes its
field names and types from here.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

SCHEMA_VERSION = "2.1.0"

#: Decimal(12,2): ten integer digits and two fraction digits, as in the Avro logical type.
MONEY_PRECISION = 12
MONEY_SCALE = 2
MONEY = pl.Decimal(MONEY_PRECISION, MONEY_SCALE)
MONEY_MAX = Decimal("9999999999.99")

DEFAULT_CURRENCY = "USD"


class TransactionType(enum.StrEnum):
    PAYMENT = "PAYMENT"
    REFUND = "REFUND"
    CHARGEBACK = "CHARGEBACK"
    ADJUSTMENT = "ADJUSTMENT"


TRANSACTION_TYPES: tuple[str, ...] = tuple(t.value for t in TransactionType)


@dataclass(frozen=True)
class BillingEvent:
    """One billing event as a producer sees it. Money is Decimal, never float."""

    event_id: str
    customer_id: int
    transaction_type: TransactionType
    amount: Decimal
    created_at: datetime
    currency: str = DEFAULT_CURRENCY
    metadata: str | None = None
    # Added in v2.1.0; v1 events simply do not carry the field.
    tax_amount: Decimal | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def to_json_bytes(self, *, include_tax_field: bool = True) -> bytes:
        """The JSON wire encoding: money as decimal strings so no float ever touches it."""
        body: dict[str, object] = {
            "event_id": self.event_id,
            "customer_id": self.customer_id,
            "transaction_type": self.transaction_type.value,
            "amount": format_money(self.amount),
            "currency": self.currency,
            "metadata": self.metadata,
            "created_at": format_timestamp(self.created_at),
        }
        if include_tax_field:
            body["tax_amount"] = None if self.tax_amount is None else format_money(self.tax_amount)
        body.update(self.extra)
        return json.dumps(body, separators=(",", ":")).encode()


def format_money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01")))


def format_timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: Fields of the wire format as they are pulled out of JSON, all as text first so that one
#: wrongly typed value becomes a per-event quarantine reason instead of a failed batch.
WIRE_FIELDS: tuple[str, ...] = (
    "event_id",
    "customer_id",
    "transaction_type",
    "amount",
    "currency",
    "metadata",
    "tax_amount",
    "created_at",
)
WIRE_STRUCT = pl.Struct({name: pl.String for name in WIRE_FIELDS})

#: Where each record came from in Kafka; carried by every lake row and quarantine row.
KAFKA_PROVENANCE_SCHEMA: dict[str, pl.DataType] = {
    "kafka_topic": pl.String(),
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "kafka_timestamp": pl.Datetime("us", "UTC"),
    "kafka_key": pl.Binary(),
}

#: Records as read from Kafka, before decoding.
KAFKA_RECORD_SCHEMA: dict[str, pl.DataType] = {
    **KAFKA_PROVENANCE_SCHEMA,
    "value": pl.Binary(),
}

#: The decoded event columns (the contract proper).
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "customer_id": pl.Int64(),
    "transaction_type": pl.String(),
    "amount": MONEY,
    "currency": pl.String(),
    "metadata": pl.String(),
    "tax_amount": MONEY,
    "created_at": pl.Datetime("us", "UTC"),
}

#: Lake partition columns, as in the reference layout raw/year=/month=/day=/hour=.
EVENT_HOUR_PARTITIONS: tuple[str, ...] = ("year", "month", "day", "hour")

#: What every event row in the lake carries after its event columns: where it came from,
#: which run wrote it, and its event-time partition.
_LAKE_ROW_SCHEMA: dict[str, pl.DataType] = {
    **KAFKA_PROVENANCE_SCHEMA,
    "ingested_at": pl.Datetime("us", "UTC"),
    "ingest_run_id": pl.String(),
    **{name: pl.Int32() for name in EVENT_HOUR_PARTITIONS},
}

RAW_EVENT_SCHEMA: dict[str, pl.DataType] = {**EVENT_SCHEMA, **_LAKE_ROW_SCHEMA}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    **KAFKA_PROVENANCE_SCHEMA,
    "raw_value": pl.Binary(),
    "stage": pl.String(),
    "rules": pl.List(pl.String()),
    "reason": pl.String(),
    "quarantined_at": pl.Datetime("us", "UTC"),
    "ingest_run_id": pl.String(),
    "quarantine_date": pl.String(),
}
QUARANTINE_PARTITIONS: tuple[str, ...] = ("quarantine_date",)

#: Exchange rates: USD per one unit of the currency, eight fraction digits (1 EUR = 1.08345000).
FX_RATE = pl.Decimal(18, 8)

#: The cleaned stream: one row per accepted event, enriched from the reference tables.
BILLING_EVENTS_SCHEMA: dict[str, pl.DataType] = {
    **EVENT_SCHEMA,
    "customer_tier": pl.String(),
    "subscription_plan": pl.String(),
    "usd_rate": FX_RATE,
    "amount_usd": MONEY,
    **_LAKE_ROW_SCHEMA,
}

#: Reference tables the cleaning step enriches from (reference/<name> in the lake).
CUSTOMERS_SCHEMA: dict[str, pl.DataType] = {
    "customer_id": pl.Int64(),
    "customer_tier": pl.String(),
}
SUBSCRIPTIONS_SCHEMA: dict[str, pl.DataType] = {
    "subscription_id": pl.String(),
    "customer_id": pl.Int64(),
    "plan": pl.String(),
    "started_at": pl.Datetime("us", "UTC"),
}
FX_RATES_SCHEMA: dict[str, pl.DataType] = {
    "rate_date": pl.Date(),
    "currency": pl.String(),
    "usd_rate": FX_RATE,
}

#: Lake table names, relative to the lake root (reference layout: raw/...).
RAW_TABLE = "raw"
QUARANTINE_TABLE = "quarantine"
BILLING_EVENTS_TABLE = "billing_events"
CUSTOMERS_TABLE = "reference/customers"
SUBSCRIPTIONS_TABLE = "reference/subscriptions"
FX_RATES_TABLE = "reference/fx_rates"

#: The Avro form of the contract, as registered in the Schema Registry. v2.1.0 is the
#: reference design's schema plus created_at (the event time the Flink SQL windows on);
#: v1 is the same without tax_amount. Both decode into the same frame.
_AVRO_MONEY = {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}
AVRO_SCHEMA_V2: dict[str, object] = {
    "namespace": "com.company.billing.events",
    "type": "record",
    "name": "BillingEvent",
    "version": SCHEMA_VERSION,
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "customer_id", "type": "long"},
        {
            "name": "transaction_type",
            "type": {"type": "enum", "name": "TransactionType", "symbols": list(TRANSACTION_TYPES)},
        },
        {"name": "amount", "type": _AVRO_MONEY},
        {"name": "currency", "type": "string", "default": DEFAULT_CURRENCY},
        {"name": "metadata", "type": ["null", "string"], "default": None},
        {
            "name": "created_at",
            "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
            "default": None,
        },
        {"name": "tax_amount", "type": ["null", _AVRO_MONEY], "default": None},
    ],
}
AVRO_SCHEMA_V1: dict[str, object] = {
    **AVRO_SCHEMA_V2,
    "version": "1.0.0",
    "fields": [f for f in AVRO_SCHEMA_V2["fields"] if f["name"] != "tax_amount"],  # type: ignore[union-attr, index]
}

# ---- aggregates and reconciliation (aggregated/, reconciliation/ in the lake) -----------

#: Sums of Decimal(12,2) amounts: same scale, more integer digits, so a day's total of
#: millions of events never overflows. Still exact decimals, never floats.
MONEY_TOTAL = pl.Decimal(18, 2)

#: Partition columns of the daily aggregates, as in aggregated/daily_revenue/year=/month=/day=.
DAY_PARTITIONS: tuple[str, ...] = ("year", "month", "day")

HOURLY_REVENUE_TABLE = "aggregated/hourly_revenue"
DAILY_REVENUE_TABLE = "aggregated/daily_revenue"
CUSTOMER_METRICS_TABLE = "aggregated/customer_metrics"
RECONCILIATION_TABLE = "reconciliation/daily"
DISCREPANCIES_TABLE = "reconciliation/discrepancies"
MONTHLY_REPORT_TABLE = "reconciliation/monthly"
OLTP_RECONCILIATION_TABLE = "reconciliation/oltp"

_DAY_COLUMNS: dict[str, pl.DataType] = {name: pl.Int32() for name in DAY_PARTITIONS}

#: The reference design's Flink SQL: payments only, tumbling event-time hours by currency.
HOURLY_REVENUE_SCHEMA: dict[str, pl.DataType] = {
    "window_start": pl.Datetime("us", "UTC"),
    "window_end": pl.Datetime("us", "UTC"),
    "currency": pl.String(),
    "total_revenue": MONEY_TOTAL,
    "total_revenue_usd": MONEY_TOTAL,
    "transaction_count": pl.Int64(),
    #: Payments in this hour that arrived behind the watermark (after the hour had closed).
    "late_event_count": pl.Int64(),
    "updated_at": pl.Datetime("us", "UTC"),
    **_DAY_COLUMNS,
}

#: Per event-time day and currency; amounts in the event currency and in USD. Refunds and
#: chargebacks are negative (as in the events), so net = the sum of all four.
DAILY_REVENUE_SCHEMA: dict[str, pl.DataType] = {
    "revenue_date": pl.Date(),
    "currency": pl.String(),
    "gross_revenue": MONEY_TOTAL,
    "refunds": MONEY_TOTAL,
    "chargebacks": MONEY_TOTAL,
    "adjustments": MONEY_TOTAL,
    "net_revenue": MONEY_TOTAL,
    "gross_revenue_usd": MONEY_TOTAL,
    "net_revenue_usd": MONEY_TOTAL,
    "payment_count": pl.Int64(),
    "refund_count": pl.Int64(),
    "chargeback_count": pl.Int64(),
    "adjustment_count": pl.Int64(),
    "transaction_count": pl.Int64(),
    "updated_at": pl.Datetime("us", "UTC"),
    **_DAY_COLUMNS,
}

#: Per customer per event-time day, in USD (the balance currency).
CUSTOMER_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "metric_date": pl.Date(),
    "customer_id": pl.Int64(),
    "payments_usd": MONEY_TOTAL,
    "refunds_usd": MONEY_TOTAL,
    "chargebacks_usd": MONEY_TOTAL,
    "adjustments_usd": MONEY_TOTAL,
    "net_usd": MONEY_TOTAL,
    "payment_count": pl.Int64(),
    "refund_count": pl.Int64(),
    "chargeback_count": pl.Int64(),
    "adjustment_count": pl.Int64(),
    "transaction_count": pl.Int64(),
    "updated_at": pl.Datetime("us", "UTC"),
    **_DAY_COLUMNS,
}
