"""billing_alerts_sensor against real Kafka, the lake, the Dagster event log and a real
webhook receiver on loopback: each alert fires on its condition, once, and resolves."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

import dagster as dg
import pytest

from billing_dagster.alert_state import dump_sensor_state, load_sensor_state
from billing_dagster.synthetic import SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .http_endpoint import Endpoint, connect_status
from .test_reconciliation import lone_small_payments, reconcile, run_ingest


def notifications(endpoint: Endpoint) -> dict[str, str]:
    """{alert: status} of the webhook posts received since the last call."""
    posts, endpoint.posts[:] = list(endpoint.posts), []
    return {body["alert"]: body["status"] for _, body, _ in posts}


@pytest.fixture
def alerting_pipeline(kafka, topic, lake_root, serving_url, endpoint: Endpoint) -> Pipeline:
    endpoint.reply = connect_status("RUNNING")
    return Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_ALERT_WEBHOOK_URL=f"{endpoint.url}/hooks/billing",
            BILLING_CDC_STATUS_URL=f"{endpoint.url}/connectors/billing-cdc/status",
            BILLING_RUNBOOK_BASE_URL="https://runbooks.example/billing/",
            BILLING_LAG_ALERT_THRESHOLD="1000",
        )
    )


class AlertsSensor:
    def __init__(self, pipeline: Pipeline, instance: dg.DagsterInstance) -> None:
        self.pipeline, self.instance, self.cursor = pipeline, instance, None
        self.sensor = pipeline.defs.resolve_sensor_def("billing_alerts_sensor")

    def tick(self) -> str:
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=self.pipeline.resources
        )
        result = self.sensor(context)
        self.cursor = context.cursor
        return result.skip_message


def test_each_alert_fires_on_its_condition_once_and_resolves(
    alerting_pipeline: Pipeline, endpoint: Endpoint
):
    pipeline = alerting_pipeline
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        assert sensor.tick() == "all alerts quiet"
        assert notifications(endpoint) == {}

        # 1,500 records waiting, threshold 1,000: lag fires, with a runbook link.
        stream = SyntheticBillingStream(seed=3, invalid_rate=0.0, duplicate_rate=0.0)
        pipeline.produce(list(stream.records(1_500)))
        assert "High Billing Event Lag" in sensor.tick()
        ((_, post, _),) = endpoint.posts
        assert post["runbook"].startswith("https://runbooks.example/billing/")
        assert notifications(endpoint) == {"consumer_lag": "firing"}
        sensor.tick()
        assert notifications(endpoint) == {}  # still firing: no second notification

        # Processed: lag resolves. All valid: the validation rate stays quiet.
        run_ingest(pipeline, instance)
        assert sensor.tick() == "all alerts quiet"
        assert notifications(endpoint) == {"consumer_lag": "resolved"}

        # 1 invalid record in 101 (0.99 % > 0.01 %) within 5 minutes: fires.
        dirty = SyntheticBillingStream(seed=4, invalid_rate=0.01, duplicate_rate=0.0)
        records = list(dirty.records(100))
        if not any(r.kind == "invalid" for r in records):
            records.append(next(r for r in dirty.records(1_000) if r.kind == "invalid"))
        pipeline.produce(records)
        run_ingest(pipeline, instance)
        assert "validation" in sensor.tick().lower()
        assert notifications(endpoint) == {"validation_failure_rate": "firing"}

        # The connector fails: fires; recovers: resolves.
        endpoint.reply = connect_status("FAILED")
        sensor.tick()
        assert notifications(endpoint) == {"cdc_connector_down": "firing"}
        endpoint.reply = connect_status("RUNNING")
        sensor.tick()
        assert notifications(endpoint) == {"cdc_connector_down": "resolved"}


def test_reconciliation_mismatch_alert(pipeline: Pipeline, endpoint: Endpoint):
    from deltalake import DeltaTable

    from billing_dagster.contract import BILLING_EVENTS_TABLE

    from .test_reconciliation import a_day_of_events

    env = {**pipeline.env, "BILLING_ALERT_WEBHOOK_URL": endpoint.url}
    pipeline = Pipeline(env)
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        pipeline.produce(a_day_of_events(200))
        run_ingest(pipeline, instance)
        assert reconcile(pipeline, instance).success
        sensor.tick()
        assert "reconciliation_mismatch" not in notifications(endpoint)

        some = lone_small_payments(pipeline)[0]
        DeltaTable(pipeline.lake.table_uri(BILLING_EVENTS_TABLE)).delete(
            f"event_id = '{some['event_id']}'"
        )
        from billing_dagster.aggregates import refresh_aggregates

        refresh_aggregates(pipeline.lake)
        reconcile(pipeline, instance)
        assert "Revenue Reconciliation Mismatch" in sensor.tick()
        assert notifications(endpoint).get("reconciliation_mismatch") == "firing"


def _lose_last_batch(url: str, topic: str) -> None:
    """What a restore from backup, a failover to a lagging replica or a commit lost to a
    crash leave behind: the last batch's history, balance changes and marks gone."""
    import psycopg2

    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT offset_ranges FROM balance_batches WHERE topic = %s AND events_applied > 0 "
            "ORDER BY applied_at DESC LIMIT 1",
            (topic,),
        )
        (ranges,) = cursor.fetchone()
        for r in ranges:
            cursor.execute(
                "WITH gone AS (DELETE FROM transaction_history WHERE kafka_topic = %s "
                "AND kafka_partition = %s AND kafka_offset >= %s AND kafka_offset < %s "
                "RETURNING customer_id, amount_usd) "
                "UPDATE customer_balances AS b SET current_balance = b.current_balance - g.total "
                "FROM (SELECT customer_id, sum(amount_usd) AS total FROM gone GROUP BY 1) AS g "
                "WHERE b.customer_id = g.customer_id",
                (topic, r["partition"], r["start"], r["end"]),
            )
            cursor.execute(
                "UPDATE balance_offsets SET next_offset = %s "
                "WHERE topic = %s AND kafka_partition = %s",
                (r["start"], topic, r["partition"]),
            )


def test_balances_behind_lake_and_broken_invariants_alert(
    alerting_pipeline: Pipeline, endpoint: Endpoint
):
    import psycopg2

    pipeline = alerting_pipeline
    url, topic = pipeline.settings.postgres_url, pipeline.settings.topic
    invariants = pipeline.defs.resolve_job_def("check_serving_invariants")
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        stream = SyntheticBillingStream(seed=5, invalid_rate=0.0, duplicate_rate=0.0)
        pipeline.produce(list(stream.records(300)))
        run_ingest(pipeline, instance)
        assert invariants.execute_in_process(instance=instance).success
        assert sensor.tick() == "all alerts quiet"
        notifications(endpoint)

        # Postgres loses the last batch: the alert names the offsets it is missing.
        _lose_last_batch(url, topic)
        assert "Balances Behind Lake" in sensor.tick()
        (post,) = [body for _, body, _ in endpoint.posts if body["alert"] == "serving_behind_lake"]
        assert post["status"] == "firing" and "behind the lake" in post["summary"]
        notifications(endpoint)
        # The next sensor tick repairs it from billing_events; the alert stays up for the
        # repair window, now naming the re-applied range, then the invariants hold.
        run_ingest(pipeline, instance)
        assert "Balances Behind Lake" in sensor.tick()
        assert invariants.execute_in_process(instance=instance).success

        # A balance edited behind the pipeline's back breaks an invariant: it alerts.
        with psycopg2.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute(
                "UPDATE customer_balances SET current_balance = current_balance + 0.01 "
                "WHERE customer_id = (SELECT min(customer_id) FROM customer_balances)"
            )
        result = invariants.execute_in_process(instance=instance, raise_on_error=False)
        failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
        assert [e.check_name for e in failed] == ["balances_equal_history"]
        assert "Serving Invariant Broken" in sensor.tick()
        assert notifications(endpoint)["serving_invariant_broken"] == "firing"


def test_alerts_are_delivered_at_least_once_and_no_log_shows_the_webhook_token(
    kafka, topic, lake_root, serving_url, endpoint: Endpoint, capfd
):
    secret = f"tok{uuid.uuid4().hex}"
    pipeline = Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_ALERT_WEBHOOK_URL=f"{endpoint.url}/hooks/{secret}?token={secret}",
            BILLING_LAG_ALERT_THRESHOLD="100",
        )
    )
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        assert sensor.tick() == "all alerts quiet"
        stream = SyntheticBillingStream(seed=7, invalid_rate=0.0, duplicate_rate=0.0)
        pipeline.produce(list(stream.records(200)))

        # The webhook answers 500: the page stays pending, and goes on the next tick.
        endpoint.post_statuses = [500]
        assert "High Billing Event Lag" in sensor.tick()
        assert [(b["alert"], b["status"], code) for _, b, code in endpoint.rejected] == [
            ("consumer_lag", "firing", 500)
        ]
        assert notifications(endpoint) == {}
        assert load_sensor_state(sensor.cursor).delivered["consumer_lag"] is False
        sensor.tick()
        assert notifications(endpoint) == {"consumer_lag": "firing"}
        sensor.tick()
        assert notifications(endpoint) == {}  # delivered: once

        # The lake has not moved for 20 minutes while records wait: "Ingest Stalled".
        state = load_sensor_state(sensor.cursor)
        earlier = replace(state.progress, since=state.progress.since - timedelta(minutes=20))
        sensor.cursor = dump_sensor_state(replace(state, progress=earlier))
        assert "Ingest Stalled" in sensor.tick()
        (post,) = [body for _, body, _ in endpoint.posts if body["alert"] == "ingest_stalled"]
        assert post["runbook"].endswith("ingest-stalled.md") and "20 min" in post["summary"]
        notifications(endpoint)

        # Processed: both resolve; the first resolution's delivery fails and is retried.
        run_ingest(pipeline, instance)
        endpoint.post_statuses = [500]
        assert sensor.tick() == "all alerts quiet"
        assert notifications(endpoint) == {"ingest_stalled": "resolved"}
        sensor.tick()
        assert notifications(endpoint) == {"consumer_lag": "resolved"}
        sensor.tick()
        assert notifications(endpoint) == {}

    # The sensor's log (its console output, also kept with each tick by the daemon).
    logged = capfd.readouterr()
    failures = [line for line in logged.err.splitlines() if "stays pending" in line]
    assert len(failures) == 2 and all("HTTP 500" in line for line in failures), logged.err
    assert secret not in logged.err + logged.out
    assert all(secret not in str(body) for _, body, _ in endpoint.posts + endpoint.rejected)
