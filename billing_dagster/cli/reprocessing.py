"""Commands that rerun the pipeline over past data as Dagster backfills: `replay` (a Kafka
time range) and `backfill` (partitions of any partitioned asset)."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from billing_dagster.cli._common import kafka_client, lake_location
from billing_dagster.operations import OperationError
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    import dagster as dg


def _launch(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    assets: Sequence[dg.AssetKey],
    keys: list[str],
    *,
    title: str,
    tags: dict[str, str],
    report: dict[str, object],
    what: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Launch the backfill, say so (`what` describes it), optionally wait for its runs with a
    progress bar, print the report; exit 1 when a waited-for backfill had failed runs."""
    import json

    from billing_dagster.backfills import launch_backfill, wait_for_backfill

    backfill_id = launch_backfill(instance, defs, assets, keys, title=title, tags=tags)
    report["backfill_id"] = backfill_id
    if not as_json:
        click.echo(f"launched backfill {backfill_id}{what} (UI: /runs/b/{backfill_id})")
    outcome = None
    if wait:
        with click.progressbar(
            length=len(keys), label="runs finished", file=io.StringIO() if as_json else sys.stderr
        ) as bar:
            outcome = wait_for_backfill(
                instance, backfill_id, timeout_s=timeout, on_progress=bar.update
            )
        report.update(status=outcome.status, runs=outcome.runs, failed_runs=outcome.failed_runs)
        if not as_json:
            click.echo(f"backfill {backfill_id}: {outcome.status}, {outcome.runs} run(s)")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if outcome is not None and not outcome.succeeded:
        sys.exit(1)


@click.command()
@click.option("--from", "start", required=True, help="Start of the range, e.g. 2024-12-15T10:00.")
@click.option("--to", "end", required=True, help="End of the range (exclusive).")
@click.option("--topic", help="Default: BILLING_TOPIC (the topic the pipeline is configured for).")
@click.option("--dry-run", is_flag=True, help="Only show the log hours and offsets covered.")
@click.option("--wait/--no-wait", default=False, help="Wait for the backfill's runs to finish.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def replay(
    start: str,
    end: str,
    topic: str | None,
    dry_run: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Reprocess the Kafka records of a time range (by Kafka timestamp, whole log hours) as a
    Dagster backfill of the ingest assets. Offsets the lake already committed are skipped, so
    a replay is safe to repeat and safe beside the live sensor."""
    import json
    from dataclasses import replace

    from billing_dagster.cli.topics import resolve_key
    from billing_dagster.contract import RAW_TABLE
    from billing_dagster.delta_lake import committed_offsets
    from billing_dagster.log_time import RecordingLookup, check_hours
    from billing_dagster.operations import log_hours, parse_moment, plan_replay

    settings = load_settings()
    topic = topic or settings.topic
    if topic != settings.topic:
        raise OperationError(
            f"the pipeline reads '{settings.topic}' (BILLING_TOPIC); to replay '{topic}', "
            "run with BILLING_TOPIC set to it"
        )
    moments = parse_moment(start, "--from"), parse_moment(end, "--to")
    hours = len(log_hours(*moments))
    lake = lake_location()
    with (
        kafka_client(settings) as client,
        click.progressbar(
            length=hours,
            label="finding offsets per log hour",
            file=sys.stderr if hours > 24 and not as_json else io.StringIO(),
        ) as bar,
    ):
        marks = client.watermarks(topic)  # an unknown topic is one clear error
        # The key its marks are kept under (topic_identity.py); a recreated topic is refused.
        topic, recreated = resolve_key(lake, client, topic)
        if recreated:
            raise OperationError(recreated)
        lookup = RecordingLookup(lambda moment: client.offsets_for_time(topic, moment))
        ends = {p: high for p, (_, high) in marks.items()}
        plan = plan_replay(
            topic,
            *moments,
            offset_lookup=lookup,
            ends=ends,
            committed=committed_offsets(lake.open(RAW_TABLE), topic, list(marks)),
            progress=bar.update,
        )
        # Hours a future-dated record hides records from (CreateTime topics, log_time.py).
        hidden = check_hours(client, topic, log_hours(*moments), lookup, ends)
        plan = replace(plan, hidden=tuple(hidden))
    for found in plan.hidden:
        click.echo(f"warning: {found.describe(topic)}", err=True)
    if plan.hidden and not plan.hours:
        raise OperationError(
            f"nothing to replay by hour: {len(plan.hidden)} hour(s) of that range may hide "
            "records behind a future-dated one (see the warnings); replay them by offsets"
        )
    summary = plan.to_json()
    if not as_json:
        click.echo(
            f"{topic} {plan.start:%Y-%m-%d %H:%M} .. {plan.end:%Y-%m-%d %H:%M} UTC: "
            f"{len(plan.hours)} log hour(s), {plan.records:,} records, "
            f"{plan.already_processed:,} already in the lake (skipped)"
        )
        for hour in plan.hours:
            click.echo(
                f"  {hour.partition_key}: {hour.records:,} records, {hour.to_process:,} to process"
            )
    if dry_run or not plan.hours:
        if as_json:
            click.echo(json.dumps({**summary, "dry_run": dry_run}, indent=2))
        elif not plan.hours:
            click.echo("nothing to replay: no records in that range")
        return
    from assets.ingest import (
        BILLING_EVENTS,
        CUSTOMER_BALANCES,
        RAW_BILLING_EVENTS,
        TRANSACTION_HISTORY,
    )
    from billing_dagster.backfills import dagster_instance
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_definitions
    from billing_dagster.lanes import ALL_LANES, LANE_TAG

    _launch(
        dagster_instance(),
        build_definitions(settings),
        # The money only, as in a sensor-launched run: the revenue refresh sensor brings
        # the aggregates up to what the replay wrote (refresh_revenue).
        [
            RAW_BILLING_EVENTS,
            BILLING_EVENTS,
            CUSTOMER_BALANCES,
            TRANSACTION_HISTORY,
        ],
        plan.partition_keys,
        title=f"replay {topic} {plan.start:%Y-%m-%d %H:%M}..{plan.end:%Y-%m-%d %H:%M}",
        # Reads every partition: one replay run at a time, and the sensor's lanes wait.
        tags={INGEST_CONCURRENCY_TAG: "replay", "billing/replay": "true", LANE_TAG: ALL_LANES},
        report=summary,
        what="",
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


def _partition_keys(text: str, known: list[str]) -> list[str]:
    """`A...B` (a range of existing keys, inclusive) or `A,B,C`."""
    if "..." in text:
        first, _, last = (part.strip() for part in text.partition("..."))
        for key in (first, last):
            if key not in known:
                raise OperationError(
                    f"--partitions: no partition {key!r} (keys look like {known[-1]!r})"
                )
        keys = known[known.index(first) : known.index(last) + 1]
        if not keys:
            raise OperationError(f"--partitions: {first!r} comes after {last!r}")
        return keys
    return [key.strip() for key in text.split(",") if key.strip()]


@click.command()
@click.option(
    "--asset",
    "asset_name",
    required=True,
    help="A partitioned asset: raw_billing_events (log hours, with the rest of the ingest "
    "step), daily_reconciliation, oltp_reconciliation (days), monthly_reconciliation_report.",
)
@click.option(
    "--partitions",
    "partitions_text",
    required=True,
    help="FIRST...LAST (inclusive) or KEY,KEY,..., e.g. 2024-12-01...2024-12-15.",
)
@click.option("--wait/--no-wait", default=False, help="Wait for the backfill's runs to finish.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backfill(
    asset_name: str, partitions_text: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """Launch a Dagster backfill of partitions of an asset (shown under Backfills in the UI).
    Every partitioned asset is safe to rerun: ingest takes only uncommitted offsets,
    reconciliations replace their day's rows."""

    import dagster as dg

    from assets.ingest import RAW_BILLING_EVENTS
    from assets.reconciliation import DAILY_RECONCILIATION
    from billing_dagster.backfills import dagster_instance
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_definitions
    from billing_dagster.lanes import ALL_LANES, LANE_TAG

    settings = load_settings()
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey(asset_name)
    if not graph.has(key) or graph.get(key).partitions_def is None:
        partitioned = sorted(
            k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).partitions_def
        )
        raise OperationError(
            f"--asset must be a partitioned asset ({', '.join(partitioned)}), got '{asset_name}'"
        )
    instance = dagster_instance()
    known = graph.get(key).partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    keys = _partition_keys(partitions_text, list(known))
    # The op's other assets come along: an asset of a multi-asset step cannot run alone.
    assets = sorted(graph.get(key).execution_set_asset_keys, key=lambda k: k.to_user_string())
    tags = {"billing/backfill": asset_name}
    # Queued with the live ingest runs, as the sensor's and the schedule's runs are.
    if RAW_BILLING_EVENTS in assets:
        tags[INGEST_CONCURRENCY_TAG] = "replay"
        tags[LANE_TAG] = ALL_LANES
    elif DAILY_RECONCILIATION in assets:
        tags[INGEST_CONCURRENCY_TAG] = "reconcile"
    names = [a.to_user_string() for a in assets]
    _launch(
        instance,
        defs,
        assets,
        keys,
        title=f"backfill {asset_name} {partitions_text}",
        tags=tags,
        report={"assets": names, "partitions": keys},
        what=f" of {len(keys)} partition(s) of {', '.join(names)}",
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )
