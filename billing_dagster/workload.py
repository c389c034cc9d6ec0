"""A realistic billing workload as OLTP row changes, one OLTP transaction per activity.

Activities: new subscriptions (invoice and payment), renewals, plan changes with a
prorated ADJUSTMENT, one-off usage invoices paid at once, refunds and chargebacks of
earlier payments, goodwill credits and cancellations. Each customer pays in one currency
and at one tax rate. Rows of the money tables (transactions, payments, refunds) are only
ever inserted; subscriptions and invoices are also updated, as a billing system does.

The same activities go either to the OLTP tables (Debezium captures them) or, when CDC is
not configured, straight to Kafka as billing events: `billing_events_of` maps rows to
events with the Debezium decoder's own mapping, so both paths give the same events.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import polars as pl

from billing_dagster import pacing
from billing_dagster.contract import format_money
from billing_dagster.proration import prorated_charge
from billing_dagster.synthetic import CURRENCY_WEIGHTS, PLANS, TAX_RATES

CENT = Decimal("0.01")
PERIOD = timedelta(days=30)

#: How often each activity happens, relative to the others.
ACTIVITY_WEIGHTS = {
    "subscribe": 10,
    "renew": 20,
    "change_plan": 8,
    "usage": 40,
    "refund": 8,
    "chargeback": 2,
    "credit": 8,
    "cancel": 4,
}

PRIMARY_KEYS = {
    "subscriptions": "subscription_id",
    "invoices": "invoice_id",
    "transactions": "transaction_id",
    "payments": "payment_id",
    "refunds": "refund_id",
}


@dataclass(frozen=True)
class RowChange:
    """One INSERT (`values` is the whole row) or UPDATE (`values` are the changed columns
    of the row whose primary key is `key`)."""

    table: str
    op: str  # "insert" or "update"
    values: dict[str, object]
    key: str | None = None


@dataclass(frozen=True)
class Activity:
    kind: str
    changes: tuple[RowChange, ...]


@dataclass
class _Subscription:
    subscription_id: str
    customer_id: int
    plan: str
    period_start: date
    period_end: date


@dataclass
class _Payment:
    payment_id: str
    customer_id: int
    amount: Decimal
    returned: Decimal = Decimal(0)


class BillingWorkload:
    """`activities(n)` yields n activities; state (subscriptions, refundable payments) is
    kept so refunds return real earlier payments and renewals follow real subscriptions."""

    def __init__(self, *, seed: int = 7, customers: int = 5_000) -> None:
        self.random = random.Random(seed)
        self.customers = customers
        self._subscriptions: dict[str, _Subscription] = {}
        self._payments: list[_Payment] = []

    @property
    def customer_ids(self) -> range:
        return range(1001, 1001 + self.customers)

    def currency_of(self, customer_id: int) -> str:
        weights = random.Random(customer_id).choices(
            list(CURRENCY_WEIGHTS), weights=list(CURRENCY_WEIGHTS.values())
        )
        return weights[0]

    def tax_rate_of(self, customer_id: int) -> Decimal:
        return random.Random(-customer_id).choice(TAX_RATES)

    def _id(self) -> str:
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def _customer(self) -> int:
        return min(self.customers, int(self.random.paretovariate(1.2))) + 1000

    def _tax(self, customer_id: int, amount: Decimal) -> Decimal:
        return (amount * self.tax_rate_of(customer_id)).quantize(CENT, ROUND_HALF_EVEN)

    def activities(self, count: int, *, now: datetime | None = None) -> Iterator[Activity]:
        for _ in range(count):
            moment = now or datetime.now(UTC)
            kind = self.random.choices(
                list(ACTIVITY_WEIGHTS), weights=list(ACTIVITY_WEIGHTS.values())
            )[0]
            activity = getattr(self, f"_{kind}")(moment)
            # Without subscriptions or payments yet, start with a subscription.
            yield activity if activity is not None else self._subscribe(moment)

    # ---- activities -------------------------------------------------------------------

    def _paid_invoice(
        self, customer_id: int, amount: Decimal, now: datetime, subscription_id: str | None
    ) -> list[RowChange]:
        invoice_id, payment_id = self._id(), self._id()
        tax = self._tax(customer_id, amount)
        currency = self.currency_of(customer_id)
        self._payments.append(_Payment(payment_id, customer_id, amount))
        return [
            RowChange(
                "invoices",
                "insert",
                {
                    "invoice_id": invoice_id,
                    "subscription_id": subscription_id,
                    "customer_id": customer_id,
                    "amount": amount,
                    "tax_amount": tax,
                    "currency": currency,
                    "status": "open",
                    "issued_at": now,
                },
            ),
            RowChange(
                "payments",
                "insert",
                {
                    "payment_id": payment_id,
                    "invoice_id": invoice_id,
                    "customer_id": customer_id,
                    "amount": amount,
                    "tax_amount": tax,
                    "currency": currency,
                    "method": self.random.choice(("card", "card", "card", "sepa", "ach")),
                    "created_at": now,
                },
            ),
            RowChange("invoices", "update", {"status": "paid", "paid_at": now}, invoice_id),
        ]

    def _subscribe(self, now: datetime) -> Activity:
        customer_id = self._customer()
        plan = self.random.choice(list(PLANS))
        subscription = _Subscription(
            self._id(), customer_id, plan, now.date(), (now + PERIOD).date()
        )
        self._subscriptions[subscription.subscription_id] = subscription
        row = RowChange(
            "subscriptions",
            "insert",
            {
                "subscription_id": subscription.subscription_id,
                "customer_id": customer_id,
                "plan": plan,
                "price": PLANS[plan],
                "currency": self.currency_of(customer_id),
                "status": "active",
                "current_period_start": subscription.period_start,
                "current_period_end": subscription.period_end,
                "created_at": now,
                "updated_at": now,
            },
        )
        charge = self._paid_invoice(customer_id, PLANS[plan], now, subscription.subscription_id)
        return Activity("subscribe", (row, *charge))

    def _any_subscription(self) -> _Subscription | None:
        if not self._subscriptions:
            return None
        return self._subscriptions[self.random.choice(list(self._subscriptions))]

    def _renew(self, now: datetime) -> Activity | None:
        subscription = self._any_subscription()
        if subscription is None:
            return None
        subscription.period_start = subscription.period_end
        subscription.period_end = subscription.period_start + PERIOD
        update = RowChange(
            "subscriptions",
            "update",
            {
                "current_period_start": subscription.period_start,
                "current_period_end": subscription.period_end,
                "updated_at": now,
            },
            subscription.subscription_id,
        )
        charge = self._paid_invoice(
            subscription.customer_id, PLANS[subscription.plan], now, subscription.subscription_id
        )
        return Activity("renew", (update, *charge))

    def _change_plan(self, now: datetime) -> Activity | None:
        subscription = self._any_subscription()
        if subscription is None:
            return None
        new_plan = self.random.choice([p for p in PLANS if p != subscription.plan])
        changed_on = min(max(now.date(), subscription.period_start), subscription.period_end)
        if changed_on >= subscription.period_end:
            changed_on = subscription.period_end - timedelta(days=1)
        charge = prorated_charge(
            PLANS[subscription.plan],
            PLANS[new_plan],
            period_start=subscription.period_start,
            period_end=subscription.period_end,
            changed_on=changed_on,
        )
        metadata = {
            "subscription_id": subscription.subscription_id,
            "from_plan": subscription.plan,
            "to_plan": new_plan,
            "proration": {
                "days_remaining": (subscription.period_end - changed_on).days,
                "days": (subscription.period_end - subscription.period_start).days,
            },
        }
        subscription.plan = new_plan
        changes = [
            RowChange(
                "subscriptions",
                "update",
                {"plan": new_plan, "price": PLANS[new_plan], "updated_at": now},
                subscription.subscription_id,
            )
        ]
        if charge != 0:
            changes.append(
                RowChange(
                    "transactions",
                    "insert",
                    {
                        "transaction_id": self._id(),
                        "customer_id": subscription.customer_id,
                        "subscription_id": subscription.subscription_id,
                        "transaction_type": "ADJUSTMENT",
                        "amount": charge,
                        "currency": self.currency_of(subscription.customer_id),
                        "tax_amount": None,
                        "metadata": json.dumps(metadata, sort_keys=True),
                        "created_at": now,
                    },
                )
            )
        return Activity("change_plan", tuple(changes))

    def _usage(self, now: datetime) -> Activity:
        customer_id = self._customer()
        amount = Decimal(str(self.random.lognormvariate(3.6, 1.0))).quantize(CENT)
        amount = min(max(amount, Decimal("0.50")), Decimal("25000.00"))
        return Activity("usage", tuple(self._paid_invoice(customer_id, amount, now, None)))

    def _return(self, now: datetime, kind: str) -> Activity | None:
        open_payments = [p for p in self._payments[-500:] if p.returned < p.amount]
        if not open_payments:
            return None
        payment = self.random.choice(open_payments)
        remaining = payment.amount - payment.returned
        if kind == "refund":
            share = Decimal(self.random.choice((25, 50, 100))) / 100
            amount = max(CENT, (remaining * share).quantize(CENT, ROUND_HALF_EVEN))
        else:
            amount = remaining  # a chargeback claws back everything still held
        payment.returned += amount
        reason = (
            self.random.choice(("damaged", "duplicate charge", "service outage"))
            if kind == "refund"
            else self.random.choice(("fraudulent", "not received"))
        )
        row = {
            "refund_id": self._id(),
            "payment_id": payment.payment_id,
            "customer_id": payment.customer_id,
            "kind": kind,
            "amount": amount,
            "tax_amount": self._tax(payment.customer_id, amount),
            "currency": self.currency_of(payment.customer_id),
            "reason": reason,
            "created_at": now,
        }
        return Activity(kind, (RowChange("refunds", "insert", row),))

    def _refund(self, now: datetime) -> Activity | None:
        return self._return(now, "refund")

    def _chargeback(self, now: datetime) -> Activity | None:
        return self._return(now, "chargeback")

    def _credit(self, now: datetime) -> Activity:
        customer_id = self._customer()
        amount = -Decimal(str(self.random.uniform(1, 50))).quantize(CENT)
        row = {
            "transaction_id": self._id(),
            "customer_id": customer_id,
            "subscription_id": None,
            "transaction_type": "ADJUSTMENT",
            "amount": amount,
            "currency": self.currency_of(customer_id),
            "tax_amount": None,
            "metadata": json.dumps({"reason": "goodwill credit"}),
            "created_at": now,
        }
        return Activity("credit", (RowChange("transactions", "insert", row),))

    def _cancel(self, now: datetime) -> Activity | None:
        subscription = self._any_subscription()
        if subscription is None:
            return None
        del self._subscriptions[subscription.subscription_id]
        update = RowChange(
            "subscriptions",
            "update",
            {"status": "cancelled", "updated_at": now},
            subscription.subscription_id,
        )
        return Activity("cancel", (update,))


def run_at_rate(
    workload: BillingWorkload, write: Callable[[list[Activity]], object], **pace: Any
) -> Counter:
    """Write the workload's activities at a steady rate (`pacing.run_at_rate`'s `rate`,
    `count`, `duration_s`, `should_stop`, `on_progress`); returns activities per kind."""
    return pacing.run_at_rate(workload.activities, write, lambda a: a.kind, **pace)


# ---- rows as Debezium would send them, and as billing events ----------------------------


def debezium_value(value: object) -> object:
    """A column value as Debezium's JsonConverter sends it (decimal.handling.mode=string)."""
    if isinstance(value, Decimal):
        return format_money(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return (value - date(1970, 1, 1)).days  # io.debezium.time.Date: days since epoch
    return value


def change_envelope(change: RowChange) -> dict[str, object]:
    """The Debezium change event (op c) for an inserted row."""
    return {
        "before": None,
        "after": {k: debezium_value(v) for k, v in change.values.items()},
        "source": {"connector": "postgresql", "schema": "billing", "table": change.table},
        "op": "c",
    }


def billing_events_of(activities: Iterable[Activity]) -> list[tuple[bytes, bytes]]:
    """(key, value) Kafka records of the billing events these activities make, mapped by
    the Debezium decoder (one mapping for both paths) and encoded as contract JSON."""
    from billing_dagster.debezium import BILLING_EVENT_TABLES, decode_debezium_wire

    inserts = [
        c
        for a in activities
        for c in a.changes
        if c.op == "insert" and c.table in BILLING_EVENT_TABLES
    ]
    if not inserts:
        return []
    values = [json.dumps(change_envelope(c)).encode() for c in inserts]
    wire, failed = decode_debezium_wire(
        pl.DataFrame({"value": values}, schema={"value": pl.Binary})
    )
    if failed.height:
        raise ValueError(f"workload rows the CDC mapping rejects: {failed.to_dicts()[:3]}")
    records = []
    for event in wire.to_list():
        body = {k: v for k, v in event.items() if v is not None}
        body["customer_id"] = int(event["customer_id"])
        records.append((event["customer_id"].encode(), json.dumps(body).encode()))
    return records
