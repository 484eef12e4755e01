"""Soak benchmark of the explorer app: does the server's memory stay flat under concurrent load,
and is every answer the single-client answer?

    python benchmarks/soak.py                        # tiny untrained model, 200-image index
    python benchmarks/soak.py --clients 8 --queries 45
    python benchmarks/soak.py --model DIR --index DIR
    MALLOC_ARENA_MAX=0 python benchmarks/soak.py --out /tmp/soak-no-limit.json   # glibc's default arenas

Starts `app.py` (the real entry point, so the launcher's MALLOC_ARENA_MAX=2 applies unless the
variable is set) on 127.0.0.1 and a free port, never anywhere else. One client sends every query
image once after a few warm-up calls (the reference answers); the server's RSS is read from
/proc after that warm-up. Then C client threads, each with its own gradio_client.Client, send Q
queries each; RSS is sampled every second. Every answer must equal the reference exactly (all N
scores, the top-k rows). Writes benchmarks/results/soak.json: RSS after warm-up, at the end, the
peak and the growth in %, with the calls, errors and mismatches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROWTH_BAR_PERCENT = 10.0  # issue 14: RSS grows by less than 10% after warm-up


def _app_load():
    spec = importlib.util.spec_from_file_location("app_load", ROOT / "benchmarks" / "app_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def env_of(pid: int, name: str) -> str | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return item.split(b"=", 1)[1].decode()
    return None


class Sampler(threading.Thread):
    """RSS of a process every `every` seconds while running."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set():
            self.samples.append((round(time.time() - t0, 1), round(rss_mib(self.pid), 1)))
            self.stop.wait(self.every)


def soak(url: str, pid: int, files: list[Path], clients: int, queries: int, k: int, warmup: int) -> dict:
    load = _app_load()
    ref, single_lat, provenance = load._references(url, files, k, None, warmup)
    time.sleep(1.0)
    rss_warm = rss_mib(pid)
    sampler = Sampler(pid)
    sampler.start()
    c = load._concurrent(url, files, ref, clients, queries, k, None)
    sampler.stop.set()
    sampler.join()
    time.sleep(1.0)
    rss_end = rss_mib(pid)
    peak = max([rss_end, *[r for _, r in sampler.samples]])
    return {
        "clients": clients,
        "queries_per_client": queries,
        "k": k,
        "warmup_calls": warmup,
        "calls": clients * queries,
        "ok": len(c["lat"]),
        "errors": c["errors"][:20],
        "n_errors": len(c["errors"]),
        "mismatches": c["mismatches"][:20],
        "n_mismatches": len(c["mismatches"]),
        "all_equal_single_client": not c["errors"]
        and not c["mismatches"]
        and len(c["lat"]) == clients * queries,
        "rss_mib": {
            "after_warmup": round(rss_warm, 1),
            "end": round(rss_end, 1),
            "peak": round(peak, 1),
            "growth_percent": round(100 * (rss_end - rss_warm) / rss_warm, 2),
            "peak_growth_percent": round(100 * (peak - rss_warm) / rss_warm, 2),
        },
        "rss_samples": sampler.samples[:: max(1, len(sampler.samples) // 120)],
        "latency_s": load._summary(c["lat"]),
        "single_client_latency_s": load._summary(single_lat),
        "wall_s": round(c["wall"], 2),
        "index_provenance": provenance,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: a tiny untrained model)")
    p.add_argument("--index", default=None, help="index folder (with --model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queries", type=int, default=45, help="queries per client")
    p.add_argument("--files", type=int, default=8, help="distinct query images")
    p.add_argument("--k", type=int, default=8)
    p.add_argument(
        "--warmup", type=int, default=8, help="unmeasured single-client calls before the first RSS"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    a = p.parse_args(argv)
    load = _app_load()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    model_dir, index_dir = a.model, a.index
    if model_dir is None:
        model_dir, index_dir = (str(x) for x in load.tiny_workspace(tmp))
    port = load.free_port()
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model_dir,
    ]
    cmd += ["--index", index_dir] if index_dir else []
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        startup = load.wait_up(url, proc)
        arena = env_of(proc.pid, "MALLOC_ARENA_MAX")
        from attribution.model import load_model

        m = load_model(model_dir)
        files = load.query_files(tmp / "queries", m.channels, m.size, a.files)
        res = soak(url, proc.pid, files, a.clients, a.queries, a.k, a.warmup)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res.update(
        {
            "server_MALLOC_ARENA_MAX": arena,
            "startup_s": round(startup, 1),
            "growth_bar_percent": GROWTH_BAR_PERCENT,
            "model": "tiny (untrained, 8×8)" if a.model is None else model_dir,
            "index": "tiny ekfac, 200 images, D=256" if a.model is None else (index_dir or "default"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average": list(os.getloadavg()),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    r = res["rss_mib"]
    print(
        f"{res['ok']}/{res['calls']} ok, {res['n_errors']} errors, {res['n_mismatches']} mismatches; server RSS "
        f"{r['after_warmup']} MiB after warm-up, {r['end']} MiB at the end ({r['growth_percent']:+.1f}%, peak "
        f"{r['peak']} MiB), MALLOC_ARENA_MAX={arena}; wrote {out}"
    )
    ok = res["all_equal_single_client"] and r["growth_percent"] < GROWTH_BAR_PERCENT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
