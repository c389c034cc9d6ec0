"""The month-end reconciliation report: one pass over a month of the lake.

Totals per currency (real-time aggregates against the batch recomputation from raw/), the
days reconciled and those that did not, every discrepancy row recorded for the month, and
what quarantine/ rejected, by rule. Replaces the three days of spreadsheets.
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import polars as pl

from billing_dagster.aggregates import DAILY_REVENUE
from billing_dagster.contract import (
    DISCREPANCIES_TABLE,
    MONEY_TOTAL,
    MONTHLY_REPORT_TABLE,
    QUARANTINE_TABLE,
    RECONCILIATION_TABLE,
)
from billing_dagster.delta_lake import LakeLocation, replace_partition, scan_table
from billing_dagster.enrichment import ReferenceData
from billing_dagster.reconciliation import (
    DEFAULT_TOLERANCE_PCT,
    PCT,
    batch_events,
    batch_totals_by_currency,
    compare,
)

MONTHLY_REPORT_SCHEMA: dict[str, pl.DataType] = {
    "report_month": pl.String(),
    "currency": pl.String(),
    "realtime_revenue": MONEY_TOTAL,
    "batch_revenue": MONEY_TOTAL,
    "realtime_net": MONEY_TOTAL,
    "batch_net": MONEY_TOTAL,
    "realtime_count": pl.Int64(),
    "batch_count": pl.Int64(),
    "discrepancy_pct": PCT,
    "within_tolerance": pl.Boolean(),
    "generated_at": pl.Datetime("us", "UTC"),
    "year": pl.Int32(),
    "month": pl.Int32(),
}


def parse_month(text: str) -> date:
    """'2024-12' -> date(2024, 12, 1); a ValueError naming the expected form otherwise."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m").date()
    except ValueError:
        raise ValueError(f"month must look like 2024-12, got '{text}'") from None


def days_of(month: date) -> list[date]:
    last = calendar.monthrange(month.year, month.month)[1]
    return [month.replace(day=d) for d in range(1, last + 1)]


@dataclass(frozen=True)
class MonthlyReport:
    month: date
    tolerance_pct: Decimal
    currencies: pl.DataFrame
    days_with_events: int
    days_reconciled: int
    days_beyond_tolerance: tuple[date, ...]
    days_not_reconciled: tuple[date, ...]
    discrepancy_rows: int
    quarantined: int
    quarantined_by_rule: dict[str, int]

    @property
    def within_tolerance(self) -> bool:
        return bool(self.currencies["within_tolerance"].all()) and not self.days_beyond_tolerance

    def to_dict(self) -> dict[str, object]:
        return {
            "month": self.month.strftime("%Y-%m"),
            "status": "reconciled" if self.within_tolerance else "mismatch",
            "tolerance_pct": str(self.tolerance_pct),
            "currencies": [
                {k: (str(v) if isinstance(v, Decimal) else v) for k, v in row.items()}
                for row in self.currencies.drop(
                    "generated_at", "year", "month", "report_month"
                ).iter_rows(named=True)
            ],
            "days_with_events": self.days_with_events,
            "days_reconciled": self.days_reconciled,
            "days_beyond_tolerance": [d.isoformat() for d in self.days_beyond_tolerance],
            "days_not_reconciled": [d.isoformat() for d in self.days_not_reconciled],
            "discrepancy_rows": self.discrepancy_rows,
            "quarantined": self.quarantined,
            "quarantined_by_rule": self.quarantined_by_rule,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [
            f"Reconciliation report {self.month:%Y-%m}: "
            + ("RECONCILED" if self.within_tolerance else "MISMATCH")
            + f" (tolerance {self.tolerance_pct}%)",
            "",
            f"{'currency':<9}{'realtime revenue':>20}{'batch revenue':>20}"
            f"{'realtime net':>18}{'batch net':>18}{'events':>10}{'discrepancy':>13}",
        ]
        for row in self.currencies.iter_rows(named=True):
            pct = row["discrepancy_pct"]
            lines.append(
                f"{row['currency']:<9}{row['realtime_revenue']:>20}{row['batch_revenue']:>20}"
                f"{row['realtime_net']:>18}{row['batch_net']:>18}{row['batch_count']:>10}"
                + (f"{pct:>12.3f}%" if pct is not None else f"{'unbounded':>13}")
            )
        lines += [
            "",
            f"days with events: {self.days_with_events}, reconciled daily: "
            f"{self.days_reconciled}, beyond tolerance: "
            + (", ".join(d.isoformat() for d in self.days_beyond_tolerance) or "none"),
            "days never reconciled: "
            + (", ".join(d.isoformat() for d in self.days_not_reconciled) or "none"),
            f"discrepancy rows recorded: {self.discrepancy_rows}",
            f"quarantined: {self.quarantined}"
            + (
                " ("
                + ", ".join(f"{rule} {n}" for rule, n in sorted(self.quarantined_by_rule.items()))
                + ")"
                if self.quarantined_by_rule
                else ""
            ),
        ]
        return "\n".join(lines)


def monthly_report(
    lake: LakeLocation,
    month: date,
    reference: ReferenceData,
    *,
    tolerance_pct: Decimal = DEFAULT_TOLERANCE_PCT,
    now: datetime | None = None,
) -> MonthlyReport:
    now = now or datetime.now(UTC)
    days = days_of(month)
    batch = batch_events(lake, days, reference)
    in_month = (pl.col("year") == month.year) & (pl.col("month") == month.month)

    daily = scan_table(lake, DAILY_REVENUE.name)
    realtime = (
        daily.filter(in_month)
        .group_by(key="currency")
        .agg(
            realtime_revenue=pl.col("gross_revenue").sum().cast(MONEY_TOTAL),
            realtime_net=pl.col("net_revenue").sum().cast(MONEY_TOTAL),
            realtime_count=pl.col("transaction_count").sum().cast(pl.Int64),
        )
        .collect()
        if daily is not None
        else pl.DataFrame(
            schema={
                "key": pl.String(),
                "realtime_revenue": MONEY_TOTAL,
                "realtime_net": MONEY_TOTAL,
                "realtime_count": pl.Int64(),
            }
        )
    )
    currencies = (
        compare(realtime, batch_totals_by_currency(batch), "key", tolerance_pct)
        .rename({"key": "currency"})
        .with_columns(
            report_month=pl.lit(month.strftime("%Y-%m")),
            generated_at=pl.lit(now, pl.Datetime("us", "UTC")),
            year=pl.lit(month.year, pl.Int32),
            month=pl.lit(month.month, pl.Int32),
        )
        .sort("currency")
    )
    currencies = currencies.select(list(MONTHLY_REPORT_SCHEMA)).cast(MONTHLY_REPORT_SCHEMA)  # type: ignore[arg-type]

    event_days = set(batch["created_at"].dt.date().unique().to_list())
    reconciled: dict[date, bool] = {}
    recon = scan_table(lake, RECONCILIATION_TABLE)
    if recon is not None:
        rows = recon.filter(in_month).group_by("recon_date").agg(pl.col("within_tolerance").all())
        reconciled = dict(rows.collect().iter_rows())
    discrepancies = scan_table(lake, DISCREPANCIES_TABLE)
    discrepancy_rows = (
        discrepancies.filter(in_month).select(pl.len()).collect().item()
        if discrepancies is not None
        else 0
    )
    by_rule: dict[str, int] = {}
    quarantine = scan_table(lake, QUARANTINE_TABLE)
    if quarantine is not None:
        prefix = month.strftime("%Y-%m-")
        counts = (
            quarantine.filter(pl.col("quarantine_date").str.starts_with(prefix))
            .group_by(rule=pl.col("rules").list.first())
            .len()
            .collect()
        )
        by_rule = {str(rule): int(n) for rule, n in counts.iter_rows()}
    return MonthlyReport(
        month=month,
        tolerance_pct=tolerance_pct,
        currencies=currencies,
        days_with_events=len(event_days),
        days_reconciled=len(reconciled),
        days_beyond_tolerance=tuple(sorted(d for d, ok in reconciled.items() if not ok)),
        days_not_reconciled=tuple(sorted(event_days - set(reconciled))),
        discrepancy_rows=int(discrepancy_rows),
        quarantined=sum(by_rule.values()),
        quarantined_by_rule=by_rule,
    )


def write_monthly_report(lake: LakeLocation, report: MonthlyReport) -> None:
    """Replace the month's rows in reconciliation/monthly (a rerun overwrites)."""
    month = {"year": report.month.year, "month": report.month.month}
    replace_partition(
        lake, MONTHLY_REPORT_TABLE, report.currencies, month, partition_by=list(month)
    )
