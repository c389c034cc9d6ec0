"""Settings from environment variables, read once at the edge and validated.

A wrong value stops with one line naming the variable, never a stack trace deep inside.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from billing_dagster.redaction import redacted


class ConfigError(ValueError):
    """A setting has a value the platform cannot use; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str
    topic: str
    consumer_group: str
    kafka_request_timeout_s: float
    lake_root: str
    s3_endpoint_url: str | None
    aws_region: str
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    s3_allow_http: bool
    sensor_interval_s: int
    max_records_per_run: int
    start_from: str
    partitions_start: str
    topic_formats: dict[str, str]
    schema_registry_url: str | None
    supported_currencies: tuple[str, ...]
    max_future_skew_s: int
    postgres_url: str
    late_event_watermark_s: float
    reconciliation_tolerance_pct: Decimal
    alert_webhook_url: str | None
    runbook_base_url: str
    cdc_status_url: str | None
    oltp_url: str | None
    lag_alert_threshold: int
    validation_alert_pct: Decimal
    alerts_interval_s: int
    dedupe_horizon_days: int
    #: The `dagster/max_runtime` of the ingest lane's runs: run monitoring fails a run
    #: stranded longer (its worker gone with the code server), freeing the lane.
    lane_max_runtime_s: int = 900
    #: Ingest lanes: the topic's partitions split into this many groups (partition modulo
    #: lanes), each ingested by its own run in parallel, one run in flight per lane.
    ingest_lanes: int = 2
    #: "Ingest Stalled": no lake progress for this long while there is lag.
    stall_alert_minutes: int = 10
    #: The ingest circuit breaker: one rule failing more than this percent of a batch,
    #: and at least `circuit_breaker_min_records` records, holds the batch.
    circuit_breaker_pct: Decimal = Decimal(5)
    circuit_breaker_min_records: int = 20
    #: Contract limits (rules.ContractLimits): a longer event_id, larger metadata or a
    #: larger record value is quarantined (the record before any decoding).
    max_event_id_length: int = 128
    max_metadata_bytes: int = 64 * 1024
    max_record_bytes: int = 1024 * 1024
    #: How often the revenue refresh sensor looks for billing_events versions the
    #: aggregates do not reflect yet (one refresh run takes every batch since the last).
    revenue_refresh_interval_s: int = 5


def _int(
    env: Mapping[str, str],
    name: str,
    default: int,
    minimum: int = 1,
    maximum: int | None = None,
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got '{raw}'") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got '{raw}'") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            f"{name} must be {'zero or more' if allow_zero else 'positive'}, got {raw}"
        )
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got '{raw}'")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got '{raw}'")
    return raw


def _bootstrap(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    for server in raw.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{name} must be host:port[,host:port...], got '{raw}'")
    return raw


def _lake_root(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if "://" in raw:
        if not raw.startswith(("s3://", "s3a://", "file://")):
            raise ConfigError(f"{name} must be a local path or an s3:// URI, got '{redacted(raw)}'")
        return raw
    return str(Path(raw).expanduser().resolve())


def _partitions_start(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    try:
        datetime.strptime(raw, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"{name} must be a date like 2024-01-01, got '{raw}'") from None
    return raw


VALUE_FORMATS = ("json", "avro", "debezium-json")


def _topic_formats(env: Mapping[str, str], name: str, topic: str) -> dict[str, str]:
    """`topic=format,...`; a bare `format` applies to BILLING_TOPIC."""
    raw = env.get(name, "").strip()
    formats: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.rpartition("=")
        key, value = (key.strip(), value.strip().lower()) if sep else (topic, item.lower())
        if not key or value not in VALUE_FORMATS:
            raise ConfigError(
                f"{name} must be topic=format pairs with format one of "
                f"{', '.join(VALUE_FORMATS)}, got '{raw}'"
            )
        formats[key] = value
    return formats


def _currencies(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    from billing_dagster.rules import CURRENCY_PATTERN, DEFAULT_SUPPORTED_CURRENCIES

    raw = env.get(name, "").strip()
    if not raw:
        return DEFAULT_SUPPORTED_CURRENCIES
    codes = tuple(code.strip().upper() for code in raw.split(",") if code.strip())
    bad = [c for c in codes if not re.fullmatch(CURRENCY_PATTERN, c)]
    if bad or not codes:
        raise ConfigError(
            f"{name} must be comma-separated ISO 4217 codes like USD,EUR, got '{raw}'"
        )
    return codes


def _postgres_url(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip() or "postgresql://billing@127.0.0.1:5432/billing"
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"{name} must be a postgresql://user@host:port/database URL, got '{redacted(raw)}'"
        )
    return raw


def _optional_postgres_url(env: Mapping[str, str], name: str) -> str | None:
    return _postgres_url(env, name) if env.get(name, "").strip() else None


def _percent(env: Mapping[str, str], name: str, default: str) -> Decimal:
    raw = env.get(name, "").strip() or default
    try:
        value = Decimal(raw.rstrip("%"))
    except InvalidOperation:
        raise ConfigError(f"{name} must be a percentage like {default}, got '{raw}'") from None
    if not value.is_finite() or value < 0 or value > 100:
        raise ConfigError(f"{name} must be between 0 and 100 (percent), got '{raw}'")
    return value


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if raw and not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s):// URL, got '{redacted(raw)}'")
    return raw or None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    topic = env.get("BILLING_TOPIC", "").strip() or "billing-events"
    formats = _topic_formats(env, "BILLING_TOPIC_FORMATS", topic)
    registry = env.get("BILLING_SCHEMA_REGISTRY_URL", "").strip() or None
    if registry and not registry.startswith(("http://", "https://", "mock://")):
        raise ConfigError(
            "BILLING_SCHEMA_REGISTRY_URL must be an http(s):// or mock:// URL, "
            f"got '{redacted(registry)}'"
        )
    if "avro" in formats.values() and not registry:
        raise ConfigError(
            "BILLING_TOPIC_FORMATS names an avro topic, so BILLING_SCHEMA_REGISTRY_URL must be set"
        )
    return Settings(
        kafka_bootstrap_servers=_bootstrap(
            env, "BILLING_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"
        ),
        topic=topic,
        consumer_group=env.get("BILLING_CONSUMER_GROUP", "").strip() or "billing-dagster",
        kafka_request_timeout_s=_float(env, "BILLING_KAFKA_TIMEOUT_SECONDS", 10.0),
        lake_root=_lake_root(env, "BILLING_LAKE_ROOT", "./.lake"),
        s3_endpoint_url=env.get("BILLING_S3_ENDPOINT_URL", "").strip() or None,
        aws_region=env.get("AWS_REGION", "").strip() or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        s3_allow_http=_bool(env, "BILLING_S3_ALLOW_HTTP", False),
        sensor_interval_s=_int(env, "BILLING_SENSOR_INTERVAL_SECONDS", 2),
        max_records_per_run=_int(env, "BILLING_MAX_RECORDS_PER_RUN", 500_000),
        start_from=_choice(env, "BILLING_START_FROM", "earliest", ("earliest", "latest")),
        partitions_start=_partitions_start(env, "BILLING_PARTITIONS_START", "2024-01-01"),
        topic_formats=formats,
        schema_registry_url=registry,
        supported_currencies=_currencies(env, "BILLING_SUPPORTED_CURRENCIES"),
        max_future_skew_s=_int(env, "BILLING_MAX_FUTURE_SKEW_SECONDS", 900),
        postgres_url=_postgres_url(env, "BILLING_POSTGRES_URL"),
        late_event_watermark_s=_float(
            env, "BILLING_LATE_EVENT_WATERMARK_SECONDS", 5.0, allow_zero=True
        ),
        reconciliation_tolerance_pct=_percent(
            env, "BILLING_RECONCILIATION_TOLERANCE_PERCENT", "0.1"
        ),
        alert_webhook_url=_http_url(env, "BILLING_ALERT_WEBHOOK_URL"),
        runbook_base_url=env.get("BILLING_RUNBOOK_BASE_URL", "").strip() or "docs/runbooks/",
        cdc_status_url=_http_url(env, "BILLING_CDC_STATUS_URL"),
        oltp_url=_optional_postgres_url(env, "BILLING_OLTP_URL"),
        lag_alert_threshold=_int(env, "BILLING_LAG_ALERT_THRESHOLD", 10_000),
        validation_alert_pct=_percent(env, "BILLING_VALIDATION_ALERT_PERCENT", "0.01"),
        alerts_interval_s=_int(env, "BILLING_ALERTS_INTERVAL_SECONDS", 30),
        dedupe_horizon_days=_int(env, "BILLING_DEDUPE_HORIZON_DAYS", 7),
        lane_max_runtime_s=_int(env, "BILLING_LANE_MAX_RUNTIME_SECONDS", 900, minimum=10),
        ingest_lanes=_int(env, "BILLING_INGEST_LANES", 2, maximum=64),
        stall_alert_minutes=_int(env, "BILLING_STALL_ALERT_MINUTES", 10),
        circuit_breaker_pct=_percent(env, "BILLING_CIRCUIT_BREAKER_PERCENT", "5"),
        circuit_breaker_min_records=_int(env, "BILLING_CIRCUIT_BREAKER_MIN_RECORDS", 20),
        max_event_id_length=_int(env, "BILLING_MAX_EVENT_ID_LENGTH", 128, minimum=36),
        max_metadata_bytes=_int(env, "BILLING_MAX_METADATA_BYTES", 64 * 1024),
        max_record_bytes=_int(env, "BILLING_MAX_RECORD_BYTES", 1024 * 1024, minimum=1024),
        revenue_refresh_interval_s=_int(env, "BILLING_REVENUE_REFRESH_INTERVAL_SECONDS", 5),
    )
