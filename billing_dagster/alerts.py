"""The reference design's alerts: pure conditions and a connector probe (notifiers.py
sends them).

Conditions take measured values and return an `Alert`, firing or not. Notification happens
on transitions only (an alert starts firing, or resolves), so a sensor evaluating every few
seconds does not page anyone twice for the same incident.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from billing_dagster.connector_probe import ConnectorStatus
from billing_dagster.redaction import redact_text


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


def consumer_lag_alert(
    lag_by_partition: Mapping[int, int],
    threshold: int = 10_000,
    *,
    lost: Mapping[int, tuple[int, int]] | None = None,
    acknowledged_gaps: int = 0,
) -> Alert:
    """`lost`: {partition: (lake mark, low watermark)}, offsets retention deleted before
    the lake read them (not in the lag: they can never be read); `acknowledged_gaps`:
    offsets an operator acknowledged as lost, ever."""
    total = sum(lag_by_partition.values())
    worst = sorted(lag_by_partition.items(), key=lambda item: -item[1])[:5]
    lost_count = sum(low - mark for mark, low in (lost or {}).values())
    summary = f"consumer lag {total:,} records (threshold {threshold:,})"
    if lost_count:
        summary += f"; {lost_count:,} offsets lost to retention, not acknowledged"
    if acknowledged_gaps:
        summary += f"; {acknowledged_gaps:,} lost offsets acknowledged"
    return Alert(
        name="consumer_lag",
        title="High Billing Event Lag",
        severity="critical",
        firing=total > threshold,
        summary=summary,
        value=total,
        threshold=threshold,
        runbook="consumer-lag.md",
        details={
            "worst_partitions": {str(p): lag for p, lag in worst if lag},
            "lost_offsets": {str(p): f"{m}-{low}" for p, (m, low) in sorted((lost or {}).items())},
            "acknowledged_gap_offsets": acknowledged_gaps,
        },
    )


def offsets_lost_alert(lost: Mapping[int, tuple[int, int]], *, topic: str) -> Alert:
    """Fires while a partition has offsets retention deleted before the lake read them and
    no operator has acknowledged (`lost`: {partition: (lake mark, low watermark)}): that
    partition is not processed until then."""
    ranges = ", ".join(f"{p}:{m}-{low}" for p, (m, low) in sorted(lost.items()))
    count = sum(low - m for m, low in lost.values())
    return Alert(
        name="offsets_lost",
        title="Offsets Lost",
        severity="critical",
        firing=bool(lost),
        summary=(
            f"{count:,} offsets of {topic} deleted by retention before processing, on "
            f"partitions (partition:from-to) {ranges}; those partitions are stopped until "
            "the loss is acknowledged"
            if lost
            else f"every partition of {topic} is readable from the lake's marks"
        ),
        value=count,
        threshold=0,
        runbook="offsets-lost.md",
        details={"lost": ranges, "partitions": sorted(lost)},
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


@dataclass(frozen=True)
class FinishedRun:
    """A finished run of the ingest lane, as "Ingest Run Failed" sees it."""

    run_id: str
    #: "ingest" for every run that ingests offsets (the sensor's, a replay, a UI
    #: Materialize); else the lane's other kinds: reconcile, invariants, maintenance.
    kind: str
    succeeded: bool
    ended_at: datetime
    #: Why it failed, first line ("" for a success).
    message: str = ""


def ingest_run_failed_alert(
    runs: Sequence[FinishedRun], *, now: datetime, window_minutes: int
) -> Alert:
    """A run of the lane failed in the last `window_minutes` and no later success of the
    same kind covers it: a later ingest run starts at the lake's offsets, so it takes
    what a failed one left; a later reconciliation redoes the day."""
    recent = [r for r in runs if r.ended_at >= now - timedelta(minutes=window_minutes)]

    def covered(failure: FinishedRun) -> bool:
        return any(
            r.succeeded and r.kind == failure.kind and r.ended_at > failure.ended_at for r in recent
        )

    failed = sorted(
        (r for r in recent if not r.succeeded and not covered(r)),
        key=lambda r: r.ended_at,
        reverse=True,
    )
    if failed:
        last = failed[0]
        others = f" ({len(failed) - 1} more uncovered failure(s))" if len(failed) > 1 else ""
        summary = (
            f"{last.kind} run {last.run_id} failed at {last.ended_at:%Y-%m-%d %H:%M:%S} UTC: "
            f"{redact_text(last.message) or 'no failure message'}{others}"
        )
    else:
        summary = f"no ingest lane failure without a later success in {window_minutes} min"
    return Alert(
        name="ingest_run_failed",
        title="Ingest Run Failed",
        severity="high",
        firing=bool(failed),
        summary=summary,
        value=len(failed),
        threshold=0,
        runbook="ingest-run-failed.md",
        details={
            "failed_runs": [
                {
                    "run_id": f.run_id,
                    "kind": f.kind,
                    "ended_at": f.ended_at.isoformat(),
                    "message": redact_text(f.message),
                }
                for f in failed[:10]
            ]
        },
    )


def ingest_stalled_alert(
    lag: int, progress_at: datetime, *, now: datetime, stall_minutes: int
) -> Alert:
    """No committed lake progress for `stall_minutes` while `lag` records wait.
    `progress_at`: when the lake's offsets last moved or it last had nothing to read
    (alert_state.track_progress), so a quiet topic never counts as stalled."""
    idle_minutes = int((now - progress_at).total_seconds() // 60)
    firing = lag > 0 and now - progress_at >= timedelta(minutes=stall_minutes)
    if firing:
        summary = (
            f"no ingest progress into the lake for {idle_minutes} min with {lag:,} records "
            f"waiting (threshold {stall_minutes} min)"
        )
    else:
        summary = f"ingest progressing: {lag:,} records waiting, lake moved {idle_minutes} min ago"
    return Alert(
        name="ingest_stalled",
        title="Ingest Stalled",
        severity="critical",
        firing=firing,
        summary=summary,
        value=idle_minutes,
        threshold=stall_minutes,
        runbook="ingest-stalled.md",
        details={"lag": lag, "last_progress_at": progress_at.isoformat()},
    )


def circuit_breaker_alert(held: Mapping[str, str]) -> Alert:
    """`held`: ingest runs the circuit breaker held with no successful ingest run since,
    run id -> what tripped it (`circuit_breaker.open_holds`). Their batches are in no
    store until the cause is fixed or an operator releases them."""
    shown = "; ".join(f"run {run_id[:8]}: {what}" for run_id, what in held.items())
    return Alert(
        name="ingest_circuit_breaker",
        title="Ingest Circuit Breaker Open",
        severity="critical",
        firing=bool(held),
        summary=(
            f"ingest batch held by the circuit breaker, nothing of it committed ({shown})"
            if held
            else "no ingest batch held by the circuit breaker"
        ),
        value=len(held),
        threshold=0,
        runbook="ingest-circuit-breaker.md",
        details={"held_runs": dict(held)},
    )


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
