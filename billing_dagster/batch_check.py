"""The rows the billing_events quality check judges for one batch."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.delta_lake import LakeLocation, partition_filter, scan_table
from billing_dagster.offsets import OffsetRange, parse_hour_key
from billing_dagster.projection import offsets_filter


def _hour_keys_filter(hour_keys: Sequence[str]) -> pl.Expr:
    hours = [parse_hour_key(k) for k in hour_keys]
    return partition_filter(
        EVENT_HOUR_PARTITIONS, [(h.year, h.month, h.day, h.hour) for h in hours]
    )


POSITION = ("kafka_topic", "kafka_partition", "kafka_offset")


def checked_batch_rows(
    lake: LakeLocation, topic: str, hour_keys: Sequence[str], ranges: Sequence[OffsetRange]
) -> pl.DataFrame:
    """What the quality check judges: the billing_events rows of one batch (its offset
    ranges, in the event hours it touched, as in the ingest metadata '2024-12-15-14:00'),
    followed by every other row of those hours that shares an event_id or a Kafka position
    with another row there.

    The aggregates recompute the touched hours, so a second row for any event there
    matters; finding them takes the event_id and position columns only. The expectations
    then run over the batch and those rows, not over hours that grow all day."""
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    if scan is None or not hour_keys or not ranges:
        return pl.DataFrame(schema=BILLING_EVENTS_SCHEMA)
    hours = scan.filter(_hour_keys_filter(hour_keys))
    own = offsets_filter(topic, {r.partition: (r.start, r.end) for r in ranges})
    batch = hours.filter(own).collect()
    repeated_ids = hours.group_by("event_id").len().filter(pl.col("len") > 1).collect()["event_id"]
    repeated_positions = (
        hours.group_by(POSITION).len().filter(pl.col("len") > 1).drop("len").collect()
    )
    suspects = pl.concat([batch["event_id"], repeated_ids]).unique()
    others = hours.filter(~own)
    twins = others.filter(pl.col("event_id").is_in(suspects.implode())).collect()
    if repeated_positions.height:
        same_position = others.join(repeated_positions.lazy(), on=POSITION, how="semi")
        twins = pl.concat(
            [twins, same_position.filter(~pl.col("event_id").is_in(suspects.implode())).collect()]
        )
    return pl.concat([batch, twins])
