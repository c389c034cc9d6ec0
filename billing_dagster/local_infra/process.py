from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[2]


class InfraError(RuntimeError):
    """A local server could not be started; the message says what to do."""


class LocalServer:
    """A server that `with` starts and stops; subclasses define start() and stop()."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_on_sigterm() -> None:
    """Make SIGTERM interrupt like Ctrl-C, so `with`/`finally` clean-up stops every server
    a command, the demo or the test session started."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise InfraError(
                f"{what} exited with code {process.returncode}:\n{tail(log) if log else ''}"
            )
        try:
            if ready():
                return
        except Exception:  # a server that is still starting may refuse or reset
            pass
        time.sleep(0.2)
    raise InfraError(
        f"{what} did not become ready in {timeout_s:.0f}s:\n{tail(log) if log else ''}"
    )


def stop_process(process: subprocess.Popen | None, timeout_s: float = 20.0) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)


def _die_with_parent() -> None:
    # Linux PR_SET_PDEATHSIG: the server gets SIGTERM if whoever started it dies, even by
    # SIGKILL, so an interrupted test run or demo never leaves a broker behind.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)


def spawn(command: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server in its own process group, so stopping it stops its children too."""
    handle = log.open("ab")
    return subprocess.Popen(
        command,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def wait_for_broker(
    bootstrap_servers: str,
    *,
    what: str,
    process: subprocess.Popen,
    log: Path,
    timeout_s: float,
) -> None:
    """Wait until a Kafka-protocol broker answers a metadata request with itself."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    wait_until(
        lambda: len(admin.list_topics(timeout=2).brokers) > 0,
        what=f"{what} on {bootstrap_servers}",
        timeout_s=timeout_s,
        process=process,
        log=log,
    )
