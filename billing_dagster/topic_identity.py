"""Which Kafka topic the lake's and Postgres' marks belong to.

Kafka gives every topic an ID; a topic deleted and created again under the same name gets
a new one, and its offsets start again at 0. The lake's marks (Delta app transactions
`kafka:<topic>:<partition>`), Postgres' `balance_offsets` and every row's `kafka_topic`
name the topic, so the new topic's first offsets would look processed. The lake therefore
records, per topic, the ID its marks belong to (`control/topic_identity`), and every entry
point checks it against Kafka before planning or reading anything.

An operator adopts a recreated topic deliberately (`billing-dagster topic adopt`): that
starts a new *generation* whose marks, rows and serving marks are kept under the key
`<topic>@<n>` (Kafka topic names cannot contain '@'). Generation 0 keeps the plain name, so
an existing lake changes nothing. The new generation's marks start empty, its positions
never collide with the old topic's, and the old generation's rows and balances stay as
they are. KafkaClient asks Kafka under the name and stamps rows with the key.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from deltalake import CommitProperties, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from billing_dagster.delta_lake import LakeLocation, open_or_create, read_table
from billing_dagster.kafka_io import GENERATION_SEPARATOR, kafka_topic_of
from billing_dagster.offsets import TopicResetError
from billing_dagster.postgres_db import connect

IDENTITY_TABLE = "control/topic_identity"
IDENTITY_SCHEMA: dict[str, pl.DataType] = {
    "topic": pl.String(),
    "generation": pl.Int32(),
    "topic_key": pl.String(),
    #: "" when the broker reports no topic ID (then only the offset heuristic guards).
    "topic_id": pl.String(),
    "recorded_at": pl.Datetime("us", "UTC"),
    "recorded_by": pl.String(),
    "reason": pl.String(),
}
RUNBOOK = "docs/runbooks/topic-recreated.md"


class TopicRecreatedError(TopicResetError):
    """Kafka's topic ID is not the one the marks belong to; an operator adopts it."""


def generation_key(topic: str, generation: int) -> str:
    """The name a generation's marks and rows are kept under."""
    return topic if generation == 0 else f"{topic}{GENERATION_SEPARATOR}{generation}"


def adopt_command(topic: str) -> str:
    return f"billing-dagster topic adopt --topic {topic} --reason '...'"


@dataclass(frozen=True)
class TopicGeneration:
    topic: str
    generation: int
    #: None: the broker reported no topic ID when this generation was recorded.
    topic_id: str | None
    recorded_at: datetime | None = None
    recorded_by: str = ""
    reason: str = ""

    @property
    def key(self) -> str:
        return generation_key(self.topic, self.generation)


def _app_id(topic: str) -> str:
    return f"generation:{topic}"


def generations(lake: LakeLocation, topic: str) -> list[TopicGeneration]:
    """Every generation recorded for Kafka topic `topic`, oldest first."""
    if lake.open(IDENTITY_TABLE) is None:
        return []
    rows = (
        read_table(lake, IDENTITY_TABLE)
        .filter(pl.col("topic") == topic)
        .sort("generation", "recorded_at")
        .unique("generation", keep="first", maintain_order=True)
    )
    return [
        TopicGeneration(
            r["topic"],
            r["generation"],
            r["topic_id"] or None,
            r["recorded_at"],
            r["recorded_by"],
            r["reason"],
        )
        for r in rows.iter_rows(named=True)
    ]


def current_generation(lake: LakeLocation, topic: str) -> TopicGeneration | None:
    found = generations(lake, topic)
    return found[-1] if found else None


def record_generation(lake: LakeLocation, generation: TopicGeneration) -> bool:
    """Append `generation` unless another writer recorded that generation number first
    (the app transaction `generation:<topic>` counts them; a racing commit fails Delta's
    conflict check). True when this call recorded it."""
    table = open_or_create(lake, IDENTITY_TABLE, IDENTITY_SCHEMA, [])
    app = _app_id(generation.topic)
    if (table.transaction_version(app) or 0) != generation.generation:
        return False
    row = pl.DataFrame(
        [
            {
                "topic": generation.topic,
                "generation": generation.generation,
                "topic_key": generation.key,
                "topic_id": generation.topic_id or "",
                "recorded_at": generation.recorded_at or datetime.now(UTC),
                "recorded_by": generation.recorded_by,
                "reason": generation.reason,
            }
        ],
        schema=IDENTITY_SCHEMA,
    )
    properties = CommitProperties(app_transactions=[Transaction(app, generation.generation + 1)])
    try:
        write_deltalake(table, row.to_arrow(), mode="append", commit_properties=properties)
    except CommitFailedError:
        return False
    return True


def _recreated(current: TopicGeneration, topic_id: str) -> TopicRecreatedError:
    return TopicRecreatedError(
        f"Kafka topic '{current.topic}' was recreated (deleted and created again): its topic "
        f"ID is now {topic_id}, but the marks the pipeline keeps under '{current.key}' (generation "
        f"{current.generation}) belong to topic ID {current.topic_id}. The new topic's offsets "
        "start again at 0 and would be mistaken for processed ones, so nothing is read from "
        f"it until it is adopted: run `{adopt_command(current.topic)}` ({RUNBOOK})."
    )


def resolve_generation(
    lake: LakeLocation, topic: str, topic_id: str | None, *, record: bool = True
) -> TopicGeneration:
    """The generation whose marks Kafka topic `topic` (its name) is processed under.

    First sight: generation 0, under the plain name, recorded with Kafka's topic ID when
    `record` (the sensor and runs record it; read-only commands do not). Raises
    TopicRecreatedError when Kafka's ID is not the recorded one."""
    current = current_generation(lake, topic)
    if current is None:
        first = TopicGeneration(topic, 0, topic_id, datetime.now(UTC), "pipeline", "first seen")
        if not record:
            return first
        record_generation(lake, first)
        current = current_generation(lake, topic) or first
    if topic_id and current.topic_id and topic_id != current.topic_id:
        raise _recreated(current, topic_id)
    return current


def check_key(
    lake: LakeLocation, key: str, topic_id: str | None, *, record: bool = True
) -> TopicGeneration:
    """For a run planned under `key`: its topic's current generation, which must be
    `key`'s (a run queued before an adoption is refused, not run against the new topic)."""
    topic = kafka_topic_of(key)
    planned_for_later = key != topic
    current = resolve_generation(lake, topic, topic_id, record=record and not planned_for_later)
    if current.key != key:
        raise TopicRecreatedError(
            f"this run was planned for '{key}', but the pipeline now processes Kafka topic "
            f"'{topic}' as '{current.key}' (generation {current.generation}, adopted "
            f"{current.recorded_at:%Y-%m-%d %H:%M} UTC): its offsets belong to another "
            "topic of that name; nothing was read. The sensor plans the current one's runs."
        )
    return current


def plan_adoption(
    lake: LakeLocation,
    topic: str,
    topic_id: str | None,
    *,
    reason: str,
    by: str | None = None,
) -> tuple[TopicGeneration, TopicGeneration]:
    """(the generation followed now, the next one for Kafka topic `topic`, now `topic_id`).
    Nothing is recorded: the caller records the new key's starting offsets, then the
    generation (`record_generation`); nothing reads the new key before that commit."""
    from billing_dagster.operations import OperationError

    if not topic_id:
        raise OperationError(
            f"the broker reports no topic ID for '{topic}': a recreated topic cannot be told "
            "from the one processed before, so there is nothing to adopt"
        )
    if not reason.strip():
        raise OperationError("--reason is required: say why the new topic is adopted")
    current = current_generation(lake, topic)
    if current is None:
        raise OperationError(
            f"the lake has no record of topic '{topic}': there is nothing to adopt, the "
            "first ingest run or sensor tick records it"
        )
    if current.topic_id == topic_id:
        raise OperationError(
            f"the pipeline already processes topic '{topic}' (ID {topic_id}) as "
            f"'{current.key}' (generation {current.generation}): nothing to adopt"
        )
    new = TopicGeneration(
        topic,
        current.generation + 1,
        topic_id,
        datetime.now(UTC),
        by or getpass.getuser(),
        reason.strip(),
    )
    return current, new


# ---- the serving side ----------------------------------------------------------------


def check_serving_identity(url: str, generation: TopicGeneration) -> None:
    """Postgres keeps, per key of its marks, the topic ID they belong to (migration 0003):
    recorded on first sight, and a serving database whose marks belong to another topic
    of that name (restored from elsewhere, kept while the lake was replaced) is refused."""
    if not generation.topic_id:
        return
    with connect(url) as connection, connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('public.topic_identity') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return  # not migrated yet: runs migrate before they check
        cursor.execute(
            "INSERT INTO topic_identity (topic_key, kafka_topic, generation, topic_id) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (topic_key) DO NOTHING",
            (generation.key, generation.topic, generation.generation, generation.topic_id),
        )
        cursor.execute(
            "SELECT topic_id FROM topic_identity WHERE topic_key = %s", (generation.key,)
        )
        recorded = cursor.fetchone()[0]
    if recorded != generation.topic_id:
        raise TopicRecreatedError(
            f"the serving Postgres keeps its marks of '{generation.key}' for Kafka topic ID "
            f"{recorded}, but the lake's marks of '{generation.key}' belong to topic ID "
            f"{generation.topic_id}: the two stores follow different topics of that name "
            "(a lake or a database replaced?). Point BILLING_POSTGRES_URL at the serving "
            f"database of this lake ({RUNBOOK})."
        )
