from dagster import ConfigurableResource

from billing_dagster.delta_lake import LakeLocation


class DeltaLakeResource(ConfigurableResource):
    """The Delta lake: a local folder, or s3://bucket/prefix (any S3-compatible endpoint)."""

    root: str = "./.lake"
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    s3_allow_http: bool = False

    def location(self) -> LakeLocation:
        options: dict[str, str] = {}
        if self.root.startswith(("s3://", "s3a://")):
            options["AWS_REGION"] = self.aws_region
            if self.s3_endpoint_url:
                options["AWS_ENDPOINT_URL"] = self.s3_endpoint_url
            if self.aws_access_key_id and self.aws_secret_access_key:
                options["AWS_ACCESS_KEY_ID"] = self.aws_access_key_id
                options["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_access_key
            if self.s3_allow_http:
                options["AWS_ALLOW_HTTP"] = "true"
        return LakeLocation(root=self.root, storage_options=options)
