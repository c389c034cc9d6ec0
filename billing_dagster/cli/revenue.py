"""Commands on the revenue figures: refresh the aggregates, reconcile a day, report a month."""

from __future__ import annotations

import sys
from datetime import date
from typing import TYPE_CHECKING

import click

from billing_dagster.cli._common import kafka_client, lake_location
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    from resources.analytics import RevenueAnalyticsResource


def _date(ctx: click.Context, param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"must be a date like 2024-12-15, got '{value}'") from None


def _analytics() -> RevenueAnalyticsResource:
    # Imported here: the Dagster definitions are slow to import and `--help` needs none.
    from billing_dagster.definitions import build_resources

    return build_resources(load_settings())["analytics"]


@click.command()
def aggregate() -> None:
    """Bring hourly_revenue, daily_revenue and customer_metrics up to billing_events now,
    without the Great Expectations check (the refresh_revenue job does this, checked,
    seconds after each batch; useful after repairing the lake)."""
    from billing_dagster.aggregates import refresh_aggregates

    refresh = refresh_aggregates(lake_location(), allowed_lateness=_analytics().allowed_lateness())
    if not refresh.changed:
        click.echo("aggregates are current")
        return
    days = ", ".join(d.isoformat() for d in refresh.days)
    click.echo(
        f"recomputed {len(refresh.days)} day(s) ({days}) to billing_events version "
        f"{refresh.source_version}; {refresh.late_events} late events absorbed"
    )


@click.command()
@click.option(
    "--date",
    "day",
    required=True,
    callback=_date,
    help="The event-time day (UTC) to reconcile, e.g. 2024-12-15.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reconcile(day: date, as_json: bool) -> None:
    """Reconcile one day's real-time revenue against the raw lake, and check Postgres
    against the lake (balances = history, the day's history = billing_events, marks);
    exit 1 on a mismatch or a broken invariant. Results replace the day's rows in
    reconciliation/daily and reconciliation/discrepancies."""
    import json

    from billing_dagster.enrichment import load_reference_data
    from billing_dagster.invariants import check_all
    from billing_dagster.reconciliation import reconcile_day, write_reconciliation

    settings = load_settings()
    lake = lake_location()
    result = reconcile_day(
        lake, day, load_reference_data(lake), tolerance_pct=_analytics().tolerance_pct()
    )
    write_reconciliation(lake, result)
    from billing_dagster.topic_identity import current_generation

    with kafka_client(settings) as client:
        partitions = sorted(client.end_offsets(settings.topic))
    # The marks are kept under the topic's current generation key (topic_identity.py).
    generation = current_generation(lake, settings.topic)
    key = generation.key if generation else settings.topic
    invariants = check_all(settings.postgres_url, lake, key, partitions, [day])
    broken = [i for i in invariants if not i.ok]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "date": day.isoformat(),
                    **result.metadata(),
                    "invariants": [
                        {"name": i.name, "ok": i.ok, "summary": i.summary, "offending": i.details}
                        for i in invariants
                    ],
                },
                indent=2,
                default=str,
            )
        )
    else:
        for row in result.summary.iter_rows(named=True):
            pct = row["discrepancy_pct"]
            click.echo(
                f"{row['scope']:<9} {row['key']:<4} realtime {row['realtime_net']:>16} "
                f"batch {row['batch_net']:>16}  "
                + ("unbounded" if pct is None else f"{pct:.3f}%")
                + ("" if row["within_tolerance"] else "  BEYOND TOLERANCE")
            )
        events = result.metadata()["differing_events"]
        click.echo(
            f"{day}: {result.status}"
            + (f"; differing events: {', '.join(events)}" if events else "")
        )
        for invariant in invariants:
            click.echo(
                f"{'ok' if invariant.ok else 'BROKEN':<6} {invariant.name}: {invariant.summary}"
            )
    if result.status == "mismatch" or broken:
        sys.exit(1)


@click.command()
@click.option("--month", required=True, help="The month, e.g. 2024-12.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(month: str, as_json: bool) -> None:
    """The month-end reconciliation report (also written to reconciliation/monthly)."""
    from billing_dagster.enrichment import load_reference_data
    from billing_dagster.monthly_report import monthly_report, parse_month, write_monthly_report

    try:
        first_day = parse_month(month)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    lake = lake_location()
    result = monthly_report(
        lake, first_day, load_reference_data(lake), tolerance_pct=_analytics().tolerance_pct()
    )
    write_monthly_report(lake, result)
    click.echo(result.to_json() if as_json else result.to_text())
