"""Real servers for the suite, started once per session on loopback and always stopped."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from assets.ingest import build_ingest_assets
from assets.partitions import log_hour_partitions
from billing_dagster.definitions import build_definitions, build_resources
from billing_dagster.enrichment import write_reference_data
from billing_dagster.kafka_io import KafkaClient, KafkaSettings, ensure_topic
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.local_infra.process import REPO_ROOT, stop_on_sigterm
from billing_dagster.local_infra.redis import LocalRedis
from billing_dagster.local_infra.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3
from billing_dagster.producer import make_producer, produce_records
from billing_dagster.settings import load_settings
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .http_endpoint import Endpoint

# CI or a user stopping the run with SIGTERM still gets every server stopped: pytest runs
# fixture teardown on KeyboardInterrupt.
stop_on_sigterm()


@pytest.fixture(scope="session")
def kafka() -> Iterator[ApacheKafka]:
    with ApacheKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    # Non-durable for speed: the exactly-once tests run against both kinds (test_crashes).
    with LocalPostgres(database="dagster", durable=False) as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="session")
def redis() -> Iterator[LocalRedis]:
    """Broker and result backend of the Celery engine (tests/test_celery.py)."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def topic(kafka: ApacheKafka) -> str:
    name = f"billing-events-{uuid.uuid4().hex[:8]}"
    # CreateTime: tests place records in past log hours with the producer's timestamp.
    ensure_topic(kafka.bootstrap_servers, name, partitions=24, timestamp_type="CreateTime")
    return name


@pytest.fixture
def serving_url(postgres: LocalPostgres) -> str:
    """A fresh, empty serving database for one test."""
    return postgres.create_database(f"serving_{uuid.uuid4().hex[:10]}")


@pytest.fixture
def lake_root(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


class Pipeline:
    """The project's own Definitions, pointed at the test's servers, topic and lake."""

    def __init__(self, env: dict[str, str], *, write_reference: bool = True) -> None:
        self.env = env
        self.settings = load_settings(env)
        self.defs = build_definitions(self.settings)
        # Unbound, so a test can swap a resource (fault injection) without conflicts.
        self.asset = build_ingest_assets(log_hour_partitions(self.settings.partitions_start))
        self.sensor = self.defs.resolve_sensor_def("kafka_offsets_sensor")
        self.resources = build_resources(self.settings)
        self.lake = self.resources["lake"].location()
        # Every synthetic customer, its plan, and FX rates around today.
        if write_reference:
            write_reference_data(self.lake, SyntheticBillingStream().reference_data())

    def client(self, group: str | None = None) -> KafkaClient:
        return KafkaClient(
            KafkaSettings(
                self.settings.kafka_bootstrap_servers,
                consumer_group=group or self.settings.consumer_group,
            )
        )

    def produce(self, records: list[GeneratedRecord]) -> None:
        produce_records(
            make_producer(self.settings.kafka_bootstrap_servers), self.settings.topic, records
        )


def pipeline_env(
    kafka: ApacheKafka, topic: str, lake_root: str, serving_url: str, **extra: str
) -> dict[str, str]:
    return {
        "BILLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BILLING_TOPIC": topic,
        "BILLING_CONSUMER_GROUP": f"group-{topic}",
        "BILLING_LAKE_ROOT": lake_root,
        "BILLING_POSTGRES_URL": serving_url,
        # One lane unless a test asks for more: the tests that count runs per log hour
        # predate lanes; tests/test_parallel_lanes.py and the daemon tests of lanes set it.
        "BILLING_INGEST_LANES": "1",
        **extra,
    }


def operated_env(
    kafka: ApacheKafka,
    topic: str,
    lake_root: str,
    serving_url: str,
    postgres: LocalPostgres,
    home: Path,
    **extra: str,
) -> dict[str, str]:
    """The pipeline's environment with a Dagster home (dev/dagster.yaml, as production
    copies it) on Postgres storage, for tests that run a real dagster-daemon."""
    home.mkdir()
    shutil.copy(REPO_ROOT / "dev" / "dagster.yaml", home / "dagster.yaml")
    return pipeline_env(
        kafka,
        topic,
        lake_root,
        serving_url,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=postgres.create_database(f"dagster_{topic[-8:]}"),
        BILLING_SENSOR_INTERVAL_SECONDS="2",
        **extra,
    )


@pytest.fixture
def pipeline(kafka: ApacheKafka, topic: str, lake_root: str, serving_url: str) -> Pipeline:
    return Pipeline(pipeline_env(kafka, topic, lake_root, serving_url))


@pytest.fixture
def s3_pipeline(kafka: ApacheKafka, topic: str, s3: MotoS3, serving_url: str) -> Pipeline:
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    return Pipeline(
        pipeline_env(
            kafka,
            topic,
            f"s3://{bucket}/billing",
            serving_url,
            BILLING_S3_ENDPOINT_URL=s3.endpoint_url,
            BILLING_S3_ALLOW_HTTP="true",
            AWS_REGION=REGION,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        )
    )


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    """A real HTTP server on loopback (webhook receiver, connector status page)."""
    server = Endpoint()
    yield server
    server.server.shutdown()
