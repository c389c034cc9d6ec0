"""Debezium's PostgreSQL connector in a Kafka Connect standalone worker, from Maven Central jars.

The connector is configured as in the reference design (pgoutput, the five billing tables,
JSON keys, snapshot mode when_needed) with two local choices: values are JSON too
(`decimal.handling.mode=string` keeps money exact), and a RegexRouter sends the three
money tables to one billing topic while subscriptions and invoices keep their own topics.
Source offsets live in a file in the work folder, so starting again after `halt()` or
`kill()` resumes where it stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from billing_dagster.connector_probe import probe_connector
from billing_dagster.debezium import BILLING_EVENT_TABLES, CDC_TABLES
from billing_dagster.local_infra.process import (
    REPO_ROOT,
    InfraError,
    LocalServer,
    free_port,
    spawn,
    stop_process,
    wait_until,
)

DEBEZIUM_DEV_DIR = REPO_ROOT / "dev" / "debezium"
CONNECTOR_NAME = "billing-oltp"


def debezium_libs_dir() -> Path:
    return Path(os.environ.get("BILLING_DEBEZIUM_LIBS", DEBEZIUM_DEV_DIR / "libs"))


def topic_prefix(postgres_url: str) -> str:
    """Debezium's logical server name: the database's name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", urlparse(postgres_url).path.lstrip("/"))


def reference_topic(postgres_url: str, table: str) -> str:
    """Where Debezium writes changes of a table that is not routed to the billing topic."""
    return f"{topic_prefix(postgres_url)}.billing.{table}"


def connector_config(
    postgres_url: str, billing_topic: str, *, partitions: int = 24
) -> dict[str, str]:
    """The Debezium connector's configuration for an OLTP database URL. `partitions` is
    the billing topic's partition count: each customer's changes go to one of them."""
    url = urlparse(postgres_url)
    database = url.path.lstrip("/")
    routed = "|".join(BILLING_EVENT_TABLES)
    return {
        "name": CONNECTOR_NAME,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        # The PostgreSQL connector reads one replication slot: more tasks would sit idle.
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": url.hostname or "127.0.0.1",
        "database.port": str(url.port or 5432),
        "database.user": url.username or "postgres",
        "database.password": url.password or "",
        "database.dbname": database,
        "topic.prefix": topic_prefix(postgres_url),
        "table.include.list": ",".join(f"billing.{t}" for t in CDC_TABLES),
        "snapshot.mode": "when_needed",
        # Replication slots are per server, not per database: one per captured database.
        "slot.name": "billing_dagster_" + re.sub(r"[^a-z0-9_]", "_", database.lower()),
        "publication.name": "billing_dagster",
        "publication.autocreate.mode": "filtered",
        "decimal.handling.mode": "string",
        # Billing rows are never deleted; a tombstone would only be quarantined.
        "tombstones.on.delete": "false",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "false",
        "transforms": "route,by_customer",
        "transforms.route.type": "org.apache.kafka.connect.transforms.RegexRouter",
        "transforms.route.regex": re.escape(topic_prefix(postgres_url)) + rf"\.billing\.({routed})",
        "transforms.route.replacement": billing_topic,
        # Keys stay the rows' primary keys, but the partition follows the customer, as the
        # reference producer's customer-id key does: a customer's payment and its later
        # refund share a partition, in commit order, so no batch sees the refund alone.
        "transforms.by_customer.type": "io.debezium.transforms.partitions.PartitionRouting",
        "transforms.by_customer.partition.payload.fields": "change.customer_id",
        "transforms.by_customer.partition.topic.num": str(partitions),
        "transforms.by_customer.predicate": "billing_topic",
        "predicates": "billing_topic",
        "predicates.billing_topic.type": (
            "org.apache.kafka.connect.transforms.predicates.TopicNameMatches"
        ),
        "predicates.billing_topic.pattern": re.escape(billing_topic),
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": "1",
    }


class LocalDebezium(LocalServer):
    """`with LocalDebezium(kafka, oltp_url, topic) as cdc:` captures the OLTP billing tables.

    `status_url` is Kafka Connect's connector status (what BILLING_CDC_STATUS_URL reads).
    The billing topic must exist: Connect would create it with one partition.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        postgres_url: str,
        topic: str,
        *,
        heap: str = "512m",
        workdir: Path | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.postgres_url = postgres_url
        self.topic = topic
        self.heap = heap
        # A given work folder (offsets, config, log) outlives stop(); a temporary one does not.
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="billing-debezium-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.workdir / "connect.log"
        self.process: subprocess.Popen | None = None

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def status_url(self) -> str:
        return f"{self.rest_url}/connectors/{CONNECTOR_NAME}/status"

    def _command(self) -> list[str]:
        libs = debezium_libs_dir()
        if not any(libs.glob("debezium-connector-postgres-*.jar")):
            raise InfraError(
                f"Debezium jars are missing in {libs}: run dev/setup.sh (it fetches them with "
                "mvn dependency:copy-dependencies on dev/debezium/pom.xml)"
            )
        java = shutil.which("java")
        if java is None:
            raise InfraError("java is not installed: run dev/setup.sh (it installs a JDK)")
        plugins = self.workdir / "plugins"
        plugins.mkdir(exist_ok=True)
        worker = self.workdir / "worker.properties"
        worker.write_text(
            _properties(
                {
                    "bootstrap.servers": self.bootstrap_servers,
                    "listeners": self.rest_url,
                    "key.converter": "org.apache.kafka.connect.json.JsonConverter",
                    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
                    "offset.storage.file.filename": str(self.workdir / "offsets.dat"),
                    # Offsets flushed every second: a crash re-sends at most ~1 s of changes,
                    # which the pipeline drops as duplicate event_ids.
                    "offset.flush.interval.ms": "1000",
                    # The connector is on the class path; an empty plugin folder and
                    # ServiceLoader discovery skip a slow scan of every jar.
                    "plugin.path": str(plugins),
                    "plugin.discovery": "service_load",
                }
            )
        )
        connector = self.workdir / "connector.properties"
        connector.write_text(_properties(connector_config(self.postgres_url, self.topic)))
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={REPO_ROOT / 'dev' / 'kafka' / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(worker),
            str(connector),
        ]

    def start(self, timeout_s: float = 120.0) -> LocalDebezium:
        self.process = spawn(self._command(), log=self.log)
        wait_until(
            lambda: probe_connector(self.status_url, timeout_s=2).state == "RUNNING",
            what="Debezium (Kafka Connect) connector",
            process=self.process,
            log=self.log,
            timeout_s=timeout_s,
        )
        return self

    def halt(self) -> None:
        """Stop the worker, keeping its offsets, as an operator's restart would."""
        stop_process(self.process)
        self.process = None

    def kill(self) -> None:
        """Kill the worker without a clean shutdown, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=20)
        self.process = None

    def stop(self) -> None:
        self.halt()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _properties(values: dict[str, str]) -> str:
    # Java properties: backslashes are escapes, so the router's regex needs them doubled.
    return "".join(f"{k}={v.replace(chr(92), chr(92) * 2)}\n" for k, v in values.items())
