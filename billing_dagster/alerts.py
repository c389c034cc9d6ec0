"""The reference design's alerts: pure conditions, a connector probe, and notifiers.

Conditions take measured values and return an `Alert`, firing or not. Notification happens
on transitions only (an alert starts firing, or resolves), so a sensor evaluating every few
seconds does not page anyone twice for the same incident.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True)
class Alert:
    #: Stable id (webhook payloads, cursor state).
    name: str
    #: The reference design's name for it.
    title: str
    severity: str
    firing: bool
    summary: str
    value: object
    threshold: object
    #: Path of the runbook relative to the runbook base URL.
    runbook: str
    details: dict[str, object] = field(default_factory=dict)


def consumer_lag_alert(lag_by_partition: Mapping[int, int], threshold: int = 10_000) -> Alert:
    total = sum(lag_by_partition.values())
    worst = sorted(lag_by_partition.items(), key=lambda item: -item[1])[:5]
    return Alert(
        name="consumer_lag",
        title="High Billing Event Lag",
        severity="critical",
        firing=total > threshold,
        summary=f"consumer lag {total:,} records (threshold {threshold:,})",
        value=total,
        threshold=threshold,
        runbook="consumer-lag.md",
        details={"worst_partitions": {str(p): lag for p, lag in worst if lag}},
    )


def reconciliation_alert(
    discrepancy_pct: Decimal | None,
    tolerance_pct: Decimal = Decimal("0.1"),
    *,
    date: str | None = None,
    worst: str | None = None,
) -> Alert:
    """`discrepancy_pct` in percent (0.1 means 0.1 %); None: nothing reconciled yet."""
    firing = discrepancy_pct is not None and discrepancy_pct > tolerance_pct
    if discrepancy_pct is None:
        summary = "no reconciliation recorded yet"
    else:
        shown = "unbounded" if not discrepancy_pct.is_finite() else f"{discrepancy_pct}%"
        summary = (
            f"reconciliation of {date}: worst discrepancy {shown} ({worst}), "
            f"tolerance {tolerance_pct}%"
        )
    return Alert(
        name="reconciliation_mismatch",
        title="Revenue Reconciliation Mismatch",
        severity="high",
        firing=firing,
        summary=summary,
        value=None if discrepancy_pct is None else str(discrepancy_pct),
        threshold=str(tolerance_pct),
        runbook="reconciliation-mismatch.md",
        details={"date": date, "worst": worst},
    )


@dataclass(frozen=True)
class ConnectorStatus:
    #: RUNNING, FAILED, PAUSED, UNASSIGNED, DOWN or UNREACHABLE.
    state: str
    detail: str = ""


def connector_alert(status: ConnectorStatus | None) -> Alert:
    """Not firing when no CDC connector is configured (status None)."""
    firing = status is not None and status.state != "RUNNING"
    if status is None:
        summary = "no CDC connector configured"
    else:
        summary = f"CDC connector {status.state}" + (f": {status.detail}" if status.detail else "")
    return Alert(
        name="cdc_connector_down",
        title="CDC Connector Down",
        severity="critical",
        firing=firing,
        summary=summary,
        value=None if status is None else status.state,
        threshold="RUNNING",
        runbook="cdc-connector-down.md",
        details={} if status is None else {"detail": status.detail},
    )


def validation_failure_rate_alert(
    input_records: int,
    quarantined: int,
    threshold_pct: Decimal = Decimal("0.01"),
    window_minutes: int = 5,
) -> Alert:
    rate = Decimal(quarantined) * 100 / Decimal(input_records) if input_records else Decimal(0)
    return Alert(
        name="validation_failure_rate",
        title="Schema validation failure rate",
        severity="high",
        firing=input_records > 0 and rate > threshold_pct,
        summary=(
            f"validation failure rate {rate.quantize(Decimal('0.0001'))}% "
            f"({quarantined:,} of {input_records:,} records in {window_minutes} min, "
            f"threshold {threshold_pct}%)"
        ),
        value=str(rate.quantize(Decimal("0.000001"))),
        threshold=str(threshold_pct),
        runbook="validation-failure-rate.md",
        details={"input_records": input_records, "quarantined": quarantined},
    )


def serving_behind_alert(
    gaps: Mapping[int, tuple[int, int]] | None,
    repairs: Sequence[Mapping[str, object]],
    *,
    topic: str,
    window_minutes: int,
    error: str | None = None,
) -> Alert:
    """Postgres behind the lake: now (`gaps`, {partition: (serving, lake)}, taken between
    ingest runs), or repaired from billing_events in the last `window_minutes` (`repairs`,
    the ledger's rows that applied events). `error`: Postgres could not be asked."""
    ranges = ", ".join(f"{p}:{s}-{e}" for p, (s, e) in sorted((gaps or {}).items()))
    repaired = ", ".join(str(r["offset_ranges"]) for r in repairs)
    if error:
        summary = f"Postgres out of reach, balances are not being updated: {error}"
    elif ranges:
        summary = f"Postgres is behind the lake on {topic} at offsets {ranges}"
    elif repairs:
        events = sum(int(r["events_applied"]) for r in repairs)
        summary = (
            f"Postgres was behind the lake on {topic}: {events:,} events re-applied from "
            f"billing_events in the last {window_minutes} min at offsets {repaired}"
        )
    else:
        summary = f"Postgres holds every offset the lake decided on {topic}"
    return Alert(
        name="serving_behind_lake",
        title="Balances Behind Lake",
        severity="critical",
        firing=bool(error or ranges or repairs),
        summary=summary,
        value=sum(e - s for s, e in (gaps or {}).values()),
        threshold=0,
        runbook="serving-behind-lake.md",
        details={"behind": ranges, "repaired": [dict(r) for r in repairs], "error": error},
    )


def invariant_alert(failures: Mapping[str, str]) -> Alert:
    """`failures`: the serving invariants whose latest check failed, with its summary."""
    return Alert(
        name="serving_invariant_broken",
        title="Serving Invariant Broken",
        severity="critical",
        firing=bool(failures),
        summary="; ".join(f"{name}: {text}" for name, text in sorted(failures.items()))
        or "every serving invariant held at its last check",
        value=len(failures),
        threshold=0,
        runbook="serving-invariant-broken.md",
        details=dict(failures),
    )


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""


def probe_connector(url: str, timeout_s: float = 5.0) -> ConnectorStatus:
    """Kafka Connect `/connectors/<name>/status` or Debezium Server `/q/health`; never
    raises for an unreachable or unreadable endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # Quarkus health answers DOWN with 503 and a JSON body
            try:
                body = json.loads(exc.read())
            except ValueError:
                return ConnectorStatus("UNREACHABLE", f"HTTP 503 from {url}")
        else:
            return ConnectorStatus("UNREACHABLE", f"HTTP {exc.code} from {url}")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return ConnectorStatus("UNREACHABLE", f"{url}: {reason}")
    except ValueError:
        return ConnectorStatus("UNREACHABLE", f"{url} did not answer JSON")
    if isinstance(body, dict) and "connector" in body:
        connector = body.get("connector") or {}
        if connector.get("state") != "RUNNING":
            return ConnectorStatus(
                str(connector.get("state", "UNKNOWN")), _first_line(connector.get("trace", ""))
            )
        tasks = body.get("tasks") or []
        if not tasks:  # started but not yet (or no longer) assigned: nothing is captured
            return ConnectorStatus("UNASSIGNED", "the connector has no task")
        for task in tasks:
            if task.get("state") != "RUNNING":
                trace = _first_line(task.get("trace", ""))
                return ConnectorStatus(
                    str(task.get("state", "UNKNOWN")),
                    f"task {task.get('id')}" + (f": {trace}" if trace else ""),
                )
        return ConnectorStatus("RUNNING")
    if isinstance(body, dict) and "status" in body:
        if body["status"] == "UP":
            return ConnectorStatus("RUNNING")
        failing = [c.get("name", "?") for c in body.get("checks", []) if c.get("status") != "UP"]
        return ConnectorStatus("DOWN", "failing checks: " + ", ".join(failing) if failing else "")
    return ConnectorStatus("UNREACHABLE", f"{url} answered JSON that is not a connector status")


# ---- transitions ------------------------------------------------------------------------


def transitions(previous: Mapping[str, bool], alerts: Sequence[Alert]) -> list[Alert]:
    """Alerts that started firing, and those that resolved (returned with firing=False)."""
    return [a for a in alerts if a.firing != previous.get(a.name, False)]


def dump_state(alerts: Sequence[Alert]) -> str:
    return json.dumps({a.name: a.firing for a in alerts}, sort_keys=True)


def load_state(cursor: str | None) -> dict[str, bool]:
    if not cursor:
        return {}
    try:
        state = json.loads(cursor)
    except ValueError:
        return {}
    return {str(k): bool(v) for k, v in state.items()} if isinstance(state, dict) else {}


# ---- notifiers --------------------------------------------------------------------------


class NotificationError(RuntimeError):
    """A notifier could not deliver; the message names where it tried."""


class Notifier(Protocol):
    def notify(self, alert: Alert) -> None: ...


def runbook_link(alert: Alert, base_url: str) -> str:
    return base_url.rstrip("/") + "/" + alert.runbook


def _json_value(value: object) -> object:
    return str(value) if isinstance(value, Decimal) else value


def alert_payload(alert: Alert, base_url: str) -> dict[str, object]:
    return {
        "alert": alert.name,
        "title": alert.title,
        "severity": alert.severity,
        "status": "firing" if alert.firing else "resolved",
        "summary": alert.summary,
        "value": _json_value(alert.value),
        "threshold": _json_value(alert.threshold),
        "runbook": runbook_link(alert, base_url),
        "details": {k: _json_value(v) for k, v in alert.details.items()},
        "sent_at": datetime.now(UTC).isoformat(),
    }


@dataclass
class LogNotifier:
    logger: logging.Logger | logging.LoggerAdapter
    runbook_base_url: str = "docs/runbooks/"

    def notify(self, alert: Alert) -> None:
        link = runbook_link(alert, self.runbook_base_url)
        if alert.firing:
            self.logger.warning(
                f"ALERT {alert.title} [{alert.severity}]: {alert.summary}; runbook {link}"
            )
        else:
            self.logger.info(f"RESOLVED {alert.title}: {alert.summary}")


@dataclass
class WebhookNotifier:
    url: str
    runbook_base_url: str = "docs/runbooks/"
    timeout_s: float = 5.0

    def notify(self, alert: Alert) -> None:
        body = json.dumps(alert_payload(alert, self.runbook_base_url)).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if not 200 <= response.status < 300:
                    raise NotificationError(f"webhook {self.url} answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise NotificationError(f"webhook {self.url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NotificationError(
                f"cannot deliver alert to webhook {self.url}: {reason}"
            ) from None


def notify_all(notifiers: Sequence[Notifier], alerts: Sequence[Alert]) -> list[str]:
    """Every alert to every notifier; a failing notifier does not stop the others."""
    errors = []
    for alert in alerts:
        for notifier in notifiers:
            try:
                notifier.notify(alert)
            except NotificationError as exc:
                errors.append(str(exc))
    return errors
