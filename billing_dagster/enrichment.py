"""Enrichment from the reference tables: customer tier, subscription plan, USD amount.

Reference tables live in the lake (reference/customers, reference/subscriptions,
reference/fx_rates), are loaded once per run, and their Delta versions are recorded so
any billing_events row can be traced to the reference data that enriched it.

amount_usd = amount x usd_rate, computed on exact integers (cents x rate in 1e-8 units)
and rounded half away from zero to the cent, the commercial rounding finance expects
(1.005 USD becomes 1.01, -1.005 becomes -1.01). USD needs no rate (1 exactly); every
other currency needs a rate for the event's UTC date.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl

from billing_dagster.contract import (
    CUSTOMERS_SCHEMA,
    CUSTOMERS_TABLE,
    FX_RATE,
    FX_RATES_SCHEMA,
    FX_RATES_TABLE,
    MONEY,
    SUBSCRIPTIONS_SCHEMA,
    SUBSCRIPTIONS_TABLE,
)
from billing_dagster.delta_lake import LakeLocation

BASE_CURRENCY = "USD"
_RATE_UNITS = 10**8  # usd_rate has eight fraction digits
_MONEY_LIMIT = 10**12  # decimal(12,2) holds fewer than 10**12 cents


class ReferenceDataError(RuntimeError):
    """Reference tables are missing or unreadable; the message says which and how to load."""


@dataclass(frozen=True)
class ReferenceData:
    customers: pl.DataFrame
    subscriptions: pl.DataFrame
    fx_rates: pl.DataFrame
    versions: Mapping[str, int] | None = None

    @classmethod
    def of(
        cls,
        customers: pl.DataFrame,
        subscriptions: pl.DataFrame,
        fx_rates: pl.DataFrame,
        versions: Mapping[str, int] | None = None,
    ) -> ReferenceData:
        return cls(
            customers=_conform(customers, CUSTOMERS_SCHEMA).unique("customer_id", keep="last"),
            subscriptions=_conform(subscriptions, SUBSCRIPTIONS_SCHEMA).sort("started_at"),
            fx_rates=_conform(fx_rates, FX_RATES_SCHEMA).unique(
                ["rate_date", "currency"], keep="last"
            ),
            versions=versions,
        )


def _conform(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def usd_amount(amount: pl.Expr, usd_rate: pl.Expr) -> pl.Expr:
    """Exact amount x rate, half away from zero to the cent; null if it overflows (12,2)."""
    cents = (amount * 100).cast(pl.Int64).cast(pl.Int128)
    rate = (usd_rate * _RATE_UNITS).cast(pl.Int64).cast(pl.Int128)
    product = cents * rate  # in units of 1e-10 USD
    half = _RATE_UNITS // 2
    rounded = (product.abs() + half) // _RATE_UNITS
    signed = pl.when(product < 0).then(pl.lit(0, dtype=pl.Int128) - rounded).otherwise(rounded)
    return (
        pl.when(signed.abs() < _MONEY_LIMIT)
        .then(signed.cast(pl.Decimal(38, 0)) * pl.lit(Decimal("0.01"), dtype=pl.Decimal(3, 2)))
        .cast(MONEY)
    )


def usd_amount_of(amount: Decimal, usd_rate: Decimal) -> Decimal:
    """The same rounding on Python Decimals (tests and reports check the frame with it)."""
    from decimal import ROUND_HALF_UP

    return (amount * usd_rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def enrich(events: pl.DataFrame, reference: ReferenceData) -> pl.DataFrame:
    """Add customer_tier, subscription_plan, usd_rate and amount_usd (nulls where the
    reference data has no answer; the `reference:` rules turn those into reasons)."""
    ordered = events.with_row_index("_enrich_order")
    with_tier = ordered.join(reference.customers, on="customer_id", how="left")
    # The plan in force when the event happened: the customer's latest subscription
    # started at or before created_at.
    plans = reference.subscriptions.select(
        "customer_id", "started_at", pl.col("plan").alias("subscription_plan")
    )
    with_plan = with_tier.sort("created_at").join_asof(
        plans,
        left_on="created_at",
        right_on="started_at",
        by="customer_id",
        strategy="backward",
        check_sortedness=False,
    )
    rates = reference.fx_rates.rename({"rate_date": "_rate_date"})
    enriched = (
        with_plan.with_columns(_rate_date=pl.col("created_at").dt.date())
        .join(rates, on=["_rate_date", "currency"], how="left")
        .with_columns(
            usd_rate=pl.when(pl.col("currency") == BASE_CURRENCY)
            .then(pl.lit(Decimal("1"), dtype=FX_RATE))
            .otherwise(pl.col("usd_rate"))
        )
        .with_columns(amount_usd=usd_amount(pl.col("amount"), pl.col("usd_rate")))
    )
    return enriched.sort("_enrich_order").drop("_enrich_order", "_rate_date", "started_at")


# ---- storage in the lake ----------------------------------------------------------


REFERENCE_TABLES = {
    CUSTOMERS_TABLE: CUSTOMERS_SCHEMA,
    SUBSCRIPTIONS_TABLE: SUBSCRIPTIONS_SCHEMA,
    FX_RATES_TABLE: FX_RATES_SCHEMA,
}


def load_reference_data(lake: LakeLocation) -> ReferenceData:
    frames: dict[str, pl.DataFrame] = {}
    versions: dict[str, int] = {}
    for name in REFERENCE_TABLES:
        table = lake.open(name)
        if table is None:
            raise ReferenceDataError(
                f"reference table {lake.table_uri(name)} does not exist; load it with "
                "`billing-dagster reference load` (or `billing-dagster reference demo`)"
            )
        versions[name] = table.version()
        frames[name] = pl.read_delta(
            lake.table_uri(name), storage_options=lake.storage_options or None
        )
    return ReferenceData.of(
        frames[CUSTOMERS_TABLE], frames[SUBSCRIPTIONS_TABLE], frames[FX_RATES_TABLE], versions
    )


def write_reference_data(lake: LakeLocation, reference: ReferenceData) -> dict[str, int]:
    """Replace the reference tables (overwrite: they are small, complete snapshots)."""
    from deltalake import write_deltalake

    frames = {
        CUSTOMERS_TABLE: reference.customers,
        SUBSCRIPTIONS_TABLE: reference.subscriptions,
        FX_RATES_TABLE: reference.fx_rates,
    }
    versions = {}
    for name, frame in frames.items():
        write_deltalake(
            lake.table_uri(name),
            frame.to_arrow(),
            mode="overwrite",
            schema_mode="overwrite",
            storage_options=lake.storage_options or None,
        )
        table = lake.open(name)
        versions[name] = table.version() if table is not None else -1
    return versions


def read_reference_csv(customers: Path, subscriptions: Path, fx_rates: Path) -> ReferenceData:
    """Reference tables from CSV; decimals are read as text and cast exactly."""
    frames = []
    for path, schema in (
        (customers, CUSTOMERS_SCHEMA),
        (subscriptions, SUBSCRIPTIONS_SCHEMA),
        (fx_rates, FX_RATES_SCHEMA),
    ):
        try:
            raw = pl.read_csv(path, infer_schema=False)
            missing = [c for c in schema if c not in raw.columns]
            if missing:
                raise ReferenceDataError(f"{path}: missing columns {', '.join(missing)}")
            typed = []
            for name, dtype in schema.items():
                column = pl.col(name).str.strip_chars()
                if isinstance(dtype, pl.Datetime):
                    column = column.str.to_datetime(time_zone="UTC", time_unit="us")
                elif isinstance(dtype, pl.Date):
                    column = column.str.to_date()
                else:
                    column = column.cast(dtype)
                typed.append(column.alias(name))
            frames.append(raw.select(typed))
        except pl.exceptions.PolarsError as exc:
            raise ReferenceDataError(f"{path}: {str(exc).splitlines()[0]}") from None
    return ReferenceData.of(*frames)


# ---- demo and test reference data ----------------------------------------------------

#: Illustrative USD rates (USD per unit); the demo's daily rates wobble around them.
DEMO_BASE_RATES: dict[str, Decimal] = {
    "EUR": Decimal("1.08345000"),
    "GBP": Decimal("1.26750000"),
    "CAD": Decimal("0.73120000"),
    "AUD": Decimal("0.65870000"),
    "JPY": Decimal("0.00667000"),
    "CHF": Decimal("1.12940000"),
}
TIERS = ("standard", "growth", "enterprise")


def demo_reference_data(
    customer_ids: Iterable[int],
    *,
    first_day: date,
    days: int,
    plans: Iterable[str] = ("starter", "pro", "enterprise"),
    subscribed_since: datetime | None = None,
) -> ReferenceData:
    """Every customer with a tier and a plan, and a rate per currency per day."""
    ids = sorted(set(customer_ids))
    plan_names = list(plans)
    since = subscribed_since or datetime.combine(first_day, datetime.min.time())
    customers = pl.DataFrame(
        {"customer_id": ids, "customer_tier": [TIERS[i % len(TIERS)] for i in ids]}
    )
    subscriptions = pl.DataFrame(
        {
            "subscription_id": [f"sub-{i}" for i in ids],
            "customer_id": ids,
            "plan": [plan_names[i % len(plan_names)] for i in ids],
            "started_at": [since] * len(ids),
        }
    ).with_columns(pl.col("started_at").dt.replace_time_zone("UTC"))
    rows = []
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        for currency, base in DEMO_BASE_RATES.items():
            wobble = Decimal(((offset * 7 + len(currency)) % 11) - 5) / Decimal(10_000)
            rows.append((day, currency, (base * (1 + wobble)).quantize(Decimal("0.00000001"))))
    fx_rates = pl.DataFrame(
        rows,
        schema={"rate_date": pl.Date, "currency": pl.String, "usd_rate": FX_RATE},
        orient="row",
    )
    return ReferenceData.of(customers, subscriptions, fx_rates)
