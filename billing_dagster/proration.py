"""Proration: the partial-period charge when a subscription changes plan mid-period.

charge = (new_price - old_price) x remaining_days / period_days, rounded half away from
zero to the cent. An upgrade is a positive ADJUSTMENT (charged), a downgrade a negative
one (credited). Days, not seconds: that is how invoices state it and customers check it.
"""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def prorated_charge(
    old_price: Decimal,
    new_price: Decimal,
    *,
    period_start: date,
    period_end: date,
    changed_on: date,
) -> Decimal:
    """The ADJUSTMENT amount for a plan change on `changed_on` in [period_start, period_end)."""
    period_days = (period_end - period_start).days
    if period_days <= 0:
        raise ValueError(f"billing period {period_start}..{period_end} is empty")
    if not period_start <= changed_on < period_end:
        raise ValueError(f"{changed_on} is outside the period {period_start}..{period_end}")
    remaining = (period_end - changed_on).days
    return ((new_price - old_price) * remaining / period_days).quantize(CENT, ROUND_HALF_UP)
