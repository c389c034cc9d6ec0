"""What billing_alerts_sensor keeps between ticks (its cursor): the state of each alert
that was last *delivered*, and when the lake last made progress.

Delivery is at least once: an alert whose notification failed (the webhook answered 500,
or was down) is not recorded as delivered, so the next tick sees the same transition and
sends it again, firing or resolved, until every notifier has taken it. A notifier that
did take it (the log) may then see it twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from billing_dagster.alerts import Alert, transitions
from billing_dagster.notifiers import NotificationError, Notifier


@dataclass(frozen=True)
class LakeProgress:
    """The lake's committed next offset per partition, and since when they are so."""

    marks: dict[int, int]
    since: datetime


def track_progress(
    previous: LakeProgress | None, marks: Mapping[int, int | None], lag: int, now: datetime
) -> LakeProgress:
    """The clock of "Ingest Stalled": restarted whenever the lake's offsets move or the
    lake has nothing left to read (a quiet topic is not a stalled one)."""
    current = {p: o for p, o in marks.items() if o is not None}
    if previous is None or lag == 0 or current != previous.marks:
        return LakeProgress(current, now)
    return previous


@dataclass(frozen=True)
class SensorState:
    #: Alert name -> the firing state its notifiers last all took.
    delivered: dict[str, bool] = field(default_factory=dict)
    progress: LakeProgress | None = None


def load_sensor_state(cursor: str | None) -> SensorState:
    """Also reads the older cursor, a flat {alert: firing}; anything unreadable is a
    fresh start (every firing alert is then sent once more)."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        return SensorState()
    if not isinstance(state, dict):
        return SensorState()
    if "delivered" not in state:
        return SensorState({str(k): v for k, v in state.items() if isinstance(v, bool)})
    progress = state.get("progress")
    return SensorState(
        {str(k): bool(v) for k, v in (state.get("delivered") or {}).items()},
        LakeProgress(
            {int(p): int(o) for p, o in progress["marks"].items()},
            datetime.fromisoformat(progress["since"]),
        )
        if progress
        else None,
    )


def dump_sensor_state(state: SensorState) -> str:
    progress = state.progress
    return json.dumps(
        {
            "delivered": dict(sorted(state.delivered.items())),
            "progress": None
            if progress is None
            else {
                "marks": {str(p): o for p, o in sorted(progress.marks.items())},
                "since": progress.since.isoformat(),
            },
        }
    )


def deliver(
    notifiers: Sequence[Notifier], delivered: Mapping[str, bool], alerts: Sequence[Alert]
) -> tuple[dict[str, bool], list[str]]:
    """Send every alert whose state differs from the one last delivered to every notifier.

    Returns the delivered state to keep, where an alert changes only once every notifier
    took it, and the delivery errors. Alerts not evaluated this time (their input was out
    of reach) keep what was delivered for them."""
    state = dict(delivered)
    errors: list[str] = []
    for alert in alerts:
        state.setdefault(alert.name, False)
    for alert in transitions(delivered, alerts):
        failures = []
        for notifier in notifiers:
            try:
                notifier.notify(alert)
            except NotificationError as exc:
                failures.append(str(exc))
        if failures:
            status = "firing" if alert.firing else "resolved"
            errors += [
                f"{e}; {alert.title} ({status}) stays pending, sent again next time"
                for e in failures
            ]
        else:
            state[alert.name] = alert.firing
    return state, errors
