"""The baseline the platform must beat: a straightforward per-message Python consumer.

What a careful engineer writes first without a batch engine: poll one message at a time,
`json.loads` it, check it field by field with `Decimal`, drop event ids already seen,
convert to USD, then per event an idempotent history INSERT and a balance upsert in
Postgres (committed every `commit_every` messages with the Kafka offsets), and buffered
appends of accepted and quarantined rows to Delta (one commit per `flush_rows` rows:
appending per message would make a Delta table of a million one-row files).

The checks mirror the contract and business rules of `billing_dagster/rules.py` in plain
Python (a Polars frame per message would measure Polars' per-call overhead, not the
approach). They exist only as this benchmark's comparator.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

import polars as pl
from confluent_kafka import Consumer, TopicPartition
from deltalake import write_deltalake

from billing_dagster.contract import TransactionType
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import ReferenceData, usd_amount_of
from billing_dagster.postgres_db import connect
from billing_dagster.serving import ensure_partitions

MONEY = re.compile(r"^-?\d{1,10}(\.\d{1,2}0*|\.0*)?$")
TYPES = {t.value for t in TransactionType}
CURRENCIES = {"USD", "EUR", "GBP", "JPY", "CAD", "AUD"}


@dataclass
class BaselineResult:
    messages: int
    accepted: int
    duplicates: int
    quarantined: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def check(event: dict, customers: set[int], now: datetime) -> str | None:
    """The first rule the event breaks, or None."""
    for name in ("event_id", "customer_id", "transaction_type", "amount", "created_at"):
        if event.get(name) in (None, ""):
            return f"required:{name}"
    if not str(event["customer_id"]).isdigit():
        return "integer:customer_id"
    kind = str(event["transaction_type"]).upper()
    if kind not in TYPES:
        return "enum:transaction_type"
    if not MONEY.match(str(event["amount"])):
        return "decimal_12_2:amount"
    tax = event.get("tax_amount")
    if tax is not None and not MONEY.match(str(tax)):
        return "decimal_12_2:tax_amount"
    try:
        created = datetime.fromisoformat(str(event["created_at"]).replace("Z", "+00:00"))
    except ValueError:
        return "timestamp:created_at"
    if created.tzinfo is None:
        return "timestamp:created_at"
    amount = Decimal(str(event["amount"]))
    if kind == "PAYMENT" and amount <= 0:
        return "sign:payment_positive"
    if kind in ("REFUND", "CHARGEBACK") and amount >= 0:
        return "sign:return_negative"
    if kind == "ADJUSTMENT" and amount == 0:
        return "sign:adjustment_nonzero"
    if (event.get("currency") or "USD") not in CURRENCIES:
        return "currency:supported"
    if created > now + timedelta(minutes=15):
        return "time:future"
    if int(event["customer_id"]) not in customers:
        return "reference:customer"
    return None


def run_baseline(
    bootstrap: str,
    topic: str,
    partitions: int,
    serving_url: str,
    lake: LakeLocation,
    reference: ReferenceData,
    *,
    limit: int,
    commit_every: int = 1_000,
    flush_rows: int = 50_000,
) -> BaselineResult:
    customers = set(reference.customers["customer_id"].to_list())
    rates = {
        (d, c): Decimal(str(r))
        for d, c, r in reference.fx_rates.select("rate_date", "currency", "usd_rate").iter_rows()
    }
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "baseline-consumer",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen: set[str] = set()
    accepted_rows: list[dict] = []
    quarantined_rows: list[dict] = []
    counts = {"messages": 0, "accepted": 0, "duplicates": 0, "quarantined": 0}
    offsets: dict[int, int] = {}

    def flush(final: bool = False) -> None:
        for rows, name in ((accepted_rows, "billing_events"), (quarantined_rows, "quarantine")):
            if rows and (final or len(rows) >= flush_rows):
                write_deltalake(lake.table_uri(name), pl.DataFrame(rows).to_arrow(), mode="append")
                rows.clear()

    started = time.perf_counter()
    with connect(serving_url) as connection, connection.cursor() as cursor:
        # The synthetic events are of this month and the last (late ones).
        this_month = datetime.now(UTC).date().replace(day=1)
        ensure_partitions(connection, [(this_month - timedelta(days=1)).replace(day=1), this_month])
        while counts["messages"] < limit:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            counts["messages"] += 1
            offsets[message.partition()] = message.offset() + 1
            now = datetime.now(UTC)
            try:
                event = json.loads(message.value())
                reason = check(event, customers, now) if isinstance(event, dict) else "json"
            except (ValueError, InvalidOperation):
                event, reason = None, "json"
            if reason is not None:
                counts["quarantined"] += 1
                quarantined_rows.append(
                    {"offset": message.offset(), "value": message.value(), "rule": reason}
                )
            elif event["event_id"] in seen:
                counts["duplicates"] += 1
            else:
                seen.add(event["event_id"])
                created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00"))
                currency = event.get("currency") or "USD"
                amount = Decimal(event["amount"])
                rate = Decimal(1) if currency == "USD" else rates.get((created.date(), currency))
                amount_usd = usd_amount_of(amount, rate) if rate is not None else None
                if amount_usd is None:
                    counts["quarantined"] += 1
                    quarantined_rows.append(
                        {"offset": message.offset(), "value": message.value(), "rule": "fx"}
                    )
                else:
                    cursor.execute(
                        "INSERT INTO transaction_history (transaction_id, customer_id, amount, "
                        "transaction_type, created_at, currency, amount_usd, event_id) "
                        "VALUES (md5(%s)::uuid, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING",
                        (
                            event["event_id"],
                            int(event["customer_id"]),
                            amount,
                            event["transaction_type"].upper(),
                            created,
                            currency,
                            amount_usd,
                            event["event_id"],
                        ),
                    )
                    if cursor.rowcount:
                        cursor.execute(
                            "INSERT INTO customer_balances (customer_id, current_balance, "
                            "currency) VALUES (%s, %s, 'USD') ON CONFLICT (customer_id) DO "
                            "UPDATE SET current_balance = customer_balances.current_balance "
                            "+ EXCLUDED.current_balance, last_updated = NOW(), "
                            "version = customer_balances.version + 1",
                            (int(event["customer_id"]), amount_usd),
                        )
                    counts["accepted"] += 1
                    accepted_rows.append(
                        {
                            "event_id": event["event_id"],
                            "customer_id": int(event["customer_id"]),
                            "transaction_type": event["transaction_type"].upper(),
                            "amount": str(amount),
                            "currency": currency,
                            "amount_usd": str(amount_usd),
                            "created_at": created,
                            "kafka_partition": message.partition(),
                            "kafka_offset": message.offset(),
                        }
                    )
            if counts["messages"] % commit_every == 0:
                connection.commit()
                consumer.commit(
                    offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                    asynchronous=True,
                )
                flush()
        connection.commit()
        flush(final=True)
    consumer.close()
    return BaselineResult(
        counts["messages"],
        counts["accepted"],
        counts["duplicates"],
        counts["quarantined"],
        time.perf_counter() - started,
    )
