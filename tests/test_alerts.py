"""Alert conditions at their thresholds, transitions, and the notifiers and connector probe
over real HTTP on loopback."""

from __future__ import annotations

import logging
import socket
from decimal import Decimal

import pytest

from billing_dagster.alerts import (
    ConnectorStatus,
    LogNotifier,
    NotificationError,
    WebhookNotifier,
    connector_alert,
    consumer_lag_alert,
    dump_state,
    load_state,
    notify_all,
    probe_connector,
    reconciliation_alert,
    transitions,
    validation_failure_rate_alert,
)
from billing_dagster.offsets import consumer_lag

from .http_endpoint import Endpoint


@pytest.mark.parametrize(
    ("lag", "firing"),
    [({0: 10_000}, False), ({0: 5_000, 1: 5_001}, True), ({}, False), ({3: 0}, False)],
)
def test_consumer_lag_threshold(lag: dict[int, int], firing: bool):
    alert = consumer_lag_alert(lag, 10_000)
    assert alert.firing is firing
    assert alert.value == sum(lag.values())


def test_lag_is_end_offset_less_the_lakes_next_offset():
    marks = {0: (0, 100), 1: (50, 80), 2: (10, 10)}
    assert consumer_lag(marks, {0: 40, 1: None, 2: None}) == {0: 60, 1: 30, 2: 0}
    assert consumer_lag({0: (200, 300)}, {0: 150}) == {0: 100}  # retention passed the lake


@pytest.mark.parametrize(
    ("pct", "firing"),
    [
        (Decimal("0.1"), False),
        (Decimal("0.100001"), True),
        (Decimal("0"), False),
        (Decimal("Infinity"), True),
        (None, False),
    ],
)
def test_reconciliation_threshold(pct: Decimal | None, firing: bool):
    alert = reconciliation_alert(pct, Decimal("0.1"), date="2024-12-15", worst="currency EUR")
    assert alert.firing is firing
    if pct is None:
        assert alert.summary == "no reconciliation recorded yet"


@pytest.mark.parametrize(
    ("read", "quarantined", "firing"),
    [(10_000, 1, False), (9_999, 1, True), (0, 0, False), (1_000_000, 100, False), (100, 0, False)],
)
def test_validation_failure_rate_threshold(read: int, quarantined: int, firing: bool):
    alert = validation_failure_rate_alert(read, quarantined, Decimal("0.01"), 5)
    assert alert.firing is firing


def test_connector_alert():
    assert not connector_alert(None).firing
    assert not connector_alert(ConnectorStatus("RUNNING")).firing
    down = connector_alert(ConnectorStatus("FAILED", "task 0: boom"))
    assert down.firing and "FAILED" in down.summary and "boom" in down.summary


def test_transitions_fire_once_and_resolve_once():
    firing = [consumer_lag_alert({0: 20_000})]
    quiet = [consumer_lag_alert({0: 1})]
    state = load_state(None)
    assert [a.firing for a in transitions(state, firing)] == [True]
    state = load_state(dump_state(firing))
    assert transitions(state, firing) == []
    assert [a.firing for a in transitions(state, quiet)] == [False]
    assert transitions(load_state(dump_state(quiet)), quiet) == []
    assert load_state("not json") == {}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_webhook_posts_the_alert_as_json(endpoint: Endpoint):
    alert = reconciliation_alert(
        Decimal("0.5"), Decimal("0.1"), date="2024-12-15", worst="currency EUR"
    )
    WebhookNotifier(f"{endpoint.url}/hook", "https://runbooks.example/billing").notify(alert)
    ((path, body, content_type),) = endpoint.posts
    assert path == "/hook" and content_type == "application/json"
    assert body["alert"] == "reconciliation_mismatch"
    assert body["status"] == "firing"
    assert body["value"] == "0.5" and body["threshold"] == "0.1"
    assert body["runbook"] == "https://runbooks.example/billing/reconciliation-mismatch.md"
    assert body["details"] == {"date": "2024-12-15", "worst": "currency EUR"}


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_down_webhook_does_not_stop_the_log():
    url = closed_port_url()
    logger = logging.getLogger("billing-alerts-test")
    logger.setLevel(logging.INFO)
    collected = Collected()
    logger.addHandler(collected)
    alert = consumer_lag_alert({0: 50_000})
    with pytest.raises(NotificationError, match=f"cannot deliver alert to webhook {url}"):
        WebhookNotifier(url).notify(alert)
    errors = notify_all([WebhookNotifier(url), LogNotifier(logger, "docs/runbooks/")], [alert])
    logger.removeHandler(collected)
    assert len(errors) == 1 and url in errors[0]
    (message,) = collected.messages
    assert "High Billing Event Lag" in message
    assert "docs/runbooks/consumer-lag.md" in message


@pytest.mark.parametrize(
    ("reply", "state", "detail"),
    [
        (
            (200, {"connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "RUNNING"}]}),
            "RUNNING",
            "",
        ),
        (
            (
                200,
                {
                    "connector": {"state": "RUNNING"},
                    "tasks": [
                        {"id": 0, "state": "FAILED", "trace": "PSQLException: slot gone\n at ..."}
                    ],
                },
            ),
            "FAILED",
            "task 0: PSQLException: slot gone",
        ),
        ((200, {"connector": {"state": "PAUSED"}, "tasks": []}), "PAUSED", ""),
        ((200, {"connector": {"state": "RUNNING"}, "tasks": []}), "UNASSIGNED", "no task"),
        ((200, {"status": "UP", "checks": []}), "RUNNING", ""),
        (
            (503, {"status": "DOWN", "checks": [{"name": "debezium", "status": "DOWN"}]}),
            "DOWN",
            "failing checks: debezium",
        ),
        ((200, "not json"), "UNREACHABLE", "did not answer JSON"),
        ((404, {}), "UNREACHABLE", "HTTP 404"),
    ],
)
def test_probe_connector(endpoint: Endpoint, reply, state: str, detail: str):
    endpoint.reply = reply
    status = probe_connector(f"{endpoint.url}/connectors/billing/status")
    assert status.state == state
    assert detail in status.detail


def test_probe_of_a_closed_port_is_unreachable():
    status = probe_connector(closed_port_url(), timeout_s=2)
    assert status.state == "UNREACHABLE"
    assert connector_alert(status).firing
