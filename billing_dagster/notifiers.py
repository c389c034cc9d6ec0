"""Where alerts go: the Dagster log and an optional webhook (JSON with a runbook link).

A notifier raises NotificationError when it cannot deliver; the message names where it
tried, redacted (a webhook's token is often its path). Delivery is retried by the alerts
sensor until it goes through (alert_state.py).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from billing_dagster.alerts import Alert
from billing_dagster.redaction import redact_text, redacted


class NotificationError(RuntimeError):
    """A notifier could not deliver; the message names where it tried, redacted."""


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
    #: Often holds a token (in its path or query): never printed, not even in a repr.
    url: str = field(repr=False)
    runbook_base_url: str = "docs/runbooks/"
    timeout_s: float = 5.0

    def notify(self, alert: Alert) -> None:
        shown = redacted(self.url)
        body = json.dumps(alert_payload(alert, self.runbook_base_url)).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if not 200 <= response.status < 300:
                    raise NotificationError(f"webhook {shown} answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise NotificationError(f"webhook {shown} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = redact_text(str(getattr(exc, "reason", exc)))
            raise NotificationError(f"cannot deliver alert to webhook {shown}: {reason}") from None


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
