"""Helpers several commands share: the lake, the Kafka client and topic, JSON output and
the progress bar of the data generators."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from billing_dagster.kafka_io import KafkaUnavailableError, ensure_topic
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    from billing_dagster.delta_lake import LakeLocation
    from billing_dagster.kafka_io import KafkaClient
    from billing_dagster.settings import Settings

F = TypeVar("F", bound=Callable[..., object])


def lake_location() -> LakeLocation:
    """The lake the settings point at, as the pipeline's resource sees it."""
    # Imported here: the Dagster definitions are slow to import and `--help` needs none.
    from billing_dagster.definitions import build_resources

    return build_resources(load_settings())["lake"].location()


def kafka_client(settings: Settings) -> KafkaClient:
    """A Kafka client configured as the pipeline's resource is (use it as a context manager)."""
    from billing_dagster.definitions import build_resources

    return build_resources(settings)["kafka"].client()


def ensure_billing_topic(settings: Settings) -> None:
    """Create BILLING_TOPIC (24 partitions) when missing; an unreachable Kafka is a user error."""
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


def echo_json(report: dict[str, object]) -> None:
    import json

    click.echo(json.dumps(report, indent=2, default=str))


class Progress:
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

    def __enter__(self) -> Progress:
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


def until_options(unit: str) -> Callable[[F], F]:
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
