"""`billing-dagster`: the operator's command line."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import click

from billing_dagster.enrichment import ReferenceDataError
from billing_dagster.kafka_io import KafkaUnavailableError, ensure_topic
from billing_dagster.local_infra.process import REPO_ROOT, InfraError
from billing_dagster.operations import OperationError
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.settings import ConfigError, load_settings

USER_ERRORS = (
    ConfigError,
    OperationError,
    InfraError,
    KafkaUnavailableError,
    ReferenceDataError,
    ServingUnavailableError,
)


class BillingGroup(click.Group):
    """Turns mistakes a user can fix into one line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=BillingGroup)
def main() -> None:
    """billing-dagster: Kafka billing events to trusted money figures."""
    import logging

    from billing_dagster.kafka_io import LIBRDKAFKA_LOG

    # The error a command ends with says it once; the client's retry chatter is not shown.
    LIBRDKAFKA_LOG.addHandler(logging.NullHandler())
    LIBRDKAFKA_LOG.propagate = False


def _ensure_topic(settings) -> None:
    try:
        ensure_topic(
            settings.kafka_bootstrap_servers,
            settings.topic,
            partitions=24,
            timeout_s=settings.kafka_request_timeout_s,
        )
    except Exception as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} "
            f"(BILLING_KAFKA_BOOTSTRAP_SERVERS): {exc}"
        ) from None


def _echo_json(report: dict[str, object]) -> None:
    import json

    click.echo(json.dumps(report, indent=2, default=str))


class _Progress:
    """A progress bar on stderr (stdout stays clean for --json) for a run bounded by a
    count or a duration: `update(done)` takes the running total."""

    def __init__(self, count: int | None, duration: float | None, unit: str, quiet: bool):
        import time

        self._started, self._clock = time.monotonic(), time.monotonic
        self._by_count = count is not None
        length = count if count is not None else int(duration or 0)
        label = f"{unit} written" if self._by_count else "seconds"
        self._bar = click.progressbar(
            length=length, label=label, file=io.StringIO() if quiet else sys.stderr
        )
        self._shown = 0

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def update(self, done: int) -> None:
        position = done if self._by_count else int(self._clock() - self._started)
        position = min(position, self._bar.length)
        if position > self._shown:
            self._bar.update(position - self._shown)
            self._shown = position


def _until(unit: str):
    """--count and --duration, the stop conditions of `produce` and `workload`."""
    count = click.option(
        "--count", type=click.IntRange(min=1), help=f"Stop after this many {unit}."
    )
    duration = click.option(
        "--duration",
        type=click.FloatRange(min=0, min_open=True),
        help="Stop after this many seconds.",
    )
    return lambda command: count(duration(command))


@main.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=500.0,
    show_default=True,
    help="Events per second.",
)
@_until("events")
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
    rate,
    count,
    duration,
    seed,
    duplicate_rate,
    invalid_rate,
    create_topic,
    single_record_batches,
    as_json,
) -> None:
    """Write realistic synthetic billing events (with duplicates and invalid records)
    to BILLING_TOPIC on BILLING_KAFKA_BOOTSTRAP_SERVERS, keyed by customer id."""
    from billing_dagster.producer import make_producer, produce_at_rate
    from billing_dagster.synthetic import SyntheticBillingStream

    settings = load_settings()
    if count is None and duration is None:
        raise click.UsageError("give --count or --duration (or both)")
    if create_topic:
        _ensure_topic(settings)
    stream = SyntheticBillingStream(
        seed=seed, duplicate_rate=duplicate_rate, invalid_rate=invalid_rate
    )
    producer = make_producer(
        settings.kafka_bootstrap_servers, single_record_batches=single_record_batches
    )
    with _Progress(count, duration, "records", quiet=as_json) as progress:
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
        _echo_json({"topic": settings.topic, "records": total, **counts})
        return
    click.echo(
        f"produced {total} records to {settings.topic}: {counts['valid']} valid, "
        f"{counts['duplicate']} duplicate deliveries, {counts['invalid']} invalid"
    )


@main.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Activities (OLTP transactions) per second; nearly each makes one billing event.",
)
@_until("activities")
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
def workload(rate, count, duration, target, seed, customers, as_json) -> None:
    """Write realistic billing activity: subscriptions with plan changes and prorations,
    invoices, payments in several currencies, refunds and chargebacks of earlier payments."""
    from billing_dagster.workload import BillingWorkload, run_at_rate

    settings = load_settings()
    if count is None and duration is None:
        raise click.UsageError("give --count or --duration (or both)")
    target = target or ("oltp" if settings.oltp_url else "kafka")
    generator = BillingWorkload(seed=seed, customers=customers)
    progress = _Progress(count, duration, "activities", quiet=as_json)
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

        _ensure_topic(settings)
        producer = make_producer(settings.kafka_bootstrap_servers)
        with progress:
            counts = run_at_rate(generator, billing_event_writer(producer, settings.topic), **until)
        if producer.flush(60):
            raise KafkaUnavailableError("billing events were not acknowledged by Kafka in 60 s")
        where = settings.topic
    if as_json:
        _echo_json({"target": where, "activities": sum(counts.values()), "by_kind": counts})
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    click.echo(f"wrote {sum(counts.values())} activities to {where}: {kinds}")


@main.command()
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
    _ensure_topic(settings)
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


@main.command()
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
def demo(port, broker, rate, state_dir, for_seconds, source) -> None:
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


@main.group()
def reference() -> None:
    """Reference tables the cleaning step enriches from (reference/ in the lake)."""


def _lake():
    from billing_dagster.definitions import build_resources

    return build_resources(load_settings())["lake"].location()


@reference.command("load")
@click.option(
    "--customers",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: customer_id,customer_tier",
)
@click.option(
    "--subscriptions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: subscription_id,customer_id,plan,started_at (ISO-8601)",
)
@click.option(
    "--fx-rates",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV: rate_date,currency,usd_rate (USD per unit)",
)
def reference_load(customers: Path, subscriptions: Path, fx_rates: Path) -> None:
    """Replace the reference tables with these CSV files (all three, atomically per table)."""
    from billing_dagster.enrichment import read_reference_csv, write_reference_data

    data = read_reference_csv(customers, subscriptions, fx_rates)
    versions = write_reference_data(_lake(), data)
    click.echo(
        f"loaded {data.customers.height} customers, {data.subscriptions.height} subscriptions, "
        f"{data.fx_rates.height} FX rates (table versions {versions})"
    )


@reference.command("demo")
@click.option(
    "--customers",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    help="How many synthetic customers (as `produce` generates).",
)
def reference_demo(customers: int) -> None:
    """Reference data matching `produce`: every synthetic customer, rates for +-30 days."""
    from billing_dagster.enrichment import write_reference_data
    from billing_dagster.synthetic import SyntheticBillingStream

    data = SyntheticBillingStream(customers=customers).reference_data()
    write_reference_data(_lake(), data)
    click.echo(f"wrote {data.customers.height} customers and {data.fx_rates.height} FX rates")


@main.command()
def migrate() -> None:
    """Apply pending serving-table migrations to BILLING_POSTGRES_URL (runs also start them)."""
    from billing_dagster.postgres_db import migrate as apply_migrations

    applied = apply_migrations(load_settings().postgres_url)
    click.echo(
        f"applied {', '.join(applied)}" if applied else "nothing to apply: schema is current"
    )


def _date(ctx: click.Context, param: click.Parameter, value: str | None):
    from datetime import date

    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"must be a date like 2024-12-15, got '{value}'") from None


def _analytics():
    from billing_dagster.definitions import build_resources

    return build_resources(load_settings())["analytics"]


@main.command()
def aggregate() -> None:
    """Bring hourly_revenue, daily_revenue and customer_metrics up to billing_events now
    (every ingest run does this; useful after repairing the lake)."""
    from billing_dagster.aggregates import refresh_aggregates

    refresh = refresh_aggregates(_lake(), allowed_lateness=_analytics().allowed_lateness())
    if not refresh.changed:
        click.echo("aggregates are current")
        return
    days = ", ".join(d.isoformat() for d in refresh.days)
    click.echo(
        f"recomputed {len(refresh.days)} day(s) ({days}) to billing_events version "
        f"{refresh.source_version}; {refresh.late_events} late events absorbed"
    )


@main.command()
@click.option(
    "--date",
    "day",
    required=True,
    callback=_date,
    help="The event-time day (UTC) to reconcile, e.g. 2024-12-15.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reconcile(day, as_json: bool) -> None:
    """Reconcile one day's real-time revenue against the raw lake, and check Postgres
    against the lake (balances = history, the day's history = billing_events, marks);
    exit 1 on a mismatch or a broken invariant. Results replace the day's rows in
    reconciliation/daily and reconciliation/discrepancies."""
    import json

    from billing_dagster.enrichment import load_reference_data
    from billing_dagster.invariants import check_all
    from billing_dagster.reconciliation import reconcile_day, write_reconciliation

    settings = load_settings()
    lake = _lake()
    result = reconcile_day(
        lake, day, load_reference_data(lake), tolerance_pct=_analytics().tolerance_pct()
    )
    write_reconciliation(lake, result)
    with _kafka_client(settings) as client:
        partitions = sorted(client.end_offsets(settings.topic))
    invariants = check_all(settings.postgres_url, lake, settings.topic, partitions, [day])
    broken = [i for i in invariants if not i.ok]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "date": day.isoformat(),
                    **result.metadata(),
                    "invariants": [
                        {"name": i.name, "ok": i.ok, "summary": i.summary, "offending": i.details}
                        for i in invariants
                    ],
                },
                indent=2,
                default=str,
            )
        )
    else:
        for row in result.summary.iter_rows(named=True):
            pct = row["discrepancy_pct"]
            click.echo(
                f"{row['scope']:<9} {row['key']:<4} realtime {row['realtime_net']:>16} "
                f"batch {row['batch_net']:>16}  "
                + ("unbounded" if pct is None else f"{pct:.3f}%")
                + ("" if row["within_tolerance"] else "  BEYOND TOLERANCE")
            )
        events = result.metadata()["differing_events"]
        click.echo(
            f"{day}: {result.status}"
            + (f"; differing events: {', '.join(events)}" if events else "")
        )
        for invariant in invariants:
            click.echo(
                f"{'ok' if invariant.ok else 'BROKEN':<6} {invariant.name}: {invariant.summary}"
            )
    if result.status == "mismatch" or broken:
        sys.exit(1)


@main.command()
@click.option("--month", required=True, help="The month, e.g. 2024-12.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(month: str, as_json: bool) -> None:
    """The month-end reconciliation report (also written to reconciliation/monthly)."""
    from billing_dagster.enrichment import load_reference_data
    from billing_dagster.monthly_report import monthly_report, parse_month, write_monthly_report

    try:
        first_day = parse_month(month)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    lake = _lake()
    result = monthly_report(
        lake, first_day, load_reference_data(lake), tolerance_pct=_analytics().tolerance_pct()
    )
    write_monthly_report(lake, result)
    click.echo(result.to_json() if as_json else result.to_text())


# ---- operating the pipeline: status, replay, backfill ----------------------------------


def _kafka_client(settings):
    from billing_dagster.definitions import build_resources

    return build_resources(settings)["kafka"].client()


def _last_ingest_run(instance) -> dict[str, object] | None:
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG

    for run in instance.get_runs(limit=50):
        if run.tags.get(INGEST_CONCURRENCY_TAG, "reconcile") not in ("reconcile", "maintenance"):
            record = instance.get_run_record_by_id(run.run_id)
            return {
                "run_id": run.run_id,
                "job": run.job_name,
                "status": run.status.value,
                "kind": run.tags[INGEST_CONCURRENCY_TAG],
                "partition": run.tags.get("dagster/partition"),
                "backfill": run.tags.get("dagster/backfill"),
                "updated_at": record.update_timestamp.isoformat() if record else None,
            }
    return None


@main.command()
@click.option("--topic", help="Default: BILLING_TOPIC.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(topic: str | None, as_json: bool) -> None:
    """Where the pipeline stands: per Kafka partition the end offset, the offset processed
    into the lake and the lag; the last ingest run; the last reconciliation."""
    import json
    import os

    from billing_dagster.contract import RAW_TABLE
    from billing_dagster.delta_lake import committed_offsets
    from billing_dagster.operations import partition_status
    from billing_dagster.reconciliation import latest_reconciliation
    from billing_dagster.serving import serving_marks

    settings = load_settings()
    topic = topic or settings.topic
    lake = _lake()
    with _kafka_client(settings) as client:
        marks = client.watermarks(topic)  # an unknown topic is one clear error
    committed = committed_offsets(lake.open(RAW_TABLE), topic, list(marks))
    try:
        serving: dict[int, int] | None = serving_marks(settings.postgres_url, topic)
        serving_error = None
    except ServingUnavailableError as exc:
        serving, serving_error = None, str(exc)
    partitions = partition_status(marks, committed, serving)
    last_run, in_progress = None, None
    if os.environ.get("DAGSTER_HOME"):
        import dagster as dg
        from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

        from billing_dagster.backfills import dagster_instance
        from billing_dagster.definitions import INGEST_CONCURRENCY_TAG

        instance = dagster_instance()
        last_run = _last_ingest_run(instance)
        in_progress = sum(
            1
            for run in instance.get_runs(dg.RunsFilter(statuses=list(IN_PROGRESS_RUN_STATUSES)))
            if INGEST_CONCURRENCY_TAG in run.tags
        )
    recon = latest_reconciliation(lake)
    report = {
        "topic": topic,
        "lag": sum(p.lag for p in partitions),
        "partitions": [
            {
                "partition": p.partition,
                "end": p.end,
                "processed": p.processed,
                "lag": p.lag,
                "lake": p.lake,
                "serving": p.serving,
            }
            for p in partitions
        ],
        # Processed = in the lake and in Postgres; None here: Postgres unknown.
        "serving_unavailable": serving_error,
        "last_run": last_run,
        "ingest_runs_in_progress": in_progress,
        "last_reconciliation": None
        if recon is None
        else {
            "date": recon.day.isoformat(),
            "max_discrepancy_pct": str(recon.max_discrepancy_pct),
            "worst": recon.worst,
        },
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"topic {topic}: total lag {report['lag']:,} records")
    if serving_error:
        click.echo(f"Postgres out of reach, lag counts the lake only: {serving_error}")
    click.echo(
        f"{'partition':>9} {'end':>12} {'processed':>12} {'lag':>10} {'lake':>12} {'postgres':>12}"
    )

    def shown(offset: int | None) -> str:
        return "-" if offset is None else f"{offset:,}"

    for p in partitions:
        click.echo(
            f"{p.partition:>9} {p.end:>12,} {shown(p.processed):>12} {p.lag:>10,} "
            f"{shown(p.lake):>12} {shown(p.serving):>12}"
        )
    if last_run is None:
        where = "" if os.environ.get("DAGSTER_HOME") else " (DAGSTER_HOME not set)"
        click.echo(f"last ingest run: none{where}")
    else:
        click.echo(
            f"last ingest run: {last_run['status']} {last_run['run_id'][:8]} "
            f"({last_run['kind']}, partition {last_run['partition']}) at {last_run['updated_at']}"
        )
    if in_progress:
        click.echo(f"ingest runs queued or running: {in_progress}")
    if recon is None:
        click.echo("last reconciliation: none")
    else:
        click.echo(
            f"last reconciliation: {recon.day} worst {recon.max_discrepancy_pct}% ({recon.worst})"
        )


def _launch(
    instance,
    defs,
    assets,
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


@main.command()
@click.option("--from", "start", required=True, help="Start of the range, e.g. 2024-12-15T10:00.")
@click.option("--to", "end", required=True, help="End of the range (exclusive).")
@click.option("--topic", help="Default: BILLING_TOPIC (the topic the pipeline is configured for).")
@click.option("--dry-run", is_flag=True, help="Only show the log hours and offsets covered.")
@click.option("--wait/--no-wait", default=False, help="Wait for the backfill's runs to finish.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def replay(start, end, topic, dry_run, wait, timeout, as_json) -> None:
    """Reprocess the Kafka records of a time range (by Kafka timestamp, whole log hours) as a
    Dagster backfill of the ingest assets. Offsets the lake already committed are skipped, so
    a replay is safe to repeat and safe beside the live sensor."""
    import json

    from billing_dagster.contract import RAW_TABLE
    from billing_dagster.delta_lake import committed_offsets
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
    lake = _lake()
    with (
        _kafka_client(settings) as client,
        click.progressbar(
            length=hours,
            label="finding offsets per log hour",
            file=sys.stderr if hours > 24 and not as_json else io.StringIO(),
        ) as bar,
    ):
        marks = client.watermarks(topic)  # an unknown topic is one clear error
        plan = plan_replay(
            topic,
            *moments,
            offset_lookup=lambda moment: client.offsets_for_time(topic, moment),
            ends={p: high for p, (_, high) in marks.items()},
            committed=committed_offsets(lake.open(RAW_TABLE), topic, list(marks)),
            progress=bar.update,
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
    from assets.aggregates import AGGREGATE_KEYS
    from assets.ingest import (
        BILLING_EVENTS,
        CUSTOMER_BALANCES,
        RAW_BILLING_EVENTS,
        TRANSACTION_HISTORY,
    )
    from billing_dagster.backfills import dagster_instance
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_definitions

    _launch(
        dagster_instance(),
        build_definitions(settings),
        # The aggregates follow, as in a sensor-launched run: a replay that fills a gap
        # brings revenue up to date too.
        [
            RAW_BILLING_EVENTS,
            BILLING_EVENTS,
            CUSTOMER_BALANCES,
            TRANSACTION_HISTORY,
            *AGGREGATE_KEYS,
        ],
        plan.partition_keys,
        title=f"replay {topic} {plan.start:%Y-%m-%d %H:%M}..{plan.end:%Y-%m-%d %H:%M}",
        # Queued with the sensor's runs (one ingest run at a time).
        tags={INGEST_CONCURRENCY_TAG: "replay", "billing/replay": "true"},
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


@main.command()
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
def backfill(asset_name, partitions_text, wait, timeout, as_json) -> None:
    """Launch a Dagster backfill of partitions of an asset (shown under Backfills in the UI).
    Every partitioned asset is safe to rerun: ingest takes only uncommitted offsets,
    reconciliations replace their day's rows."""

    import dagster as dg

    from assets.ingest import RAW_BILLING_EVENTS
    from assets.reconciliation import DAILY_RECONCILIATION
    from billing_dagster.backfills import dagster_instance
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_definitions

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


if __name__ == "__main__":
    main()
