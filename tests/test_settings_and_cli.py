"""User mistakes give one clear line naming the setting, and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from billing_dagster.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"BILLING_SENSOR_INTERVAL_SECONDS": "soon"}, "BILLING_SENSOR_INTERVAL_SECONDS"),
        ({"BILLING_MAX_RECORDS_PER_RUN": "0"}, "BILLING_MAX_RECORDS_PER_RUN"),
        ({"BILLING_KAFKA_BOOTSTRAP_SERVERS": "localhost"}, "BILLING_KAFKA_BOOTSTRAP_SERVERS"),
        ({"BILLING_LAKE_ROOT": "gs://bucket/lake"}, "BILLING_LAKE_ROOT"),
        ({"BILLING_S3_ALLOW_HTTP": "maybe"}, "BILLING_S3_ALLOW_HTTP"),
        ({"BILLING_START_FROM": "middle"}, "BILLING_START_FROM"),
        ({"BILLING_PARTITIONS_START": "2024/01/01"}, "BILLING_PARTITIONS_START"),
        (
            {"BILLING_RECONCILIATION_TOLERANCE_PERCENT": "a little"},
            "BILLING_RECONCILIATION_TOLERANCE_PERCENT",
        ),
        ({"BILLING_RECONCILIATION_TOLERANCE_PERCENT": "-1"}, "BILLING_RECONCILIATION_TOLERANCE"),
        ({"BILLING_LATE_EVENT_WATERMARK_SECONDS": "-5"}, "BILLING_LATE_EVENT_WATERMARK_SECONDS"),
        ({"BILLING_ALERT_WEBHOOK_URL": "hooks.example/x"}, "BILLING_ALERT_WEBHOOK_URL"),
        ({"BILLING_CDC_STATUS_URL": "localhost:8083"}, "BILLING_CDC_STATUS_URL"),
        ({"BILLING_OLTP_URL": "mysql://db/billing"}, "BILLING_OLTP_URL"),
        ({"BILLING_LAG_ALERT_THRESHOLD": "many"}, "BILLING_LAG_ALERT_THRESHOLD"),
        ({"BILLING_VALIDATION_ALERT_PERCENT": "NaN"}, "BILLING_VALIDATION_ALERT_PERCENT"),
    ],
)
def test_bad_setting_is_named(env, names):
    with pytest.raises(ConfigError, match=names):
        load_settings(env)


def test_defaults_need_no_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({})
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.topic == "billing-events"
    assert settings.lake_root == str(tmp_path / ".lake")
    assert settings.sensor_interval_s == 2
    assert settings.late_event_watermark_s == 5.0
    assert str(settings.reconciliation_tolerance_pct) == "0.1"
    assert settings.oltp_url is None  # no CDC: no OLTP reconciliation asset
    assert load_settings({"BILLING_LATE_EVENT_WATERMARK_SECONDS": "0"}).late_event_watermark_s == 0


def run_cli(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "billing_dagster.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout_s,
    )


def test_cli_reports_bad_config_in_one_line():
    result = run_cli("produce", "--count", "1", BILLING_KAFKA_BOOTSTRAP_SERVERS="nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: BILLING_KAFKA_BOOTSTRAP_SERVERS must be host:port[,host:port...], got 'nope'"
    ]


def test_cli_reports_unreachable_broker_in_one_line(kafka):
    from billing_dagster.local_infra.process import free_port

    result = run_cli(
        "produce",
        "--count",
        "1",
        BILLING_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        BILLING_KAFKA_TIMEOUT_SECONDS="3",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach Kafka" in errors[0]
    assert "Traceback" not in result.stderr


def test_cli_produces_to_real_kafka(kafka, topic):
    result = run_cli(
        "produce",
        "--count",
        "400",
        "--rate",
        "4000",
        BILLING_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BILLING_TOPIC=topic,
    )
    assert result.returncode == 0, result.stderr
    assert "produced 400 records" in result.stdout
    from billing_dagster.kafka_io import KafkaClient, KafkaSettings

    with KafkaClient(KafkaSettings(kafka.bootstrap_servers)) as client:
        ends = client.end_offsets(topic)
    assert sum(ends.values()) == 400
    assert sum(1 for e in ends.values() if e) > 12  # keyed by customer over 24 partitions

    as_json = run_cli(
        "produce",
        "--count",
        "50",
        "--rate",
        "4000",
        "--json",
        BILLING_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BILLING_TOPIC=topic,
    )
    report = json.loads(as_json.stdout)
    assert (
        report["records"] == 50 == sum(report.get(k, 0) for k in ("valid", "duplicate", "invalid"))
    )


def test_cli_loads_reference_tables_from_csv(tmp_path):
    from decimal import Decimal

    import polars as pl

    (tmp_path / "customers.csv").write_text("customer_id,customer_tier\n7,enterprise\n8,growth\n")
    (tmp_path / "subscriptions.csv").write_text(
        "subscription_id,customer_id,plan,started_at\ns-7,7,pro,2026-01-01T00:00:00Z\n"
    )
    (tmp_path / "fx.csv").write_text("rate_date,currency,usd_rate\n2026-11-24,EUR,1.08345\n")
    lake = tmp_path / "lake"
    args = [
        "reference",
        "load",
        "--customers",
        str(tmp_path / "customers.csv"),
        "--subscriptions",
        str(tmp_path / "subscriptions.csv"),
        "--fx-rates",
        str(tmp_path / "fx.csv"),
    ]
    result = run_cli(*args, BILLING_LAKE_ROOT=str(lake))
    assert result.returncode == 0, result.stderr
    assert "loaded 2 customers, 1 subscriptions, 1 FX rates" in result.stdout
    rates = pl.read_delta(str(lake / "reference" / "fx_rates"))
    assert rates["usd_rate"].to_list() == [Decimal("1.08345000")]

    (tmp_path / "fx.csv").write_text("rate_date,currency,usd_rate\n2026-11-24,EUR,about one\n")
    bad = run_cli(*args, BILLING_LAKE_ROOT=str(lake))
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and "fx.csv" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
