"""`reference`: the reference tables (customers, subscriptions, FX rates) cleaning enriches from."""

from __future__ import annotations

from pathlib import Path

import click

from billing_dagster.cli._common import lake_location


@click.group()
def reference() -> None:
    """Reference tables the cleaning step enriches from (reference/ in the lake)."""


@reference.command("load")
@click.option(
    "--customers",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: customer_id,customer_tier",
)
@click.option(
    "--subscriptions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: subscription_id,customer_id,plan,started_at (ISO-8601)",
)
@click.option(
    "--fx-rates",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: rate_date,currency,usd_rate (USD per unit)",
)
def reference_load(customers: Path, subscriptions: Path, fx_rates: Path) -> None:
    """Replace the reference tables with these CSV files (all three, atomically per table)."""
    from billing_dagster.enrichment import read_reference_csv, write_reference_data

    data = read_reference_csv(customers, subscriptions, fx_rates)
    versions = write_reference_data(lake_location(), data)
    click.echo(
        f"loaded {data.customers.height} customers, {data.subscriptions.height} subscriptions, "
        f"{data.fx_rates.height} FX rates (table versions {versions})"
    )


@reference.command("demo")
@click.option(
    "--customers",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    help="How many synthetic customers (as `produce` generates).",
)
def reference_demo(customers: int) -> None:
    """Reference data matching `produce`: every synthetic customer, rates for +-30 days."""
    from billing_dagster.enrichment import write_reference_data
    from billing_dagster.synthetic import SyntheticBillingStream

    data = SyntheticBillingStream(customers=customers).reference_data()
    write_reference_data(lake_location(), data)
    click.echo(f"wrote {data.customers.height} customers and {data.fx_rates.height} FX rates")
