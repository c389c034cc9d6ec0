"""Is the CDC connector running? One GET of Kafka Connect's status endpoint (or a
health endpoint answering {"status": "UP"}), reduced to a state the alert can judge."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from billing_dagster.redaction import redact_text, redacted


@dataclass(frozen=True)
class ConnectorStatus:
    #: RUNNING, FAILED, PAUSED, UNASSIGNED, DOWN or UNREACHABLE.
    state: str
    detail: str = ""


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""


def probe_connector(url: str, timeout_s: float = 5.0) -> ConnectorStatus:
    """Kafka Connect `/connectors/<name>/status` or Debezium Server `/q/health`; never
    raises for an unreachable or unreadable endpoint. Details name the URL redacted."""
    shown = redacted(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # Quarkus health answers DOWN with 503 and a JSON body
            try:
                body = json.loads(exc.read())
            except ValueError:
                return ConnectorStatus("UNREACHABLE", f"HTTP 503 from {shown}")
        else:
            return ConnectorStatus("UNREACHABLE", f"HTTP {exc.code} from {shown}")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return ConnectorStatus("UNREACHABLE", f"{shown}: {redact_text(str(reason))}")
    except ValueError:
        return ConnectorStatus("UNREACHABLE", f"{shown} did not answer JSON")
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
    return ConnectorStatus("UNREACHABLE", f"{shown} answered JSON that is not a connector status")
