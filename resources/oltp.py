from dagster import ConfigurableResource

from billing_dagster.oltp import OLTP_SETTING


class OltpSourceResource(ConfigurableResource):
    """The OLTP billing database Debezium captures (BILLING_OLTP_URL), read for reconciliation."""

    url: str

    @property
    def setting(self) -> str:
        return OLTP_SETTING
