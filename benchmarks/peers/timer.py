"""Wall-clock and CPU seconds of named stages, passed to each method's adapter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Timer:
    """Times the stages of one method's job: `with timer.stage("fit"): ...`.

    CPU seconds are the process's (`time.process_time`, all its threads), so with one thread a
    stage's CPU time below its wall time means it waited (e.g. for a core another job held).
    The job's totals are the sums over its stages; `measure` times a call outside the job.
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    @staticmethod
    def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """(fn(), wall seconds, CPU seconds), not counted in the job's stages."""
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - t, time.process_time() - c

    @property
    def total_s(self) -> float:
        return sum(self.wall.values())

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu.values())
