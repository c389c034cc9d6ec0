"""The billing workload generator's domain rules, without servers."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import Decimal

from billing_dagster.debezium import BILLING_EVENT_TABLES
from billing_dagster.synthetic import PLANS
from billing_dagster.workload import ACTIVITY_WEIGHTS, BillingWorkload, billing_events_of

NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def changes(activities, table: str, op: str = "insert"):
    return [c for a in activities for c in a.changes if c.table == table and c.op == op]


def test_every_activity_kind_happens_and_money_rows_are_only_inserted():
    activities = list(BillingWorkload(seed=1, customers=30).activities(2_000, now=NOW))
    assert set(Counter(a.kind for a in activities)) == set(ACTIVITY_WEIGHTS)
    for table in BILLING_EVENT_TABLES:
        assert changes(activities, table, "update") == []


def test_refunds_and_chargebacks_never_return_more_than_was_paid():
    activities = list(BillingWorkload(seed=2, customers=20).activities(3_000, now=NOW))
    paid = {c.values["payment_id"]: c.values for c in changes(activities, "payments")}
    returned: dict[str, Decimal] = defaultdict(Decimal)
    for refund in changes(activities, "refunds"):
        payment = paid[refund.values["payment_id"]]
        assert refund.values["customer_id"] == payment["customer_id"]
        assert refund.values["currency"] == payment["currency"]
        assert refund.values["amount"] > 0
        returned[refund.values["payment_id"]] += refund.values["amount"]
    assert returned, "the workload should refund some payments"
    assert all(total <= paid[p]["amount"] for p, total in returned.items())
    kinds = Counter(c.values["kind"] for c in changes(activities, "refunds"))
    assert kinds["refund"] > kinds["chargeback"] > 0


def test_plan_changes_carry_the_prorated_adjustment():
    workload = BillingWorkload(seed=3, customers=10)
    activities = list(workload.activities(1_000, now=NOW))
    prorations = [
        c
        for a in activities
        if a.kind == "change_plan"
        for c in a.changes
        if c.table == "transactions"
    ]
    assert prorations
    for row in prorations:
        metadata = json.loads(row.values["metadata"])
        assert row.values["transaction_type"] == "ADJUSTMENT"
        assert metadata["from_plan"] != metadata["to_plan"]
        assert row.values["amount"] == row.values["amount"].quantize(Decimal("0.01"))
        # An upgrade is charged, a downgrade credited, for the days left in the period.
        upgrade = PLANS[metadata["to_plan"]] > PLANS[metadata["from_plan"]]
        assert (row.values["amount"] > 0) == upgrade, metadata
        assert 0 < metadata["proration"]["days_remaining"] <= metadata["proration"]["days"]


def test_each_customer_pays_in_one_currency_and_kafka_events_match_the_rows():
    workload = BillingWorkload(seed=4, customers=50)
    activities = list(workload.activities(500, now=NOW))
    currencies = defaultdict(set)
    for table in BILLING_EVENT_TABLES:
        for change in changes(activities, table):
            currencies[change.values["customer_id"]].add(change.values["currency"])
    assert all(len(c) == 1 for c in currencies.values())
    assert len(set().union(*currencies.values())) >= 3

    events = {json.loads(v)["event_id"]: json.loads(v) for _, v in billing_events_of(activities)}
    for refund in changes(activities, "refunds"):
        event = events[refund.values["refund_id"]]
        assert event["transaction_type"] == refund.values["kind"].upper()
        assert Decimal(event["amount"]) == -refund.values["amount"]
    for payment in changes(activities, "payments"):
        event = events[payment.values["payment_id"]]
        assert (event["transaction_type"], Decimal(event["amount"])) == (
            "PAYMENT",
            payment.values["amount"],
        )
    money_rows = sum(len(changes(activities, t)) for t in BILLING_EVENT_TABLES)
    assert len(events) == money_rows


def test_same_seed_same_workload():
    first = list(BillingWorkload(seed=9).activities(200, now=NOW))
    again = list(BillingWorkload(seed=9).activities(200, now=NOW))
    assert first == again
