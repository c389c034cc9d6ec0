"""Events a balance cannot take: customer_balances.current_balance is a DECIMAL(12,2), so
an event that would carry a balance past ±9,999,999,999.99 is refused, alone, before the
lake decides the batch (rule `balance:overflow`); the customer's other events go on.

Events are taken in Kafka order (partition, offset) per customer, as the balance would
take them: an event is refused when the balance *with it* would overflow, and the events
after it are judged against the balance without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from billing_dagster.contract import MONEY_MAX

OVERFLOW_RULE = "balance:overflow"


@dataclass(frozen=True)
class BalanceEvent:
    customer_id: int
    kafka_partition: int
    kafka_offset: int
    amount_usd: Decimal


@dataclass(frozen=True)
class Refusal:
    kafka_partition: int
    kafka_offset: int
    rule: str
    reason: str


def overflowing_events(
    balances: Mapping[int, Decimal], events: Iterable[BalanceEvent], limit: Decimal = MONEY_MAX
) -> list[Refusal]:
    """The events to refuse so that no balance leaves [-limit, limit] at any point.

    `balances`: the customers' balances before these events (absent: 0)."""
    running = dict(balances)
    refused = []
    for event in sorted(events, key=lambda e: (e.customer_id, e.kafka_partition, e.kafka_offset)):
        before = running.get(event.customer_id, Decimal(0))
        after = before + event.amount_usd
        if abs(after) > limit:
            refused.append(
                Refusal(
                    event.kafka_partition,
                    event.kafka_offset,
                    OVERFLOW_RULE,
                    f"customer {event.customer_id}'s balance {before} USD plus this event's "
                    f"{event.amount_usd} USD would pass the balance limit of ±{limit} "
                    "(DECIMAL(12,2))",
                )
            )
        else:
            running[event.customer_id] = after
    return refused
