"""Alert conditions at their thresholds, transitions, and the notifiers and connector probe
over real HTTP on loopback."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing_dagster.alert_state import (
    LakeProgress,
    SensorState,
    deliver,
    dump_sensor_state,
    load_sensor_state,
    track_progress,
)
from billing_dagster.alerts import (
    FinishedRun,
    connector_alert,
    consumer_lag_alert,
    dump_state,
    ingest_run_failed_alert,
    ingest_stalled_alert,
    load_state,
    reconciliation_alert,
    transitions,
    validation_failure_rate_alert,
)
from billing_dagster.connector_probe import ConnectorStatus, probe_connector
from billing_dagster.notifiers import LogNotifier, NotificationError, WebhookNotifier, notify_all
from billing_dagster.offsets import consumer_lag
from billing_dagster.redaction import redact_text, redacted
from billing_dagster.settings import ConfigError, load_settings

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
    host = url.rsplit("/", 1)[0]
    logger = logging.getLogger("billing-alerts-test")
    logger.setLevel(logging.INFO)
    collected = Collected()
    logger.addHandler(collected)
    alert = consumer_lag_alert({0: 50_000})
    # The error names the server, never the path (a webhook's token often is its path).
    with pytest.raises(NotificationError, match=f"cannot deliver alert to webhook {host}/"):
        WebhookNotifier(url).notify(alert)
    errors = notify_all([WebhookNotifier(url), LogNotifier(logger, "docs/runbooks/")], [alert])
    logger.removeHandler(collected)
    assert len(errors) == 1 and host in errors[0] and "/hook" not in errors[0]
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


# ---- the ingest lane's alerts -------------------------------------------------------------

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def ran(run_id: str, kind: str, ok: bool, minutes_ago: float, message: str = "") -> FinishedRun:
    return FinishedRun(run_id, kind, ok, NOW - timedelta(minutes=minutes_ago), message)


def test_ingest_run_failed_until_a_later_success_of_its_kind_covers_it():
    failed = ran("r1", "ingest", False, 10, "cannot reach postgresql://u:hunter2@db/billing")
    alert = ingest_run_failed_alert([failed], now=NOW, window_minutes=60)
    assert alert.firing and alert.title == "Ingest Run Failed"
    assert "r1" in alert.summary and "cannot reach postgresql://u@db/billing" in alert.summary
    assert "hunter2" not in repr(alert)
    # A later successful ingest run covers it; an earlier one or a reconciliation does not.
    for runs, firing in [
        ([failed, ran("r2", "ingest", True, 5)], False),
        ([failed, ran("r0", "ingest", True, 20)], True),
        ([failed, ran("c1", "reconcile", True, 5)], True),
        ([failed, ran("r2", "ingest", True, 5), ran("c2", "reconcile", False, 1, "x")], True),
    ]:
        assert ingest_run_failed_alert(runs, now=NOW, window_minutes=60).firing is firing
    # Beyond the window it is no longer reported.
    assert not ingest_run_failed_alert([failed], now=NOW, window_minutes=5).firing
    latest = ingest_run_failed_alert(
        [failed, ran("r3", "ingest", False, 2, "Exceeded maximum runtime of 900 seconds.")],
        now=NOW,
        window_minutes=60,
    )
    assert latest.summary.startswith("ingest run r3 failed") and "1 more" in latest.summary
    assert [r["run_id"] for r in latest.details["failed_runs"]] == ["r3", "r1"]


def test_ingest_stalled_needs_lag_and_time_without_lake_progress():
    start = track_progress(None, {0: 10, 1: None}, lag=5, now=NOW)
    assert start == LakeProgress({0: 10}, NOW)
    later = NOW + timedelta(minutes=11)
    # The marks did not move for 11 minutes with lag: stalled (threshold 10).
    still = track_progress(start, {0: 10}, lag=5, now=later)
    assert still.since == NOW
    alert = ingest_stalled_alert(5, still.since, now=later, stall_minutes=10)
    assert alert.firing and "11 min" in alert.summary
    assert not ingest_stalled_alert(5, still.since, now=later, stall_minutes=12).firing
    # Progress, or nothing left to read, restarts the clock: a quiet topic never stalls.
    assert track_progress(start, {0: 11}, lag=5, now=later).since == later
    assert track_progress(start, {0: 10}, lag=0, now=later).since == later
    assert not ingest_stalled_alert(0, NOW - timedelta(hours=3), now=NOW, stall_minutes=10).firing


# ---- delivery at least once ---------------------------------------------------------------


def test_sensor_state_round_trips_and_reads_the_older_cursor():
    state = SensorState({"consumer_lag": True}, LakeProgress({0: 3, 5: 9}, NOW))
    assert load_sensor_state(dump_sensor_state(state)) == state
    old = dump_state([consumer_lag_alert({0: 20_000})])
    assert load_sensor_state(old) == SensorState({"consumer_lag": True})
    assert load_sensor_state("not json") == SensorState()


def test_a_failed_delivery_stays_pending_and_is_retried_until_delivered(endpoint: Endpoint):
    url = f"{endpoint.url}/hooks/T0/B0/sekret-token"
    notifiers = [WebhookNotifier(url)]
    firing, quiet = [consumer_lag_alert({0: 20_000})], [consumer_lag_alert({0: 1})]
    endpoint.post_statuses = [500]
    state, errors = deliver(notifiers, {}, firing)
    assert state == {"consumer_lag": False} and len(errors) == 1
    assert "HTTP 500" in errors[0] and "stays pending" in errors[0]
    assert "sekret-token" not in errors[0]
    state, errors = deliver(notifiers, state, firing)  # the next tick: sent again, taken
    assert state == {"consumer_lag": True} and errors == []
    assert [body["status"] for _, body, _ in endpoint.posts] == ["firing"]
    assert deliver(notifiers, state, firing) == (state, [])  # delivered: not sent again
    endpoint.post_statuses = [503, 500]
    state, _ = deliver(notifiers, state, quiet)
    state, _ = deliver(notifiers, state, quiet)
    assert state == {"consumer_lag": True}  # the resolution is still pending
    state, errors = deliver(notifiers, state, quiet)
    assert state == {"consumer_lag": False} and errors == []
    assert [body["status"] for _, body, _ in endpoint.posts] == ["firing", "resolved"]
    assert [status for _, _, status in endpoint.rejected] == [500, 503, 500]
    # An alert not evaluated this time (its input out of reach) keeps its delivered state.
    assert deliver(notifiers, {"ingest_stalled": True}, quiet)[0]["ingest_stalled"] is True


# ---- no URL secret in any message ----------------------------------------------------------

SECRET = "s3cr3t-T0KEN"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://billing:{SECRET}@db:5432/billing", "postgresql://billing@db:5432/billing"),
        (
            f"postgresql://billing@db/billing?password={SECRET}",
            "postgresql://billing@db/billing?password=***",
        ),
        (f"https://hooks.slack.com/services/T0/B0/{SECRET}", "https://hooks.slack.com/***"),
        (f"https://alerts.example/hook?token={SECRET}", "https://alerts.example/***"),
        (f"https://{SECRET}@alerts.example", "https://***@alerts.example"),
        (f"http://admin:{SECRET}@connect:8083/connectors/c/status", "http://***@connect:8083/***"),
        (f"admin:{SECRET}@db/billing", "***@db/***"),
        ("http://127.0.0.1:8083", "http://127.0.0.1:8083"),
    ],
)
def test_redacted_keeps_where_and_drops_secrets(url: str, shown: str):
    assert redacted(url) == shown
    text = redact_text(f"failed: {url}, retrying")
    assert SECRET not in text and text.startswith("failed: ") and text.endswith(", retrying")
    if "://" in url:
        assert text == f"failed: {shown}, retrying"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING_POSTGRES_URL", f"postgresq://billing:{SECRET}@db/billing"),
        ("BILLING_OLTP_URL", f"mysql://root:{SECRET}@db/billing"),
        ("BILLING_ALERT_WEBHOOK_URL", f"hooks.slack.com/services/T0/B0/{SECRET}"),
        ("BILLING_CDC_STATUS_URL", f"ftp://admin:{SECRET}@connect/status"),
        ("BILLING_SCHEMA_REGISTRY_URL", f"registry?token={SECRET}"),
        ("BILLING_LAKE_ROOT", f"https://key:{SECRET}@minio/lake"),
    ],
)
def test_config_errors_name_the_setting_but_never_its_secret(name: str, value: str):
    with pytest.raises(ConfigError) as raised:
        load_settings({name: value})
    assert name in str(raised.value) and SECRET not in str(raised.value)


def test_notifier_and_probe_errors_never_show_the_token(endpoint: Endpoint):
    url = f"{endpoint.url}/hooks/{SECRET}?token={SECRET}"
    endpoint.post_statuses = [500]
    with pytest.raises(NotificationError) as raised:
        WebhookNotifier(url).notify(consumer_lag_alert({0: 20_000}))
    assert "HTTP 500" in str(raised.value) and SECRET not in str(raised.value)
    assert SECRET not in repr(WebhookNotifier(url))
    endpoint.reply = (404, {})
    status = probe_connector(url)
    assert status.state == "UNREACHABLE" and "HTTP 404" in status.detail
    assert SECRET not in status.detail
    closed = probe_connector(closed_port_url().replace("/hook", f"/{SECRET}"), timeout_s=2)
    assert closed.state == "UNREACHABLE" and SECRET not in closed.detail
