"""Statistics of every run of a build, kept in build.json so that a build killed and resumed
reports all of its runs (times summed, rows computed per run), not only the last one.

Also the build's kill points for tests: with INDEX_BUILD_KILL_AT=<point> in the environment the
build SIGKILLs itself at that point (`checkpoint`), so a test can stop it at an exact stage.
"""

from __future__ import annotations

import json
import os
import signal
import time

from attribution.atomic import save_json
from index.layout import IndexLayout

KILL_ENV = "INDEX_BUILD_KILL_AT"
COUNTERS = ("seconds_curvature", "seconds_features", "seconds_store", "rows")


def checkpoint(point: str) -> None:
    """SIGKILL this process if INDEX_BUILD_KILL_AT names `point` (a test hook; no-op otherwise)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class RunLog:
    """This run's record among the build's runs; rank 0 keeps build.json up to date."""

    def __init__(self, lay: IndexLayout, key: str, settings: dict, processes: int = 1, write: bool = True):
        self.lay, self.key, self.settings, self.write = lay, key, settings, write
        self.runs: list[dict] = self._previous_runs() if write else []
        self.t0 = time.time()
        self.run = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "processes": processes,
            "seconds": 0.0,
            **dict.fromkeys(COUNTERS, 0),
            "finished": False,
        }
        self.runs.append(self.run)
        self.save()

    def _previous_runs(self) -> list[dict]:
        try:
            prev = json.loads(self.lay.build.read_text())
        except (OSError, ValueError):
            return []
        runs = prev.get("runs") if isinstance(prev, dict) and prev.get("key") == self.key else None
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []

    def save(self) -> None:
        if self.write:
            save_json(self.lay.build, {"key": self.key, "settings": self.settings, "runs": self.runs})

    def add(self, save: bool = True, **counts) -> None:
        """Add to this run's counters (seconds_curvature=…, rows=…) and record its time so far."""
        for k, v in counts.items():
            self.run[k] = self.run[k] + v
        self.run["seconds"] = time.time() - self.t0
        if save:
            self.save()

    def finish(self, save: bool = True) -> None:
        self.run["finished"] = True
        self.add(save=save)

    def summary(self) -> dict:
        """The manifest's build statistics: totals over every run, and each run."""
        tot = {k: sum(float(r.get(k, 0)) for r in self.runs) for k in (*COUNTERS, "seconds")}
        return {
            "runs": len(self.runs),
            "seconds_total": round(tot["seconds"], 2),
            "seconds_curvature": round(tot["seconds_curvature"], 2),
            "seconds_features": round(tot["seconds_features"], 2),
            "seconds_store": round(tot["seconds_store"], 2),
            "rows_per_run": [int(r.get("rows", 0)) for r in self.runs],
            "images_per_second": round(tot["rows"] / max(tot["seconds_features"], 1e-9), 2),
            "per_run": [
                {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in self.runs
            ],
        }
