"""Load benchmark of the explorer app: C concurrent gradio_client clients × Q queries each.

    python benchmarks/app_load.py                       # the default model and index
    python benchmarks/app_load.py --model DIR --index DIR
    python benchmarks/app_load.py --tiny                # a tiny untrained model + 200-image index
    python benchmarks/app_load.py --url http://127.0.0.1:7860/   # an app that is already running

Starts `app.py` as a separate process on a free port (unless --url), sends every query image
once from a single client (the reference answers), then runs C client threads, each with its own
`gradio_client.Client`, Q queries each, against the `/attribute` endpoint. Every answer must
equal the reference exactly (all N scores and the top-k rows); latencies are per call, as the
client sees them. Writes benchmarks/results/app_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def query_files(folder: Path, channels: int, size: int, count: int = 5) -> list[Path]:
    """The last `count` images of the embedded MNIST subset, as PNG files."""
    from attribution.data import load_dataset, save_images

    ds = load_dataset("mnist", channels=channels, size=size)
    return save_images(ds.images[-count:], folder, prefix="query_")


def _summary(lat: list[float]) -> dict:
    a = np.asarray(lat, dtype=np.float64)
    if not len(a):
        return {}
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "mean": round(float(a.mean()), 4),
        "max": round(float(a.max()), 4),
        "n": int(len(a)),
    }


def _call(client, f: Path, k: int, method: str | None) -> dict:
    from gradio_client import handle_file

    args = [handle_file(str(f)), k] + ([method] if method else [])
    return client.predict(*args, api_name="/attribute")


def _key(res: dict):
    """What must be equal between two answers to the same query."""
    return (res["scores"], [h["row"] for h in res["proponents"]], [h["row"] for h in res["opponents"]])


def _references(url: str, files: list[Path], k: int, method: str | None, warmup: int):
    """One client: `warmup` unmeasured calls, then every file once. (answers by file, latencies,
    the index's provenance)."""
    from gradio_client import Client

    single = Client(url, verbose=False)
    for f in files[:warmup]:  # the first queries of a server process are slower; not measured
        _call(single, f, k, method)
    ref, single_lat, provenance = {}, [], None
    for f in files:
        t0 = time.perf_counter()
        res = _call(single, f, k, method)
        single_lat.append(time.perf_counter() - t0)
        ref[f], provenance = _key(res), res["index"]
    return ref, single_lat, provenance


def _concurrent(
    url: str, files: list[Path], ref: dict, clients: int, queries: int, k: int, method: str | None
) -> dict:
    """`clients` threads, each its own Client, started together, `queries` calls each."""
    from gradio_client import Client

    out = {"lat": [], "errors": [], "mismatches": [], "server": []}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        try:
            c = Client(url, verbose=False)
        except Exception as e:
            with lock:
                out["errors"].append(f"client {i}: could not connect ({type(e).__name__}: {e})")
            barrier.abort()
            return
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        for j in range(queries):
            f = files[(i + j) % len(files)]
            t0 = time.perf_counter()
            try:
                res = _call(c, f, k, method)
            except Exception as e:
                with lock:
                    out["errors"].append(f"client {i} query {j}: {type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                out["lat"].append(dt)
                out["server"].append(res["timings_s"])
                if _key(res) != ref[f]:
                    out["mismatches"].append(f"client {i} query {j} ({f.name})")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.perf_counter() - t0
    return out


def run_load(
    url: str,
    files: list[Path],
    clients: int = 8,
    queries: int = 5,
    k: int = 8,
    method: str | None = None,
    warmup: int = 3,
) -> dict:
    """`warmup` unmeasured calls, reference answers (and latencies) from one client, then
    `clients` × `queries` concurrent calls."""
    ref, single_lat, provenance = _references(url, files, k, method, warmup)
    c = _concurrent(url, files, ref, clients, queries, k, method)
    lat, server, wall = c["lat"], c["server"], c["wall"]
    return {
        "clients": clients,
        "queries_per_client": queries,
        "k": k,
        "method": method,
        "warmup_calls": warmup,
        "calls": clients * queries,
        "ok": len(lat),
        "errors": c["errors"],
        "mismatches": c["mismatches"],
        "latency_s": _summary(lat),
        "single_client_latency_s": _summary(single_lat),
        "wall_s": round(wall, 3),
        "throughput_per_s": round(len(lat) / wall, 3) if wall else None,
        "server_timings_s": {
            name: _summary([t[name] for t in server if name in t])
            for name in sorted({n for t in server for n in t})
        },
        "index_provenance": provenance,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app did not answer at {url} within {timeout} s")


def tiny_workspace(root: Path) -> tuple[Path, Path]:
    from attribution.data import load_dataset
    from attribution.influence import AttributionConfig
    from attribution.model import build_model, load_model, save_model
    from index.build import build_index

    save_model(build_model("tiny", seed=0), root / "model")
    model = load_model(root / "model")
    build_index(
        model,
        load_dataset("mnist", 1, 8, n=200),
        root / "index",
        AttributionConfig(method="ekfac", draws=2, curvature_draws=1, query_draws=4, dim=256),
        model_path=str(root / "model"),
        data_spec="mnist",
        progress=False,
    )
    return root / "model", root / "index"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an app that is already running")
    p.add_argument("--model", default=None)
    p.add_argument("--index", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny untrained model and a 200-image index")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=None, help="the app's --concurrency")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "app_load.json"))
    a = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="app-load-"))
    proc, startup = None, None
    model_dir, index_dir = a.model, a.index
    if a.tiny:
        model_dir, index_dir = (str(x) for x in tiny_workspace(tmp))
    url = a.url
    try:
        if url is None:
            port = free_port()
            cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port)]
            cmd += ["--model", model_dir] if model_dir else []
            cmd += ["--index", index_dir] if index_dir else []
            cmd += ["--concurrency", str(a.concurrency)] if a.concurrency else []
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1"})
            url = f"http://127.0.0.1:{port}/"
            startup = wait_up(url, proc)
        from gradio_client import Client

        info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
        assert "/attribute" in info["named_endpoints"], "the app has no /attribute endpoint"
        from attribution.model import load_model

        m = load_model(model_dir) if model_dir else load_model(None)
        files = query_files(tmp / "queries", m.channels, m.size)
        res = run_load(url, files, a.clients, a.queries, a.k)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    res.update(
        {
            "url_startup_s": round(startup, 2) if startup else None,
            "app_concurrency": a.concurrency or 1,
            "model": "tiny (untrained, 8×8)" if a.tiny else (model_dir or "default (assets/mnist-unet)"),
            "index": "tiny ekfac, 200 images, D=256" if a.tiny else (index_dir or "default"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    lat = res["latency_s"]
    print(
        f"{res['ok']}/{res['calls']} calls ok, {len(res['errors'])} errors, {len(res['mismatches'])} "
        f"mismatches; latency p50 {lat.get('p50')} s, p95 {lat.get('p95')} s "
        f"(single client p50 {res['single_client_latency_s'].get('p50')} s); wrote {out}"
    )
    return 0 if not res["errors"] and not res["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
