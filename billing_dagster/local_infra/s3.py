"""An S3 endpoint on loopback (moto's ThreadedMotoServer) for `s3://` lakes in tests."""

from __future__ import annotations

from billing_dagster.local_infra.process import InfraError, LocalServer, free_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class MotoS3(LocalServer):
    def __init__(self) -> None:
        self.port = free_port()
        self._server = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise InfraError("moto is not installed: pip install -e '.[dev]'") from None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
