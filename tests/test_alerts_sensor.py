"""billing_alerts_sensor against real Kafka, the lake, the Dagster event log and a real
webhook receiver on loopback: each alert fires on its condition, once, and resolves."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from billing_dagster.synthetic import SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .test_reconciliation import reconcile, run_ingest


class Receiver:
    """A webhook endpoint and a fake-free CDC status endpoint, over real HTTP."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.connector_state = "RUNNING"
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                state = receiver.connector_state
                body = json.dumps(
                    {
                        "name": "billing-cdc",
                        "connector": {"state": state, "worker_id": "127.0.0.1:8083"},
                        "tasks": [{"id": 0, "state": state, "worker_id": "127.0.0.1:8083"}],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> dict[str, str]:
        """{alert: status} of the notifications received since the last take."""
        posts, self.posts = self.posts, []
        return {p["alert"]: p["status"] for p in posts}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def alerting_pipeline(kafka, topic, lake_root, serving_url, receiver: Receiver) -> Pipeline:
    return Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_ALERT_WEBHOOK_URL=f"{receiver.url}/hooks/billing",
            BILLING_CDC_STATUS_URL=f"{receiver.url}/connectors/billing-cdc/status",
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
    alerting_pipeline: Pipeline, receiver: Receiver
):
    pipeline = alerting_pipeline
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        assert sensor.tick() == "all alerts quiet"
        assert receiver.take() == {}

        # 1,500 records waiting, threshold 1,000: lag fires, with a runbook link.
        stream = SyntheticBillingStream(seed=3, invalid_rate=0.0, duplicate_rate=0.0)
        pipeline.produce(list(stream.records(1_500)))
        assert "High Billing Event Lag" in sensor.tick()
        (post,) = receiver.posts
        assert post["runbook"].startswith("https://runbooks.example/billing/")
        assert receiver.take() == {"consumer_lag": "firing"}
        sensor.tick()
        assert receiver.take() == {}  # still firing: no second notification

        # Processed: lag resolves. All valid: the validation rate stays quiet.
        run_ingest(pipeline, instance)
        assert sensor.tick() == "all alerts quiet"
        assert receiver.take() == {"consumer_lag": "resolved"}

        # 1 invalid record in 101 (0.99 % > 0.01 %) within 5 minutes: fires.
        dirty = SyntheticBillingStream(seed=4, invalid_rate=0.01, duplicate_rate=0.0)
        records = list(dirty.records(100))
        if not any(r.kind == "invalid" for r in records):
            records.append(next(r for r in dirty.records(1_000) if r.kind == "invalid"))
        pipeline.produce(records)
        run_ingest(pipeline, instance)
        assert "validation" in sensor.tick().lower()
        assert receiver.take() == {"validation_failure_rate": "firing"}

        # The connector fails: fires; recovers: resolves.
        receiver.connector_state = "FAILED"
        sensor.tick()
        assert receiver.take() == {"cdc_connector_down": "firing"}
        receiver.connector_state = "RUNNING"
        sensor.tick()
        assert receiver.take() == {"cdc_connector_down": "resolved"}


def test_reconciliation_mismatch_alert(pipeline: Pipeline, receiver: Receiver, kafka, topic):
    from deltalake import DeltaTable

    from billing_dagster.contract import BILLING_EVENTS_TABLE
    from billing_dagster.delta_lake import read_table

    from .test_reconciliation import a_day_of_events

    env = {**pipeline.env, "BILLING_ALERT_WEBHOOK_URL": receiver.url}
    pipeline = Pipeline(env)
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        pipeline.produce(a_day_of_events(200))
        run_ingest(pipeline, instance)
        assert reconcile(pipeline, instance).success
        sensor.tick()
        assert "reconciliation_mismatch" not in receiver.take()

        some = read_table(pipeline.lake, BILLING_EVENTS_TABLE).row(0, named=True)
        DeltaTable(pipeline.lake.table_uri(BILLING_EVENTS_TABLE)).delete(
            f"event_id = '{some['event_id']}'"
        )
        from billing_dagster.aggregates import refresh_aggregates

        refresh_aggregates(pipeline.lake)
        reconcile(pipeline, instance)
        assert "Revenue Reconciliation Mismatch" in sensor.tick()
        assert receiver.take().get("reconciliation_mismatch") == "firing"
