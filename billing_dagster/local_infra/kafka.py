"""Apache Kafka in KRaft mode (one combined broker+controller), from Maven Central jars."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from billing_dagster.local_infra.process import (
    REPO_ROOT,
    InfraError,
    LocalServer,
    free_port,
    spawn,
    stop_process,
    wait_for_broker,
)

KAFKA_DEV_DIR = REPO_ROOT / "dev" / "kafka"


def kafka_libs_dir() -> Path:
    return Path(os.environ.get("BILLING_KAFKA_LIBS", KAFKA_DEV_DIR / "libs"))


def _cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class ApacheKafka(LocalServer):
    """`with ApacheKafka() as kafka:` starts a broker; `kafka.bootstrap_servers` reaches it."""

    kind = "kafka"

    def __init__(self, *, workdir: Path | None = None, heap: str = "768m") -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="billing-kafka-"))
        self.heap = heap
        self.port = free_port()
        self.controller_port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.workdir / "kafka.log"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _classpath(self) -> str:
        libs = kafka_libs_dir()
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise InfraError(
                f"Kafka jars are missing in {libs}: run dev/setup.sh (it fetches them with "
                "mvn dependency:copy-dependencies on dev/kafka/pom.xml)"
            )
        return f"{libs}/*"

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise InfraError("java is not installed: run dev/setup.sh (it installs a JDK)")
        return java

    def _write_config(self) -> Path:
        config = self.workdir / "server.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=24",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=4",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.retention.hours=168",
                ]
            )
            + "\n"
        )
        return config

    def start(self, timeout_s: float = 90.0) -> ApacheKafka:
        java, classpath = self._java(), self._classpath()
        config = self._write_config()
        jvm = [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_DEV_DIR / 'log4j2.properties'}",
            "-cp",
            classpath,
        ]
        formatted = subprocess.run(
            [
                *jvm,
                "kafka.tools.StorageTool",
                "format",
                # "=": a random id may start with "-", which would read as an option.
                f"--cluster-id={_cluster_id()}",
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if formatted.returncode != 0:
            raise InfraError(
                f"formatting Kafka storage failed:\n{formatted.stdout}{formatted.stderr}"
            )
        self.process = spawn([*jvm, "kafka.Kafka", str(config)], log=self.log)
        wait_for_broker(
            self.bootstrap_servers,
            what="Kafka",
            process=self.process,
            log=self.log,
            timeout_s=timeout_s,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
