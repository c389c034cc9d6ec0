"""The machine a benchmark ran on, printed with its figures."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    with open("/proc/cpuinfo") as info:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in info if "model name" in line),
            platform.processor(),
        )
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"
