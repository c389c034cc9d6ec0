"""The revenue refresh, off the latency path: when to run it, what it judges, how late it is.

Ingest runs carry only the money (raw/, billing_events/, quarantine/, Postgres). The
aggregates follow in their own coalescing run (job `refresh_revenue`): a sensor requests
one when billing_events has a version the aggregates do not reflect and no refresh is in
flight, so however many batches the lanes commit meanwhile, one refresh takes them all.

Each refresh first judges the billing_events rows added since the version the aggregates
reflect (the Great Expectations suite, blocking), then merges exactly those: the merge
reads billing_events as of the version the check judged, whatever lands after it.

- `decide_refresh`, `revenue_refresh_alert`: pure decisions (the sensor's, the alert's);
- `revenue_state`: where the aggregates stand against billing_events, and since when;
- `judge_new_rows`, `refresh_to`, `checked_refresh`: what a refresh judges and merges.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from billing_dagster.aggregates import (
    AGGREGATE_TABLES,
    DEFAULT_ALLOWED_LATENESS,
    AggregateRefresh,
    reflected_version,
    refresh_aggregates,
    source_change,
)
from billing_dagster.alerts import Alert, FinishedRun
from billing_dagster.batch_check import POSITION
from billing_dagster.compaction import acknowledge_unchanged
from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.delta_lake import LakeLocation, partition_filter
from billing_dagster.quality import QualityReport, validate_frame
from billing_dagster.redaction import redact_text

#: The coalescing job and the value of its runs' `billing/ingest` tag.
REFRESH_JOB = "refresh_revenue"
REFRESH_KIND = "revenue"
#: "Revenue Refresh Failed" also fires when billing_events changed this long ago and the
#: aggregates still do not reflect it (a refresh normally follows within seconds).
REFRESH_LAG_ALERT_MINUTES = 5
#: The newest rows judged must have been ingested within this long of their commit.
FRESHNESS = timedelta(minutes=15)


# ---- pure decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshDecision:
    #: The billing_events version to request a refresh for; None: request nothing.
    version: int | None
    reason: str


def decide_refresh(
    current: int | None, reflected: int | None, in_flight: int, last_requested: int | None
) -> RefreshDecision:
    """One refresh run for everything billing_events holds beyond what the aggregates
    reflect. `current`: billing_events' version (None: no table yet); `reflected`: the
    version every aggregate reflects (None: not built); `in_flight`: refresh runs queued or
    running; `last_requested`: the sensor's cursor.

    Nothing while a refresh is in flight: what lands meanwhile waits for the next tick
    after it, which sees the aggregates behind again (coalescing, never starving). Nothing
    twice for one version: a refresh that failed is requested again when billing_events
    moves (its alert says so meanwhile), not on every tick."""
    if in_flight:
        return RefreshDecision(None, f"{in_flight} refresh run(s) queued or running")
    if current is None:
        return RefreshDecision(None, "no billing_events yet")
    if reflected is not None and reflected >= current:
        return RefreshDecision(None, f"aggregates reflect billing_events version {current}")
    if last_requested == current:
        return RefreshDecision(
            None, f"a refresh to billing_events version {current} was already requested"
        )
    return RefreshDecision(current, f"aggregates reflect {reflected}, billing_events is {current}")


@dataclass(frozen=True)
class RevenueState:
    """billing_events against the aggregates."""

    current: int | None
    reflected: int | None
    #: When the oldest billing_events file the aggregates do not reflect was written.
    behind_since: datetime | None = None


def revenue_refresh_alert(
    runs: Sequence[FinishedRun],
    state: RevenueState,
    *,
    now: datetime,
    lag_minutes: int = REFRESH_LAG_ALERT_MINUTES,
) -> Alert:
    """The last refresh run failed (no later success), or the aggregates have not
    reflected a billing_events commit for `lag_minutes`. `runs`: recent refresh runs."""
    failed = None
    for run in sorted(runs, key=lambda r: r.ended_at):
        failed = None if run.succeeded else run
    late = state.behind_since is not None and now - state.behind_since >= timedelta(
        minutes=lag_minutes
    )
    problems = []
    if failed is not None:
        problems.append(
            f"refresh run {failed.run_id} failed at {failed.ended_at:%Y-%m-%d %H:%M:%S} UTC: "
            f"{redact_text(failed.message) or 'no failure message'}"
        )
    if late and state.behind_since is not None:
        minutes = int((now - state.behind_since).total_seconds() // 60)
        problems.append(
            f"the aggregates reflect billing_events version {state.reflected}, the lake is at "
            f"{state.current}: {minutes} min behind (threshold {lag_minutes} min)"
        )
    return Alert(
        name="revenue_refresh_failed",
        title="Revenue Refresh Failed",
        severity="high",
        firing=bool(problems),
        summary="; ".join(problems)
        or f"revenue aggregates follow billing_events (version {state.reflected})",
        value=None if state.current is None else (state.current - (state.reflected or -1)),
        threshold=lag_minutes,
        runbook="revenue-refresh-failed.md",
        details={
            "failed_run": None if failed is None else failed.run_id,
            "billing_events_version": state.current,
            "aggregates_version": state.reflected,
            "behind_since": None if state.behind_since is None else state.behind_since.isoformat(),
        },
    )


# ---- where the aggregates stand ---------------------------------------------------------


def aggregates_reflect(lake: LakeLocation) -> int | None:
    """The billing_events version every aggregate table reflects (None: one is missing).
    hourly_revenue merges last, so this is its version: where the next refresh starts."""
    versions = [reflected_version(lake, target) for target in AGGREGATE_TABLES]
    return None if None in versions else min(v for v in versions if v is not None)


def _added_between(
    lake: LakeLocation, source: DeltaTable, files: Sequence[str]
) -> tuple[datetime, datetime] | None:
    """When the first and the last of `files` (full URIs, as source_change names them)
    were written, from the table's add actions (no log history: one snapshot's list)."""
    if not files:
        return None
    prefix = lake.table_uri(BILLING_EVENTS_TABLE).rstrip("/") + "/"
    times = (
        pl.DataFrame(source.get_add_actions(flatten=True))
        .filter(pl.col("path").is_in([f.removeprefix(prefix) for f in files]))
        .get_column("modification_time")
    )
    if times.is_empty():
        return None
    return _at(int(times.min())), _at(int(times.max()))  # type: ignore[arg-type]


def _at(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def revenue_state(lake: LakeLocation, *, with_lag: bool = True) -> RevenueState:
    """Versions of billing_events and of the aggregates; with `with_lag`, when the oldest
    file they do not reflect was written (the file diff a refresh makes)."""
    source = lake.open(BILLING_EVENTS_TABLE)
    if source is None:
        return RevenueState(None, None)
    current, reflected = source.version(), aggregates_reflect(lake)
    if not with_lag or (reflected is not None and reflected >= current):
        return RevenueState(current, reflected)
    added = _added_between(lake, source, source_change(lake, source, reflected).new_files)
    return RevenueState(current, reflected, added[0] if added else None)


# ---- what a refresh judges and merges -------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """The billing_events rows added after `since` up to `version`, with every other row
    of their event hours that repeats an event_id or a Kafka position."""

    since: int | None
    version: int | None
    rows: pl.DataFrame
    #: When the newest file of those rows was written (None: no rows were added).
    newest_append_at: datetime | None = None

    def parameters(self, supported_currencies: Sequence[str]) -> dict[str, object]:
        """The billing_events suite's parameters: freshness only when rows were added,
        judged against when their newest file was written (not the clock: a refresh may
        run late; a file compaction rewrote, with old rows, is acknowledged, not judged)."""
        parameters: dict[str, object] = {"supported_currencies": list(supported_currencies)}
        if self.newest_append_at is not None and self.rows.height:
            parameters["freshness_floor"] = self.newest_append_at - FRESHNESS
        return parameters

    def hours(self) -> list[str]:
        hours = self.rows.select(EVENT_HOUR_PARTITIONS).unique().sort(EVENT_HOUR_PARTITIONS)
        return [f"{y:04d}-{m:02d}-{d:02d}-{h:02d}:00" for y, m, d, h in hours.iter_rows()]


_HOUR_PATH = re.compile(r"year=(\d+)/month=(\d+)/day=(\d+)/hour=(\d+)/")


def _judged_rows(lake: LakeLocation, version: int, new_files: Sequence[str]) -> pl.DataFrame:
    """The rows of `new_files`, then every other row of their event hours (as of
    `version`) sharing an event_id or a Kafka position with another row there: the
    aggregates recompute those hours, so a second row for any event matters."""
    hours = {tuple(int(v) for v in m.groups()) for f in new_files if (m := _HOUR_PATH.search(f))}
    if not hours:
        return pl.DataFrame(schema=BILLING_EVENTS_SCHEMA)
    options = lake.storage_options or None
    new = pl.read_parquet(list(new_files), columns=list(POSITION), storage_options=options).lazy()
    rows = pl.scan_delta(
        lake.table_uri(BILLING_EVENTS_TABLE), version=version, storage_options=options
    ).filter(partition_filter(EVENT_HOUR_PARTITIONS, sorted(hours)))
    own = rows.join(new, on=POSITION, how="semi").collect()
    repeated_ids = rows.group_by("event_id").len().filter(pl.col("len") > 1).collect()["event_id"]
    repeated_positions = (
        rows.group_by(POSITION).len().filter(pl.col("len") > 1).drop("len").collect()
    )
    suspects = pl.concat([own["event_id"], repeated_ids]).unique().implode()
    others = rows.join(new, on=POSITION, how="anti")
    twins = others.filter(pl.col("event_id").is_in(suspects)).collect()
    if repeated_positions.height:
        same_position = others.join(repeated_positions.lazy(), on=POSITION, how="semi")
        twins = pl.concat(
            [twins, same_position.filter(~pl.col("event_id").is_in(suspects)).collect()]
        )
    return pl.concat([own, twins])


def judge_new_rows(lake: LakeLocation) -> Judgement:
    """What the next refresh would merge: billing_events' current version against the one
    the aggregates reflect (the same file diff the refresh makes, source_change)."""
    source = lake.open(BILLING_EVENTS_TABLE)
    if source is None:
        return Judgement(None, None, pl.DataFrame(schema=BILLING_EVENTS_SCHEMA))
    since, version = aggregates_reflect(lake), source.version()
    if since is not None and since >= version:
        return Judgement(since, version, pl.DataFrame(schema=BILLING_EVENTS_SCHEMA))
    change = source_change(lake, source, since)
    added = _added_between(lake, source, change.new_files)
    return Judgement(
        change.from_version,
        version,
        _judged_rows(lake, version, change.new_files),
        added[1] if added else None,
    )


@dataclass(frozen=True)
class _BillingEventsAsOf(LakeLocation):
    """The lake with billing_events opened as of `version` (every other table current):
    refresh_aggregates then merges exactly what was judged, whatever lanes commit since."""

    version: int = 0

    def open(self, name: str) -> DeltaTable | None:
        if name != BILLING_EVENTS_TABLE:
            return super().open(name)
        try:
            return DeltaTable(
                self.table_uri(name),
                version=self.version,
                storage_options=self.storage_options or None,
            )
        except TableNotFoundError:
            return None


def refresh_to(
    lake: LakeLocation,
    version: int | None,
    *,
    allowed_lateness: timedelta = DEFAULT_ALLOWED_LATENESS,
    now: datetime | None = None,
) -> AggregateRefresh:
    """Bring the aggregates up to billing_events `version` (None: the current one), never
    back: a version they already reflect or passed changes nothing. Versions that changed
    no row (empty batch commits) are recorded as reflected, so they never look pending."""
    reflected = aggregates_reflect(lake)
    if version is not None and reflected is not None and reflected >= version:
        return AggregateRefresh(reflected, (), 0, 0)
    view = (
        lake
        if version is None
        else _BillingEventsAsOf(lake.root, dict(lake.storage_options), version=version)
    )
    refresh = refresh_aggregates(view, allowed_lateness=allowed_lateness, now=now)
    if refresh.source_version is not None and not refresh.days:
        acknowledge_unchanged(lake, refresh.source_version)
    return refresh


@dataclass(frozen=True)
class CheckedRefresh:
    judgement: Judgement
    report: QualityReport
    #: None: the check failed and the aggregates were left where they were.
    refresh: AggregateRefresh | None

    def held(self) -> str:
        """Why the aggregates were not refreshed (for a log line or a failure)."""
        failed = "; ".join(f.line() for f in self.report.failed)
        return (
            f"billing_events rows after version {self.judgement.since} (up to "
            f"{self.judgement.version}) fail expectations/billing_events.json: {failed}; the "
            "revenue aggregates stay where they are until billing_events is fixed"
        )


def checked_refresh(
    lake: LakeLocation,
    *,
    supported_currencies: Sequence[str],
    allowed_lateness: timedelta = DEFAULT_ALLOWED_LATENESS,
    now: datetime | None = None,
) -> CheckedRefresh:
    """Judge the new rows, then merge exactly them if they pass: for the refreshes that run
    inside other jobs (reconciliation, compaction), so no path merges unjudged rows."""
    judgement = judge_new_rows(lake)
    report = validate_frame(
        judgement.rows, "billing_events", parameters=judgement.parameters(supported_currencies)
    )
    if not report.success:
        return CheckedRefresh(judgement, report, None)
    refresh = refresh_to(lake, judgement.version, allowed_lateness=allowed_lateness, now=now)
    return CheckedRefresh(judgement, report, refresh)
