"""`billing-dagster`: the operator's command line.

This module holds the `main` group and its error handling; each command lives in the
module of its concern and is registered here:

- streams: produce, workload, cdc, demo (feeding the pipeline)
- reference: the `reference` group (reference tables)
- revenue: aggregate, reconcile, report (the revenue figures)
- operations: status, migrate (the pipeline's state)
- reprocessing: replay, backfill (Dagster backfills over past data)
- topics: the `topic` group (adopt a recreated topic, acknowledge lost offsets)
- release: release-batch (a batch the circuit breaker held)
"""

from __future__ import annotations

import sys

import click

from billing_dagster.cli.operations import migrate, status
from billing_dagster.cli.reference import reference
from billing_dagster.cli.release import release_batch
from billing_dagster.cli.reprocessing import backfill, replay
from billing_dagster.cli.revenue import aggregate, reconcile, report
from billing_dagster.cli.streams import cdc, demo, produce, workload
from billing_dagster.cli.topics import topic
from billing_dagster.enrichment import ReferenceDataError
from billing_dagster.kafka_io import KafkaUnavailableError
from billing_dagster.local_infra.process import InfraError
from billing_dagster.offsets import TopicResetError
from billing_dagster.operations import OperationError
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.settings import ConfigError

__all__ = ["USER_ERRORS", "BillingGroup", "main"]

USER_ERRORS = (
    ConfigError,
    OperationError,
    InfraError,
    KafkaUnavailableError,
    ReferenceDataError,
    ServingUnavailableError,
    TopicResetError,
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


# `--help` lists commands sorted by name, so the order here is only for the reader.
for _command in (
    produce,
    workload,
    cdc,
    demo,
    reference,
    migrate,
    aggregate,
    reconcile,
    report,
    status,
    replay,
    backfill,
    topic,
    release_batch,
):
    main.add_command(_command)
