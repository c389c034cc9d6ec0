import logging
from decimal import Decimal

from dagster import ConfigurableResource

from billing_dagster.notifiers import LogNotifier, Notifier, WebhookNotifier


class AlertingResource(ConfigurableResource):
    """Alert thresholds and where alerts go: the log always, a webhook when configured."""

    webhook_url: str | None = None
    runbook_base_url: str = "docs/runbooks/"
    #: Kafka Connect /connectors/<name>/status or Debezium Server /q/health; None: no CDC.
    cdc_status_url: str | None = None
    lag_threshold: int = 10_000
    #: "Ingest Stalled": minutes without lake progress while there is lag.
    stall_alert_minutes: int = 10
    #: A percentage as text, so it stays an exact decimal. The reconciliation tolerance is
    #: RevenueAnalyticsResource's: the alert fires where the asset check fails.
    validation_failure_percent: str = "0.01"

    def notifiers(self, logger: logging.Logger) -> list[Notifier]:
        notifiers: list[Notifier] = [LogNotifier(logger, self.runbook_base_url)]
        if self.webhook_url:
            notifiers.append(WebhookNotifier(self.webhook_url, self.runbook_base_url))
        return notifiers

    def validation_threshold_pct(self) -> Decimal:
        return Decimal(self.validation_failure_percent)
