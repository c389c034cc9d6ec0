"""The ingest circuit breaker: pure tests of when a batch is held, then real Kafka, Delta
and Postgres: a day without FX rates holds its batch (nothing committed anywhere) until
the day is loaded, and an operator releases a held batch with `release-batch`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest
from click.testing import CliRunner, Result

from billing_dagster.alerts import circuit_breaker_alert
from billing_dagster.avro_format import SchemaRegistrySource, avro_record, frame_avro
from billing_dagster.circuit_breaker import (
    BREAKER_RULE_TAG,
    BREAKER_TAG,
    HELD,
    RELEASE,
    RELEASED_RUN_TAG,
    BreakerPolicy,
    CircuitBreakerOpenError,
    IngestRunOutcome,
    check_batch,
    judge,
    open_holds,
)
from billing_dagster.cli import main
from billing_dagster.contract import (
    AVRO_SCHEMA_V2,
    BILLING_EVENTS_TABLE,
    KAFKA_RECORD_SCHEMA,
    QUARANTINE_TABLE,
    RAW_TABLE,
)
from billing_dagster.decoding import ValueFormat, decode_records
from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, build_resources
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import ReferenceData, write_reference_data
from billing_dagster.ingest import CleaningContext
from billing_dagster.settings import ConfigError, load_settings
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from sensors.alerts import held_batches

from .conftest import Pipeline
from .lake_rows import balances, history_counts
from .test_ingest_kafka import evaluate_sensor, materialization, request_ranges
from .test_operations import dagster_home  # noqa: F401 (a fixture)

# ---- pure: when a batch is held ------------------------------------------------------


def quarantine(*rows: tuple[str, list[str], str], partition: int = 0) -> pl.DataFrame:
    """Quarantine rows (stage, rules, reason) at consecutive offsets of one partition."""
    return pl.DataFrame(
        {
            "stage": [stage for stage, _, _ in rows],
            "rules": [rules for _, rules, _ in rows],
            "reason": [reason for _, _, reason in rows],
            "kafka_partition": [partition] * len(rows),
            "kafka_offset": list(range(len(rows))),
        },
        schema={
            "stage": pl.String,
            "rules": pl.List(pl.String),
            "reason": pl.String,
            "kafka_partition": pl.Int32,
            "kafka_offset": pl.Int64,
        },
    )


def fx_rejects(count: int) -> list[tuple[str, list[str], str]]:
    return [("validation", ["reference:fx_rate"], "no USD rate for EUR on 2026-03-01")] * count


def records(count: int, partition: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {"kafka_partition": [partition] * count, "kafka_offset": list(range(count))},
        schema={"kafka_partition": pl.Int32, "kafka_offset": pl.Int64},
    )


@pytest.mark.parametrize(
    ("failing", "batch", "held"),
    [
        (1, 3, False),  # a third of a tiny batch: under the minimum count
        (20, 400, False),  # exactly 5 %: not more than the share
        (21, 400, True),  # 5.25 %
        (19, 100, False),  # 19 %, but fewer than 20 records
        (20, 100, True),
    ],
)
def test_a_rule_trips_the_breaker_past_its_share_and_minimum_count(
    failing: int, batch: int, held: bool
):
    verdict = judge(quarantine(*fx_rejects(failing)), batch, BreakerPolicy())
    assert verdict.holds is held
    assert [c.rule for c in verdict.tripped] == (["reference:fx_rate"] if held else [])


def test_counts_are_per_rule_across_stages_and_exempt_dedupe_and_earlier_decisions():
    rows = (
        # A record breaking two rules counts for each; decode and validation stages alike.
        [("validation", ["sign:payment_positive", "currency:supported"], "two rules")] * 12
        + [("decode", ["json"], "value is not valid JSON")] * 13
        + [("contract", ["currency:supported"], "bad currency")] * 10
        + [("dedupe", ["duplicate:conflict"], "event_id reused")] * 60
        + [("decision", ["decision:rejected_earlier"], "decided before")] * 60
    )
    verdict = judge(quarantine(*rows), 200, BreakerPolicy(percent=Decimal(10), min_records=5))
    # currency:supported 22 (11 %) trips; json 13 and sign 12 (6.5 %, 6 %) stay under 10 %;
    # 60 conflicts and 60 earlier decisions (30 % each) never trip it.
    assert [(c.rule, c.records) for c in verdict.tripped] == [("currency:supported", 22)]
    assert verdict.summary() == "currency:supported 11.0% (22 of 200 records)"


def test_the_message_names_the_rule_share_sample_and_what_to_do():
    rows = fx_rejects(30) + [("decode", ["avro_framing"], "value is not in Confluent Avro")] * 25
    with pytest.raises(CircuitBreakerOpenError) as raised:
        check_batch(BreakerPolicy(), quarantine(*rows), records(100), {}, run_id="run-42")
    message = str(raised.value)
    assert "rule reference:fx_rate rejected 30 of 100 records (30.0%)" in message
    assert "rule avro_framing rejected 25 of 100 records (25.0%)" in message
    assert "'no USD rate for EUR on 2026-03-01'" in message
    assert "load the missing day's FX rates" in message  # advice for the worst rule
    assert "billing-dagster release-batch run-42" in message
    assert "Nothing of the batch was committed" in message
    # A wrong encoding gets the format advice.
    framing = judge(quarantine(*rows[30:]), 100, BreakerPolicy())
    assert "BILLING_TOPIC_FORMATS" in framing.message("run-43")


@pytest.mark.parametrize("configured", [ValueFormat.AVRO, ValueFormat.JSON])
def test_a_topic_configured_with_the_wrong_encoding_holds_its_batch(configured: ValueFormat):
    """A JSON topic set to avro in BILLING_TOPIC_FORMATS, or an Avro topic set to json."""
    stream = SyntheticBillingStream(seed=70, invalid_rate=0.0, duplicate_rate=0.0)
    events = [r.event for r in stream.records(40) if r.event is not None]
    if configured is ValueFormat.AVRO:
        values = [e.to_json_bytes() for e in events]
    else:
        values = [frame_avro(1, AVRO_SCHEMA_V2, avro_record(e)) for e in events]
    batch = pl.DataFrame(
        {
            "kafka_topic": ["billing-events"] * len(values),
            "kafka_partition": [0] * len(values),
            "kafka_offset": list(range(len(values))),
            "kafka_timestamp": [datetime.now(UTC)] * len(values),
            "kafka_key": [b"k"] * len(values),
            "value": values,
        },
        schema=KAFKA_RECORD_SCHEMA,
    )
    decoded = decode_records(
        batch,
        value_format=configured,
        registry=SchemaRegistrySource("mock://wrong-format"),
        run_id="r",
        now=datetime.now(UTC),
    )
    assert decoded.quarantine.height == len(values)  # without the breaker: all quarantined
    with pytest.raises(CircuitBreakerOpenError, match="BILLING_TOPIC_FORMATS"):
        check_batch(BreakerPolicy(), decoded.quarantine, batch, {}, run_id="r")


def test_a_released_batch_is_judged_but_not_held():
    verdict = check_batch(
        BreakerPolicy(released=True), quarantine(*fx_rejects(50)), records(50), {}, run_id="r"
    )
    assert verdict.tripped and not verdict.holds


def test_offsets_an_earlier_attempt_decided_are_not_judged_again():
    """billing_events already holds the decision of offsets 0..39 (an attempt committed it,
    then died): the retry keeps it whatever the breaker would say now."""
    rows = quarantine(*fx_rejects(40))
    decided = {0: 40, 1: None}
    verdict = check_batch(BreakerPolicy(), rows, records(60), decided, run_id="r")
    assert verdict.records == 20 and not verdict.tripped
    with pytest.raises(CircuitBreakerOpenError):
        check_batch(BreakerPolicy(), rows, records(60), {0: 10}, run_id="r")


def test_held_runs_stay_open_until_a_later_ingest_run_succeeds():
    held = IngestRunOutcome("held-2", False, "reference:fx_rate 40.0% (80 of 200 records)")
    runs = [held, IngestRunOutcome("failed", False, None), IngestRunOutcome("h1", False, "x")]
    assert open_holds(runs) == {"held-2": held.held, "h1": "x"}
    assert open_holds([IngestRunOutcome("ok", True, None), *runs]) == {}
    assert open_holds([held, IngestRunOutcome("ok", True, None), runs[2]]) == {"held-2": held.held}

    alert = circuit_breaker_alert(open_holds([held]))
    assert alert.firing and alert.title == "Ingest Circuit Breaker Open"
    assert "run held-2: reference:fx_rate 40.0%" in alert.summary
    assert alert.runbook == "ingest-circuit-breaker.md"
    assert not circuit_breaker_alert({}).firing


def test_breaker_settings_flow_to_the_cleaning_context(tmp_path):
    for name, value in (
        ("BILLING_CIRCUIT_BREAKER_PERCENT", "five"),
        ("BILLING_CIRCUIT_BREAKER_PERCENT", "101"),
        ("BILLING_CIRCUIT_BREAKER_MIN_RECORDS", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})
    settings = load_settings(
        {
            "BILLING_CIRCUIT_BREAKER_PERCENT": "2.5",
            "BILLING_CIRCUIT_BREAKER_MIN_RECORDS": "50",
            "BILLING_LAKE_ROOT": str(tmp_path),
        }
    )
    resources = build_resources(settings)
    lake = resources["lake"].location()
    write_reference_data(lake, SyntheticBillingStream().reference_data(days=1))
    context = resources["billing_rules"].cleaning_context(lake, resources["kafka"].value_format(""))
    assert isinstance(context, CleaningContext)
    assert context.breaker == BreakerPolicy(percent=Decimal("2.5"), min_records=50)
    assert load_settings({}).circuit_breaker_pct == Decimal(5)


# ---- real servers: a missing FX day, then the day loaded, or a release ------------------

INGEST_TAGS = {INGEST_CONCURRENCY_TAG: "kafka"}


def without_recent_rates(reference: ReferenceData) -> ReferenceData:
    """The reference data with no FX rate for yesterday and today (UTC)."""
    cutoff = datetime.now(UTC).date() - timedelta(days=1)
    return ReferenceData.of(
        reference.customers,
        reference.subscriptions,
        reference.fx_rates.filter(pl.col("rate_date") < cutoff),
    )


def run(
    pipeline: Pipeline, request: dg.RunRequest, instance, **changes
) -> dg.ExecuteInProcessResult:
    """The run as the daemon would launch it, in the ingest lane (tags), in process."""
    return dg.materialize(
        [pipeline.asset],
        partition_key=changes.get("partition_key", request.partition_key),
        run_config=changes.get("run_config", request.run_config),
        tags={**INGEST_TAGS, **changes.get("tags", {})},
        resources=pipeline.resources,
        instance=instance,
        raise_on_error=False,
    )


def hold_a_batch(pipeline: Pipeline, instance, seed: int, count: int):
    """Traffic of a day whose FX rates are not loaded: the run holds the batch."""
    stream = SyntheticBillingStream(seed=seed, invalid_rate=0.0, duplicate_rate=0.0)
    full = stream.reference_data()
    write_reference_data(pipeline.lake, without_recent_rates(full))
    produced = list(stream.records(count))
    pipeline.produce(produced)
    (request,), cursor, _ = evaluate_sensor(pipeline, instance, None)
    result = run(pipeline, request, instance)
    assert not result.success
    return full, produced, request, cursor, result


def non_usd(records: list[GeneratedRecord]) -> int:
    return sum(1 for r in records if r.event is not None and r.event.currency != "USD")


def assert_nothing_committed(pipeline: Pipeline) -> None:
    for table in (RAW_TABLE, BILLING_EVENTS_TABLE, QUARANTINE_TABLE):
        assert read_table(pipeline.lake, table).is_empty(), table
    assert history_counts(pipeline.settings.postgres_url) == (0, 0)
    assert balances(pipeline.settings.postgres_url) == {}


def test_a_missing_fx_day_holds_the_batch_until_the_day_is_loaded(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    full, produced, request, cursor, held = hold_a_batch(pipeline, instance, seed=71, count=150)
    foreign = non_usd(produced)
    assert foreign >= 20, "the stream should hold enough non-USD events to trip the breaker"

    # Failed at once, not retried, with what tripped it and what to do.
    events = [e.event_type_value for e in held.all_events]
    assert "STEP_UP_FOR_RETRY" not in events
    (failure,) = held.get_step_failure_events()
    user_failure = failure.event_specific_data.user_failure_data
    message = user_failure.description
    share = (Decimal(foreign) * 100 / len(produced)).quantize(Decimal("0.1"))
    assert f"rule reference:fx_rate rejected {foreign} of {len(produced)} records ({share}%)" in (
        message
    )
    assert "no USD rate for" in message and "billing-dagster reference load" in message
    assert f"billing-dagster release-batch {held.run_id}" in message
    assert user_failure.metadata["rule"].value == "reference:fx_rate"
    assert_nothing_committed(pipeline)

    # Marked held (Dagster's run retries skip it), and the alert sees it.
    tags = instance.get_run_by_id(held.run_id).tags
    assert tags[BREAKER_TAG] == HELD and tags["dagster/retry_on_asset_or_op_failure"] == "false"
    assert held_batches(instance) == {held.run_id: tags[BREAKER_RULE_TAG]}
    assert circuit_breaker_alert(held_batches(instance)).firing

    # The FX day is loaded; the sensor requests the same offsets again and they go through.
    write_reference_data(pipeline.lake, full)
    (again,), _, _ = evaluate_sensor(pipeline, instance, cursor)
    assert request_ranges(again) == request_ranges(request)
    result = run(pipeline, again, instance)
    assert result.success
    metadata = materialization(result, "billing_events").metadata
    assert metadata["quarantined"].value == 0
    assert metadata["accepted"].value == len(produced)
    assert read_table(pipeline.lake, QUARANTINE_TABLE).is_empty()
    assert history_counts(pipeline.settings.postgres_url) == (len(produced), len(produced))
    assert held_batches(instance) == {}


def cli(env: dict[str, str], *args: str) -> Result:
    """The command line in process (as `billing-dagster ...` runs it, minus the start-up)."""
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_an_operator_releases_a_held_batch(
    pipeline: Pipeline,
    dagster_home: dict[str, str],  # noqa: F811 (the imported fixture)
    monkeypatch: pytest.MonkeyPatch,
):
    for name, value in dagster_home.items():
        monkeypatch.setenv(name, value)
    env = {**pipeline.env, **dagster_home}
    with dg.DagsterInstance.get() as instance:
        _, produced, request, _, held = hold_a_batch(pipeline, instance, seed=72, count=120)
        foreign = non_usd(produced)

        released = cli(env, "release-batch", held.run_id, "--json")
        assert released.exit_code == 0, released.output
        report = json.loads(released.stdout)
        assert report["released_run"] == held.run_id
        assert report["held_for"].startswith("reference:fx_rate")
        backfill = instance.get_backfill(report["backfill_id"])
        assert backfill.status.value == "REQUESTED"  # the daemon launches it from here
        assert backfill.tags[BREAKER_TAG] == RELEASE
        assert backfill.tags[RELEASED_RUN_TAG] == held.run_id
        assert backfill.tags[INGEST_CONCURRENCY_TAG] == "replay"
        # Queued in the held run's lane (this one, run in process, had none: every lane).
        assert backfill.tags["billing/lane"] == held.dagster_run.tags.get("billing/lane", "all")
        assert backfill.run_config == request.run_config  # exactly the held offsets
        targeted = backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
        # The held run's log hour only: refresh_revenue follows, as after any batch.
        assert {p.partition_key for p in targeted} == {request.partition_key}

        again = cli(env, "release-batch", held.run_id)
        assert again.exit_code == 2
        assert again.stderr.strip().splitlines() == [
            f"error: run {held.run_id} is already released by backfill "
            f"{report['backfill_id']} (REQUESTED)"
        ]

        # The run the backfill launches: the batch is committed, its rejects quarantined.
        result = run(
            pipeline,
            request,
            instance,
            partition_key=request.partition_key,
            run_config=backfill.run_config,
            tags=dict(backfill.tags),
        )
        assert result.success
        rejected = read_table(pipeline.lake, QUARANTINE_TABLE)
        rules = rejected["rules"].list.first()
        assert (rules == "reference:fx_rate").sum() == foreign
        # And refunds whose original payment was one of them (not accepted either).
        assert set(rules) <= {"reference:fx_rate", "refund:original_payment"}
        accepted = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
        assert accepted.height + rejected.height == len(produced)
        assert set(accepted["currency"]) == {"USD"}
        assert held_batches(instance) == {}
