"""The `topic` group: what the pipeline knows of its Kafka topic (`show`), adopting a
topic that was deleted and created again (`adopt`), and acknowledging offsets retention
deleted before they were processed (`acknowledge-gap`). The domain logic lives in
billing_dagster.topic_identity and billing_dagster.lost_offsets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from billing_dagster.cli._common import echo_json, kafka_client, lake_location
from billing_dagster.operations import OperationError
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    from billing_dagster.delta_lake import LakeLocation
    from billing_dagster.kafka_io import KafkaClient


def resolve_key(lake: LakeLocation, client: KafkaClient, topic: str) -> tuple[str, str | None]:
    """(the key the marks of `topic` are kept under, the refusal message when Kafka's topic
    is not the one they belong to). A key given as such (`name@n`) is taken as it is.
    Read-only: a topic the lake has never seen is not recorded here."""
    from billing_dagster.kafka_io import GENERATION_SEPARATOR
    from billing_dagster.topic_identity import (
        TopicRecreatedError,
        current_generation,
        resolve_generation,
    )

    if GENERATION_SEPARATOR in topic:
        return topic, None
    try:
        return resolve_generation(lake, topic, client.topic_id(topic), record=False).key, None
    except TopicRecreatedError as exc:
        current = current_generation(lake, topic)
        return (current.key if current else topic), str(exc)


@click.group()
def topic() -> None:
    """The Kafka topic: its identity, adopting a recreated one, acknowledging lost offsets."""


@topic.command()
@click.option("--topic", "name", help="Default: BILLING_TOPIC.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(name: str | None, as_json: bool) -> None:
    """The topic's generations (each adoption of a recreated topic), whether Kafka's topic
    is the one processed, lost offsets per partition and acknowledged gaps."""
    from billing_dagster.contract import RAW_TABLE
    from billing_dagster.delta_lake import committed_offsets
    from billing_dagster.kafka_io import kafka_topic_of
    from billing_dagster.lost_offsets import acknowledged_gaps, lost_offsets
    from billing_dagster.topic_identity import generations

    settings = load_settings()
    name = kafka_topic_of(name or settings.topic)
    lake = lake_location()
    with kafka_client(settings) as client:
        marks = client.watermarks(name)
        topic_id = client.topic_id(name)
        key, recreated = resolve_key(lake, client, name)
    committed = committed_offsets(lake.open(RAW_TABLE), key, list(marks))
    lost = lost_offsets(committed, {p: low for p, (low, _) in marks.items()})
    report = {
        "topic": name,
        "kafka_topic_id": topic_id,
        "key": key,
        "recreated": recreated,
        "generations": [
            {
                "generation": g.generation,
                "key": g.key,
                "topic_id": g.topic_id,
                "recorded_at": g.recorded_at.isoformat() if g.recorded_at else None,
                "recorded_by": g.recorded_by,
                "reason": g.reason,
            }
            for g in generations(lake, name)
        ],
        "lost": {str(p): [m, low] for p, (m, low) in lost.items()},
        "acknowledged_gaps": [g.to_json() for g in acknowledged_gaps(lake, key)],
    }
    if as_json:
        echo_json(report)
        return
    click.echo(f"topic {name}: Kafka topic ID {topic_id or '(none reported)'}, processed as {key}")
    if recreated:
        click.echo(f"REFUSED: {recreated}")
    for g in report["generations"]:
        click.echo(
            f"  generation {g['generation']} ({g['key']}): topic ID {g['topic_id']}, "
            f"recorded {g['recorded_at']} by {g['recorded_by']}: {g['reason']}"
        )
    for p, (m, low) in lost.items():
        click.echo(f"  partition {p}: offsets {m:,}-{low:,} lost, not acknowledged")
    for g in report["acknowledged_gaps"]:
        click.echo(
            f"  acknowledged gap: partition {g['partition']} offsets {g['from']:,}-{g['to']:,} "
            f"by {g['acknowledged_by']} at {g['acknowledged_at']}: {g['reason']}"
        )


@topic.command()
@click.option("--topic", "name", help="Default: BILLING_TOPIC.")
@click.option("--reason", required=True, help="Why the new topic is adopted (kept for audit).")
@click.option(
    "--from",
    "start_from",
    type=click.Choice(["earliest", "latest"]),
    default="earliest",
    show_default=True,
    help="Where processing of the new topic starts: its first retained offset, or its end.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adopt(name: str | None, reason: str, start_from: str, as_json: bool) -> None:
    """Adopt a topic that was deleted and created again under the same name: the pipeline
    processes it from now on as a new generation (key NAME@N), whose marks start at
    --from; the old topic's rows, marks and balances stay as they are."""
    from billing_dagster.ingest import record_origins
    from billing_dagster.kafka_io import kafka_topic_of
    from billing_dagster.postgres_db import migrate
    from billing_dagster.topic_identity import (
        check_serving_identity,
        plan_adoption,
        record_generation,
    )

    settings = load_settings()
    name = kafka_topic_of(name or settings.topic)
    lake = lake_location()
    with kafka_client(settings) as client:
        topic_id = client.topic_id(name)
        marks = client.watermarks(name)
    previous, new = plan_adoption(lake, name, topic_id, reason=reason)
    origins = {p: low if start_from == "earliest" else high for p, (low, high) in marks.items()}
    # Where the new generation starts, first: nothing reads its key before the next commit.
    record_origins(lake, new.key, origins)
    if not record_generation(lake, new):
        raise OperationError(
            f"another adoption of '{name}' was recorded meanwhile; see `billing-dagster topic show`"
        )
    serving_note = None
    try:
        migrate(settings.postgres_url)
        check_serving_identity(settings.postgres_url, new)
    except ServingUnavailableError as exc:
        serving_note = f"Postgres not reached ({exc}); the next ingest run records it"
    report = {
        "topic": name,
        "topic_id": topic_id,
        "previous_key": previous.key,
        "previous_topic_id": previous.topic_id,
        "key": new.key,
        "generation": new.generation,
        "starts_at": {str(p): o for p, o in sorted(origins.items())},
        "serving": serving_note,
    }
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"adopted topic {name} (ID {topic_id}) as generation {new.generation}: its marks, rows "
        f"and balances' positions are kept under '{new.key}', starting at its "
        f"{start_from} offsets ({sum(origins.values()):,} skipped in all); '{previous.key}' "
        f"(ID {previous.topic_id}) keeps what was processed of the old topic"
    )
    if serving_note:
        click.echo(serving_note)


@topic.command("acknowledge-gap")
@click.option("--partition", type=click.IntRange(min=0), required=True)
@click.option("--reason", required=True, help="Why the lost offsets may be skipped (audited).")
@click.option("--topic", "name", help="Default: BILLING_TOPIC.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def acknowledge_gap(partition: int, reason: str, name: str | None, as_json: bool) -> None:
    """Acknowledge that the offsets of PARTITION retention deleted before the lake read
    them are lost: the gap is recorded (who, when, why) and the partition's marks move past
    it, so processing resumes there."""
    import uuid

    from billing_dagster.lost_offsets import acknowledge_gap as acknowledge
    from billing_dagster.postgres_db import migrate
    from billing_dagster.projection import catch_up, decided_marks

    settings = load_settings()
    lake = lake_location()
    with kafka_client(settings) as client:
        key, recreated = resolve_key(lake, client, name or settings.topic)
        if recreated:
            raise OperationError(recreated)
        marks = client.watermarks(key)
    if partition not in marks:
        raise OperationError(f"{key} has no partition {partition} (it has 0-{max(marks)})")
    gap = acknowledge(lake, key, partition, marks[partition][0], reason=reason)
    serving_note = None
    try:
        # Postgres follows from billing_events, which holds nothing for the gap.
        migrate(settings.postgres_url)
        catch_up(
            settings.postgres_url,
            lake,
            key,
            decided_marks(lake, key, [partition]),
            run_id=f"acknowledge-gap-{uuid.uuid4().hex[:12]}",
        )
    except ServingUnavailableError as exc:
        serving_note = f"Postgres not reached ({exc}); the next ingest run catches it up"
    report = {
        "topic": key,
        "partition": partition,
        "from": gap.start,
        "to": gap.end,
        "lost": gap.size,
        "reason": gap.reason,
        "acknowledged_by": gap.acknowledged_by,
        "serving": serving_note,
    }
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"acknowledged: {gap.size:,} offsets {gap.start:,}-{gap.end:,} of {key}/{partition} are "
        f"lost (recorded in control/acknowledged_gaps); processing resumes at {gap.end:,}"
    )
    if serving_note:
        click.echo(serving_note)
