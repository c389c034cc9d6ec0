"""Commands on the pipeline's state: where it stands (`status`) and the serving schema
(`migrate`). The domain logic lives in billing_dagster.operations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from billing_dagster.cli._common import kafka_client, lake_location
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    import dagster as dg


@click.command()
def migrate() -> None:
    """Apply pending serving-table migrations to BILLING_POSTGRES_URL (runs also start them)."""
    from billing_dagster.postgres_db import migrate as apply_migrations

    applied = apply_migrations(load_settings().postgres_url)
    click.echo(
        f"applied {', '.join(applied)}" if applied else "nothing to apply: schema is current"
    )


def _last_ingest_run(instance: dg.DagsterInstance) -> dict[str, object] | None:
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, INGEST_KINDS

    for run in instance.get_runs(limit=50):
        if run.tags.get(INGEST_CONCURRENCY_TAG) in INGEST_KINDS:
            record = instance.get_run_record_by_id(run.run_id)
            return {
                "run_id": run.run_id,
                "job": run.job_name,
                "status": run.status.value,
                "kind": run.tags[INGEST_CONCURRENCY_TAG],
                "lane": run.tags.get("billing/lane"),
                "partition": run.tags.get("dagster/partition"),
                "backfill": run.tags.get("dagster/backfill"),
                "updated_at": record.update_timestamp.isoformat() if record else None,
            }
    return None


@click.command()
@click.option("--topic", help="Default: BILLING_TOPIC.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(topic: str | None, as_json: bool) -> None:
    """Where the pipeline stands: per Kafka partition the end offset, the offset processed
    into the lake and the lag; the last ingest run; the last reconciliation."""
    import json
    import os

    from billing_dagster.cli.topics import resolve_key
    from billing_dagster.contract import RAW_TABLE
    from billing_dagster.delta_lake import committed_offsets
    from billing_dagster.lost_offsets import acknowledged_gaps
    from billing_dagster.operations import partition_status
    from billing_dagster.reconciliation import latest_reconciliation
    from billing_dagster.revenue_refresh import revenue_state
    from billing_dagster.serving import serving_marks

    settings = load_settings()
    lake = lake_location()
    with kafka_client(settings) as client:
        marks = client.watermarks(topic or settings.topic)  # an unknown topic is one clear error
        # The key its marks are kept under; a recreated topic not yet adopted is reported.
        topic, recreated = resolve_key(lake, client, topic or settings.topic)
    committed = committed_offsets(lake.open(RAW_TABLE), topic, list(marks))
    gaps = acknowledged_gaps(lake, topic)
    try:
        serving: dict[int, int] | None = serving_marks(settings.postgres_url, topic)
        serving_error = None
    except ServingUnavailableError as exc:
        serving, serving_error = None, str(exc)
    partitions = partition_status(marks, committed, serving)
    last_run, in_progress, refreshing = None, None, None
    if os.environ.get("DAGSTER_HOME"):
        from billing_dagster.backfills import dagster_instance
        from sensors.lane import ingest_runs_in_flight
        from sensors.revenue_refresh import refresh_runs_in_flight

        instance = dagster_instance()
        last_run = _last_ingest_run(instance)
        # Every run that ingests, however launched (a UI Materialize has no tag).
        in_progress = len(ingest_runs_in_flight(instance))
        refreshing = refresh_runs_in_flight(instance)
    recon = latest_reconciliation(lake)
    revenue = revenue_state(lake)
    report = {
        "topic": topic,
        "topic_recreated": recreated,
        "lag": sum(p.lag for p in partitions),
        # Deleted by retention before the lake read them, not acknowledged (in the lag).
        "lost_offsets": sum(p.lost[1] - p.lost[0] for p in partitions if p.lost),
        "partitions": [
            {
                "partition": p.partition,
                "end": p.end,
                "processed": p.processed,
                "lag": p.lag,
                "lake": p.lake,
                "serving": p.serving,
                "lost": list(p.lost) if p.lost else None,
            }
            for p in partitions
        ],
        "acknowledged_gaps": [g.to_json() for g in gaps],
        # Processed = in the lake and in Postgres; None here: Postgres unknown.
        "serving_unavailable": serving_error,
        "last_run": last_run,
        "ingest_runs_in_progress": in_progress,
        # The revenue aggregates against the lake (refreshed by refresh_revenue runs).
        "revenue": {
            "billing_events_version": revenue.current,
            "aggregates_version": revenue.reflected,
            "behind_since": revenue.behind_since.isoformat() if revenue.behind_since else None,
            "refresh_runs_in_progress": refreshing,
        },
        "last_reconciliation": None
        if recon is None
        else {
            "date": recon.day.isoformat(),
            "max_discrepancy_pct": str(recon.max_discrepancy_pct),
            "worst": recon.worst,
        },
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"topic {topic}: total lag {report['lag']:,} records")
    if recreated:
        click.echo(f"REFUSED: {recreated}")
    if serving_error:
        click.echo(f"Postgres out of reach, lag counts the lake only: {serving_error}")
    click.echo(
        f"{'partition':>9} {'end':>12} {'processed':>12} {'lag':>10} {'lake':>12} {'postgres':>12}"
    )

    def shown(offset: int | None) -> str:
        return "-" if offset is None else f"{offset:,}"

    for p in partitions:
        click.echo(
            f"{p.partition:>9} {p.end:>12,} {shown(p.processed):>12} {p.lag:>10,} "
            f"{shown(p.lake):>12} {shown(p.serving):>12}"
        )
    for p in partitions:
        if p.lost:
            click.echo(
                f"partition {p.partition}: offsets {p.lost[0]:,}-{p.lost[1]:,} were deleted by "
                "retention before processing; it waits for `billing-dagster topic "
                f"acknowledge-gap --partition {p.partition} --reason '...'`"
            )
    for g in gaps:
        click.echo(
            f"acknowledged gap: partition {g.partition} offsets {g.start:,}-{g.end:,} "
            f"({g.size:,} lost) by {g.acknowledged_by} at {g.acknowledged_at:%Y-%m-%d %H:%M} "
            f"UTC: {g.reason}"
        )
    if last_run is None:
        where = "" if os.environ.get("DAGSTER_HOME") else " (DAGSTER_HOME not set)"
        click.echo(f"last ingest run: none{where}")
    else:
        click.echo(
            f"last ingest run: {last_run['status']} {last_run['run_id'][:8]} "
            f"({last_run['kind']}, partition {last_run['partition']}) at {last_run['updated_at']}"
        )
    if in_progress:
        click.echo(f"ingest runs queued or running: {in_progress}")
    if revenue.behind_since is not None:
        click.echo(
            f"revenue aggregates: at billing_events version {revenue.reflected}, the lake is at "
            f"{revenue.current} (behind since {revenue.behind_since:%Y-%m-%d %H:%M:%S} UTC)"
            + (f"; refresh runs queued or running: {refreshing}" if refreshing else "")
        )
    elif revenue.current is not None:
        click.echo(f"revenue aggregates: current (billing_events version {revenue.current})")
    if recon is None:
        click.echo("last reconciliation: none")
    else:
        click.echo(
            f"last reconciliation: {recon.day} worst {recon.max_discrepancy_pct}% ({recon.worst})"
        )
