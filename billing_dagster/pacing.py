"""Writing generated items at a steady rate: the one pacing loop behind the synthetic
producer and the billing workload generator."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")


def run_at_rate(
    generate: Callable[[int], Iterable[Item]],
    write: Callable[[list[Item]], object],
    kind: Callable[[Item], str],
    *,
    rate: float,
    count: int | None = None,
    duration_s: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[Counter], None] = lambda _: None,
) -> Counter:
    """`rate` items a second, generated and written in ticks of 0.1 s, until `count` items
    or `duration_s` seconds; returns how many of each kind were written."""
    counts: Counter = Counter()
    started = time.monotonic()
    tick = 0.1
    while not should_stop():
        elapsed = time.monotonic() - started
        done = sum(counts.values())
        if (duration_s is not None and elapsed >= duration_s) or (
            count is not None and done >= count
        ):
            break
        due = int(rate * (elapsed + tick)) - done
        if count is not None:
            due = min(due, count - done)
        if due > 0:
            batch = list(generate(due))
            write(batch)
            counts.update(kind(item) for item in batch)
        on_progress(counts)
        time.sleep(max(0.0, tick - (time.monotonic() - started - elapsed)))
    return counts
