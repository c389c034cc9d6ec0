"""Commands that feed the pipeline: synthetic events, the billing workload, Debezium CDC,
and the demo that runs all of it on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from billing_dagster.cli._common import Progress, echo_json, ensure_billing_topic, until_options
from billing_dagster.kafka_io import KafkaUnavailableError
from billing_dagster.local_infra.process import REPO_ROOT, InfraError
from billing_dagster.settings import ConfigError, load_settings


@click.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=500.0,
    show_default=True,
    help="Events per second.",
)
@until_options("events")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--duplicate-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--invalid-rate", type=click.FloatRange(0, 1), default=0.005, show_default=True)
@click.option(
    "--create-topic/--no-create-topic",
    default=True,
    show_default=True,
    help="Create the topic (24 partitions) when it is missing.",
)
@click.option(
    "--single-record-batches",
    is_flag=True,
    help="One record per produce batch (needed by the embedded Tansu broker).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def produce(
    rate: float,
    count: int | None,
    duration: float | None,
    seed: int,
    duplicate_rate: float,
    invalid_rate: float,
    create_topic: bool,
    single_record_batches: bool,
    as_json: bool,
) -> None:
    """Write realistic synthetic billing events (with duplicates and invalid records)
    to BILLING_TOPIC on BILLING_KAFKA_BOOTSTRAP_SERVERS, keyed by customer id."""
    from billing_dagster.producer import make_producer, produce_at_rate
    from billing_dagster.synthetic import SyntheticBillingStream

    settings = load_settings()
    if count is None and duration is None:
        raise click.UsageError("give --count or --duration (or both)")
    if create_topic:
        ensure_billing_topic(settings)
    stream = SyntheticBillingStream(
        seed=seed, duplicate_rate=duplicate_rate, invalid_rate=invalid_rate
    )
    producer = make_producer(
        settings.kafka_bootstrap_servers, single_record_batches=single_record_batches
    )
    with Progress(count, duration, "records", quiet=as_json) as progress:
        counts = produce_at_rate(
            producer,
            settings.topic,
            stream,
            rate=rate,
            count=count,
            duration_s=duration,
            on_progress=lambda so_far: progress.update(sum(so_far.values())),
        )
    total = sum(counts.values())
    if as_json:
        echo_json({"topic": settings.topic, "records": total, **counts})
        return
    click.echo(
        f"produced {total} records to {settings.topic}: {counts['valid']} valid, "
        f"{counts['duplicate']} duplicate deliveries, {counts['invalid']} invalid"
    )


@click.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Activities (OLTP transactions) per second; nearly each makes one billing event.",
)
@until_options("activities")
@click.option(
    "--to",
    "target",
    type=click.Choice(["oltp", "kafka"]),
    help="oltp: the billing tables at BILLING_OLTP_URL (Debezium captures them); kafka: "
    "billing events straight to BILLING_TOPIC. Default: oltp when BILLING_OLTP_URL is set.",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--customers",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    help="Customer ids 1001.. (as `reference demo` writes them).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def workload(
    rate: float,
    count: int | None,
    duration: float | None,
    target: str | None,
    seed: int,
    customers: int,
    as_json: bool,
) -> None:
    """Write realistic billing activity: subscriptions with plan changes and prorations,
    invoices, payments in several currencies, refunds and chargebacks of earlier payments."""
    from billing_dagster.workload import BillingWorkload, run_at_rate

    settings = load_settings()
    if count is None and duration is None:
        raise click.UsageError("give --count or --duration (or both)")
    target = target or ("oltp" if settings.oltp_url else "kafka")
    generator = BillingWorkload(seed=seed, customers=customers)
    progress = Progress(count, duration, "activities", quiet=as_json)
    until = {
        "rate": rate,
        "count": count,
        "duration_s": duration,
        "on_progress": lambda so_far: progress.update(sum(so_far.values())),
    }
    if target == "oltp":
        from billing_dagster.oltp import connect_oltp, migrate_oltp, write_activities

        if not settings.oltp_url:
            raise ConfigError("--to oltp needs BILLING_OLTP_URL (the OLTP billing database)")
        migrate_oltp(settings.oltp_url)
        with connect_oltp(settings.oltp_url) as connection, progress:
            counts = run_at_rate(generator, lambda b: write_activities(connection, b), **until)
        where = "the OLTP billing tables"
    else:
        from billing_dagster.producer import billing_event_writer, make_producer

        ensure_billing_topic(settings)
        producer = make_producer(settings.kafka_bootstrap_servers)
        with progress:
            counts = run_at_rate(generator, billing_event_writer(producer, settings.topic), **until)
        if producer.flush(60):
            raise KafkaUnavailableError("billing events were not acknowledged by Kafka in 60 s")
        where = settings.topic
    if as_json:
        echo_json({"target": where, "activities": sum(counts.values()), "by_kind": counts})
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    click.echo(f"wrote {sum(counts.values())} activities to {where}: {kinds}")


@click.command()
@click.option(
    "--print-config",
    is_flag=True,
    help="Only print the connector configuration as JSON (for POST /connectors on your own "
    "Kafka Connect cluster).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / ".cdc",
    show_default=True,
    help="Connect's source offsets and log: a restart resumes where the last run stopped.",
)
def cdc(print_config: bool, state_dir: Path) -> None:
    """Run Debezium (Kafka Connect standalone, from dev/debezium) capturing the OLTP tables
    at BILLING_OLTP_URL into BILLING_TOPIC on BILLING_KAFKA_BOOTSTRAP_SERVERS, until Ctrl-C."""
    import json
    import time

    from billing_dagster.local_infra.debezium import LocalDebezium, connector_config
    from billing_dagster.local_infra.process import stop_on_sigterm
    from billing_dagster.oltp import migrate_oltp

    settings = load_settings()
    if not settings.oltp_url:
        raise ConfigError("cdc needs BILLING_OLTP_URL (the OLTP billing database)")
    if print_config:
        click.echo(json.dumps(connector_config(settings.oltp_url, settings.topic), indent=2))
        return
    migrate_oltp(settings.oltp_url)
    ensure_billing_topic(settings)
    stop_on_sigterm()
    server = LocalDebezium(
        settings.kafka_bootstrap_servers, settings.oltp_url, settings.topic, workdir=state_dir
    )
    try:
        server.start()
        click.echo(f"Debezium is capturing the OLTP tables into {settings.topic}")
        click.echo(f"connector status (BILLING_CDC_STATUS_URL): {server.status_url}")
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        raise InfraError(f"Kafka Connect exited; its log: {server.log}")
    except KeyboardInterrupt:
        click.echo("stopping Debezium ...")
    finally:
        server.stop()


@click.command()
@click.option("--port", type=int, default=3000, show_default=True, help="Dagster UI port.")
@click.option(
    "--broker",
    type=click.Choice(["tansu", "kafka"]),
    help="tansu: embedded, no Java; kafka: Apache Kafka from dev/kafka (needs setup). "
    "Default: tansu, or kafka with --source cdc.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=200.0,
    show_default=True,
    help="Synthetic events per second.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=REPO_ROOT / ".demo",
    show_default=True,
    help="Lake and Dagster home; wiped at start (the demo broker is memory-only).",
)
@click.option("--for-seconds", type=click.FloatRange(min=1), help="Stop after this long.")
@click.option(
    "--source",
    type=click.Choice(["synthetic", "workload", "cdc"]),
    default="synthetic",
    show_default=True,
    help="synthetic: events with duplicates and malformed records, straight to Kafka; "
    "workload: the billing workload generator's events, straight to Kafka; cdc: the "
    "generator writes the OLTP tables and Debezium captures them (needs --broker kafka).",
)
def demo(
    port: int,
    broker: str | None,
    rate: float,
    state_dir: Path,
    for_seconds: float | None,
    source: str,
) -> None:
    """Start everything on loopback and open the pipeline in the Dagster UI."""
    from billing_dagster.demo import run_demo

    sys.exit(
        run_demo(
            state_dir=state_dir.resolve(),
            ui_port=port,
            broker_kind=broker or ("kafka" if source == "cdc" else "tansu"),
            rate=rate,
            topic=load_settings().topic,
            for_seconds=for_seconds,
            source=source,
            echo=click.echo,
        )
    )
