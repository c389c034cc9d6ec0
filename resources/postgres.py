from dagster import ConfigurableResource

from billing_dagster.postgres_db import migrate


class PostgresServingResource(ConfigurableResource):
    """The Postgres analytics database: customer_balances, transaction_history, ledger."""

    url: str = "postgresql://billing@127.0.0.1:5432/billing"

    def ensure_migrated(self) -> list[str]:
        """Apply pending migrations (cheap when there are none; safe to repeat)."""
        return migrate(self.url)
