"""Realistic synthetic billing traffic: skewed customers, several currencies, taxes,
prorations, refunds, chargebacks, adjustments, duplicate deliveries and malformed records.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from billing_dagster.contract import BillingEvent, TransactionType

CENT = Decimal("0.01")
CURRENCY_WEIGHTS = {"USD": 60, "EUR": 20, "GBP": 10, "CAD": 5, "AUD": 5}
TYPE_WEIGHTS = {
    TransactionType.PAYMENT: 85,
    TransactionType.REFUND: 7,
    TransactionType.CHARGEBACK: 2,
    TransactionType.ADJUSTMENT: 6,
}
TAX_RATES = (Decimal("0"), Decimal("0.05"), Decimal("0.0825"), Decimal("0.20"))
PLANS = {"starter": Decimal("29.00"), "pro": Decimal("99.00"), "enterprise": Decimal("499.00")}


@dataclass(frozen=True)
class GeneratedRecord:
    """One Kafka record and what it is, so tests know the expected outcome."""

    key: bytes
    value: bytes
    kind: str  # "valid", "duplicate" (a redelivery of an earlier valid record), "invalid"
    event: BillingEvent | None = None


INVALID_VALUES = (
    b"\xff\xfe\x00 not utf-8",
    b'{"event_id": "truncated", "customer_id": 1, "amou',
    b'{"customer_id": 7, "transaction_type": "PAYMENT", "amount": "10.00"}',
    b'{"event_id": "x-precision", "customer_id": 7, "transaction_type": "PAYMENT", '
    b'"amount": "10.005"}',
    b'{"event_id": "x-type", "customer_id": 7, "transaction_type": "GIFT", "amount": "1.00"}',
    b'{"event_id": "x-object", "customer_id": 7, "transaction_type": "PAYMENT", '
    b'"amount": {"value": 10}}',
)


class SyntheticBillingStream:
    def __init__(
        self,
        *,
        seed: int = 7,
        customers: int = 5_000,
        duplicate_rate: float = 0.01,
        invalid_rate: float = 0.005,
        v1_rate: float = 0.3,
    ) -> None:
        self.random = random.Random(seed)
        self.customers = customers
        self.duplicate_rate = duplicate_rate
        self.invalid_rate = invalid_rate
        self.v1_rate = v1_rate
        self._recent: list[GeneratedRecord] = []
        # Refunds and chargebacks go to customers who have paid, as in real billing.
        self._paying: list[int] = []
        self._paying_set: set[int] = set()

    @property
    def customer_ids(self) -> range:
        return range(1001, 1001 + self.customers)

    def reference_data(self, around: datetime | None = None, days: int = 30):
        """Reference tables covering every customer of the stream and FX rates for
        `days` days either side of `around` (default: now)."""
        from billing_dagster.enrichment import demo_reference_data

        middle = (around or datetime.now(UTC)).date()
        first_day = middle - timedelta(days=days)
        return demo_reference_data(
            self.customer_ids,
            first_day=first_day,
            days=2 * days + 1,
            plans=PLANS,
            subscribed_since=datetime.combine(first_day, datetime.min.time()),
        )

    def _customer(self) -> int:
        # Pareto-skewed: a few customers generate much of the traffic, as in real billing.
        return min(self.customers, int(self.random.paretovariate(1.2))) + 1000

    def _money(self, low: float, high: float) -> Decimal:
        value = Decimal(str(self.random.lognormvariate(3.6, 1.0))).quantize(CENT)
        return min(max(value, Decimal(str(low))), Decimal(str(high)))

    def _event(self, now: datetime) -> BillingEvent:
        kind = self.random.choices(list(TYPE_WEIGHTS), weights=list(TYPE_WEIGHTS.values()))[0]
        returning = kind in (TransactionType.REFUND, TransactionType.CHARGEBACK)
        if returning and not self._paying:
            kind, returning = TransactionType.PAYMENT, False
        currency = self.random.choices(
            list(CURRENCY_WEIGHTS), weights=list(CURRENCY_WEIGHTS.values())
        )[0]
        metadata = None
        if kind is TransactionType.PAYMENT and self.random.random() < 0.3:
            plan, price = self.random.choice(list(PLANS.items()))
            days_in_period = 30
            days_used = self.random.randint(1, days_in_period)
            amount = (price * days_used / days_in_period).quantize(CENT, ROUND_HALF_EVEN)
            metadata = json.dumps(
                {"plan": plan, "proration": {"days_used": days_used, "days": days_in_period}}
            )
        elif kind is TransactionType.PAYMENT:
            amount = self._money(0.5, 25_000)
        elif kind is TransactionType.ADJUSTMENT:
            amount = self._money(0.01, 200) * self.random.choice((1, -1))
            metadata = json.dumps({"reason": "goodwill credit" if amount < 0 else "usage true-up"})
        else:
            amount = -self._money(0.5, 5_000)
        tax = None
        if kind is not TransactionType.ADJUSTMENT:
            tax = (amount * self.random.choice(TAX_RATES)).quantize(CENT, ROUND_HALF_EVEN)
        lateness = timedelta(seconds=self.random.uniform(0, 2))
        if self.random.random() < 0.01:
            lateness = timedelta(seconds=self.random.uniform(5, 600))
        if returning:
            # After the payment it returns: never earlier than any payment so far.
            customer, lateness = self.random.choice(self._paying), timedelta(0)
        else:
            customer = self._customer()
        if kind is TransactionType.PAYMENT and customer not in self._paying_set:
            self._paying_set.add(customer)
            self._paying.append(customer)
        return BillingEvent(
            event_id=str(uuid.UUID(int=self.random.getrandbits(128), version=4)),
            customer_id=customer,
            transaction_type=kind,
            amount=amount,
            created_at=now - lateness,
            currency=currency,
            metadata=metadata,
            tax_amount=tax,
        )

    def records(self, count: int, *, now: datetime | None = None) -> Iterator[GeneratedRecord]:
        for _ in range(count):
            moment = now or datetime.now(UTC)
            roll = self.random.random()
            if roll < self.invalid_rate:
                yield GeneratedRecord(
                    str(self._customer()).encode(), self.random.choice(INVALID_VALUES), "invalid"
                )
                continue
            if roll < self.invalid_rate + self.duplicate_rate and self._recent:
                again = self.random.choice(self._recent)
                yield GeneratedRecord(again.key, again.value, "duplicate", again.event)
                continue
            event = self._event(moment)
            record = GeneratedRecord(
                str(event.customer_id).encode(),
                event.to_json_bytes(include_tax_field=self.random.random() >= self.v1_rate),
                "valid",
                event,
            )
            self._recent = [*self._recent[-99:], record]
            yield record
