"""Where a micro-batch spends its time: named laps, reported in run metadata and read by
the benchmarks."""

from __future__ import annotations

import time


class PhaseClock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to `name` (adding up repeated names)."""
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
