from __future__ import annotations

from dagster import (
    DailyPartitionsDefinition,
    HourlyPartitionsDefinition,
    MonthlyPartitionsDefinition,
)


def log_hour_partitions(start_date: str) -> HourlyPartitionsDefinition:
    """Hours of the Kafka log (record timestamps, UTC); end_offset=1 admits the current hour."""
    return HourlyPartitionsDefinition(
        start_date=f"{start_date}-00:00", timezone="UTC", end_offset=1
    )


def day_partitions(start_date: str) -> DailyPartitionsDefinition:
    """Event-time days (UTC); the newest partition is yesterday, the day to reconcile."""
    return DailyPartitionsDefinition(start_date=start_date, timezone="UTC")


def month_partitions(start_date: str) -> MonthlyPartitionsDefinition:
    return MonthlyPartitionsDefinition(start_date=start_date[:8] + "01", timezone="UTC")
