from datetime import timedelta
from decimal import Decimal

from dagster import ConfigurableResource


class RevenueAnalyticsResource(ConfigurableResource):
    """How aggregates treat late events and how strict reconciliation is."""

    #: Events behind the newest event time by more than this are counted as late.
    late_event_watermark_seconds: float = 5.0
    #: A percentage, as text so it stays an exact decimal ("0.1" means 0.1 %).
    reconciliation_tolerance_percent: str = "0.1"

    def allowed_lateness(self) -> timedelta:
        return timedelta(seconds=self.late_event_watermark_seconds)

    def tolerance_pct(self) -> Decimal:
        return Decimal(self.reconciliation_tolerance_percent)
