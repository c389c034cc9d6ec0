from __future__ import annotations

from dagster import HourlyPartitionsDefinition


def log_hour_partitions(start_date: str) -> HourlyPartitionsDefinition:
    """Hours of the Kafka log (record timestamps, UTC); end_offset=1 admits the current hour."""
    return HourlyPartitionsDefinition(
        start_date=f"{start_date}-00:00", timezone="UTC", end_offset=1
    )
