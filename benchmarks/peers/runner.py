"""The runner: fixes the inputs, runs each method in its own process (so its peak RSS is its own),
then compares the scores and writes the JSON and the table. See the package docstring."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.peers.common import bench_images, load_bench_model, load_inputs, peak_rss_mb
from benchmarks.peers.tables import add_agreement, goals, table
from benchmarks.peers.timer import Timer

ROOT = Path(__file__).resolve().parents[2]
MODES = {
    "quick": dict(n=100, q=5, k=2, trak_dim=512),
    "medium": dict(n=300, q=20, k=4, trak_dim=2048),
    "full": dict(n=1000, q=100, k=8, trak_dim=2048),
}
METHODS = (
    "ours-ekfac",
    "ours-kfac",
    "ours-unprojected",
    "kronfluence-ekfac",
    "kronfluence-ekfac-own-mc",
    "trak",
    "dattri-trak",
    "dattri-datainf",
    "dattri-ekfac",
)
# The one-command run (--jobs 2: about 25 min at N = 1,000 on 2 cores); the rest on request
# (dattri-datainf alone takes about 30 min at N = 1,000: dattri forms every per-example gradient twice)
DEFAULT_METHODS = ("ours-ekfac", "ours-kfac", "ours-unprojected", "kronfluence-ekfac", "trak", "dattri-trak")
RELATIVE_COST = {
    "dattri-datainf": 4.5,
    "dattri-ekfac": 3.0,
    "dattri-trak": 2.2,
    "kronfluence-ekfac": 1.4,
    "kronfluence-ekfac-own-mc": 1.4,
    "ours-unprojected": 1.2,
    "ours-ekfac": 1.0,
    "trak": 0.9,
    "ours-kfac": 0.7,
}
PEER_PACKAGES = {
    "kronfluence-ekfac": "kronfluence",
    "kronfluence-ekfac-own-mc": "kronfluence",
    "trak": "trak",
    "dattri-trak": "dattri",
    "dattri-datainf": "dattri",
    "dattri-ekfac": "dattri",
}


def adapter(method: str):
    """The function that runs `method`: (setup, inputs, timer) -> PeerResult."""
    from functools import partial

    from benchmarks.peers import ours, peer_dattri, peer_kronfluence, peer_traker

    if method.startswith("ours-"):
        return partial(ours.run, method=method)
    if method.startswith("kronfluence-ekfac"):
        return partial(peer_kronfluence.run, fresh_mc=method.endswith("own-mc"))
    if method == "trak":
        return peer_traker.run
    if method.startswith("dattri-"):
        return partial(peer_dattri.run, method=method)
    raise ValueError(f"unknown method {method}")


def run_worker(method: str, workdir: Path) -> int:
    """In the method's own process: run it, write {method}.json and {method}.npy."""
    import numpy as np
    import torch

    setup = json.loads((workdir / "setup.json").read_text())
    setup["batch_size"] = setup.get("batch_size_overrides", {}).get(method, setup["batch_size"])
    torch.set_num_threads(setup["threads"])
    try:
        result = adapter(method)(setup, load_inputs(setup), Timer())
        res = {
            **result.to_dict(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "batch_size_images": setup["batch_size"],
            "ok": True,
        }
        np.save(workdir / f"{method}.npy", result.scores)
    except Exception as e:  # the parent records why a peer could not run, then moves on
        res = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    (workdir / f"{method}.json").write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["ok"] else 1


# ---- parent: set-up, subprocesses, agreement, table -------------------------------------------


def make_setup(a: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from attribution.influence import DEFAULT_DIM
    from attribution.model import DEFAULT_MODEL_DIR

    mode = dict(MODES[a.mode])
    for key in ("n", "q", "k", "trak_dim"):
        if getattr(a, key) is not None:
            mode[key] = getattr(a, key)
    if a.model:
        model_spec = a.model
    elif (DEFAULT_MODEL_DIR / "unet" / "config.json").is_file() or (
        DEFAULT_MODEL_DIR / "config.json"
    ).is_file():
        model_spec = "default"
    else:
        model_spec = "untrained"
    setup = {
        "mode": a.mode,
        **mode,
        "kc": a.kc or max(1, mode["k"] // 2),
        "seed": 0,
        "dim": a.dim or DEFAULT_DIM,
        "trak_block": a.trak_block,
        "batch_size": a.batch_size,
        "batch_size_overrides": {m: int(b) for m, b in (kv.split("=") for kv in a.batch_override)},
        "threads": a.threads,
        "single_queries": a.single_queries,
        "model": model_spec,
        "workdir": str(workdir),
    }
    all_images = bench_images(setup)
    n, q = setup["n"], setup["q"]
    if n + q <= len(all_images):
        queries = all_images.images[n : n + q]
        setup["queries"] = f"mnist() rows {n}..{n + q - 1} (not in the training set)"
    else:
        from attribution.sample import sample

        queries = sample(load_bench_model(setup), q, seed=1, sampler="ddim", steps=50, progress=False).images
        setup["queries"] = f"{q} DDIM samples (50 steps, seed 1) of the model"
    torch.save(queries.clone(), workdir / "queries.pt")
    (workdir / "setup.json").write_text(json.dumps(setup, indent=2))
    return setup


def _todo(a: argparse.Namespace, methods: list[str], workdir: Path, results: dict) -> list[str]:
    """The methods to run now: installed peers, minus finished ones with --resume (into `results`)."""
    import importlib.util

    todo = []
    for m in methods:
        pkg = PEER_PACKAGES.get(m)
        if pkg and importlib.util.find_spec(pkg) is None:
            results[m] = {"ok": False, "error": f"{pkg} is not installed (benchmarks/requirements-peers.txt)"}
            print(f"{m}: skipped ({pkg} not installed)", file=sys.stderr)
            continue
        done = workdir / f"{m}.json"
        if a.resume and done.exists() and json.loads(done.read_text()).get("ok"):
            results[m] = json.loads(done.read_text())
            print(f"{m}: reusing {done}", file=sys.stderr)
            continue
        todo.append(m)
    # longest first, so that parallel jobs end together (relative one-thread times at N = 1,000)
    return sorted(todo, key=lambda m: -RELATIVE_COST.get(m, 1.0))


def _run_one(m: str, a: argparse.Namespace, workdir: Path, env: dict) -> dict:
    print(f"{m}: running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.peers", "--worker", m, "--workdir", str(workdir)],
            env=env,
            timeout=a.timeout,
            capture_output=True,
            text=True,
        )
        rfile = workdir / f"{m}.json"
        if rfile.exists():
            r = json.loads(rfile.read_text())
        else:
            r = {
                "ok": False,
                "error": f"worker exited with {proc.returncode}",
                "stderr_tail": proc.stderr[-3000:],
            }
        if proc.returncode == -9 and not r.get("ok"):
            r["error"] += (
                " (SIGKILL: killed by the kernel, most likely out of memory; try a smaller --batch-size)"
            )
    except subprocess.TimeoutExpired:
        r = {"ok": False, "error": f"timed out after {a.timeout:.0f} s"}
    r["wall_s_subprocess"] = round(time.perf_counter() - t0, 1)
    r["concurrent_jobs"] = a.jobs
    print(
        f"{m}: {'ok' if r.get('ok') else 'FAILED: ' + r.get('error', '')[:300]} ({r['wall_s_subprocess']} s)",
        file=sys.stderr,
        flush=True,
    )
    return r


def run_methods(a: argparse.Namespace, workdir: Path, setup: dict) -> dict:
    """Every method's result (in the order asked), each from its own process, `a.jobs` at once."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    results: dict = {}
    todo = _todo(a, methods, workdir, results)
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each worker is its own process
        for m, r in zip(todo, pool.map(lambda m: _run_one(m, a, workdir, env), todo)):
            results[m] = r
    setup["wall_s_all_methods_run_now"] = round(time.perf_counter() - t_all, 1)
    return {m: results[m] for m in methods if m in results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.peers import __doc__ as doc

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_const", dest="mode", const="quick")
    p.add_argument("--medium", action="store_const", dest="mode", const="medium")
    p.add_argument("--mode", choices=tuple(MODES))
    p.set_defaults(mode="full")  # after --quick/--medium, whose store_const would default it to None
    p.add_argument("--n", type=int, default=None, help="training images (default by mode)")
    p.add_argument("--q", type=int, default=None, help="queries (default by mode)")
    p.add_argument("--k", type=int, default=None, help="draws per image and per query (default by mode)")
    p.add_argument("--kc", type=int, default=None, help="curvature draws per image (default K // 2)")
    p.add_argument(
        "--dim", type=int, default=None, help="our EK-FAC feature budget D (default: the product's)"
    )
    p.add_argument(
        "--trak-dim",
        type=int,
        default=None,
        help="TRAK projection dimension, traker and dattri (> 100 on CPU; default 512 quick, else 2048)",
    )
    p.add_argument("--trak-block", type=int, default=100, help="traker BasicProjector block size")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, every method")
    p.add_argument(
        "--batch-override",
        action="append",
        default=[],
        metavar="METHOD=B",
        help="another batch size for one method (e.g. dattri-ekfac=8, which runs out of memory at 32)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="methods run at once, each in its own process with --threads threads "
        "(--jobs 2 on 2 cores halves the wall time; every method then shares the machine alike)",
    )
    p.add_argument("--single-queries", type=int, default=5, help="queries timed one by one against the index")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated, any of "
        + ", ".join(METHODS)
        + " (default: "
        + ", ".join(DEFAULT_METHODS)
        + ")",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder, 'untrained' (the default's shape) or 'rgb32' (the larger 32×32 RGB "
        "U-Net with attention, untrained, on tinted MNIST); default: assets/mnist-unet",
    )
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per method")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_peers.json"))
    p.add_argument("--workdir", default=None, help="keep intermediate files here (default: a temp dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --workdir: reuse the methods that already finished there (others rerun)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    a = parse_args(argv)
    if a.worker:
        return run_worker(a.worker, Path(a.workdir))
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="vs_peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup = make_setup(a, workdir)
    results = run_methods(a, workdir, setup)
    scores = {
        m: np.load(workdir / f"{m}.npy")
        for m in results
        if results[m].get("ok") and (workdir / f"{m}.npy").exists()
    }
    spearman_matrix = add_agreement(results, scores)
    g = goals(results, setup)
    for r in results.values():
        if r.get("ok"):
            r.pop("traceback", None)
    out = {
        "setup": setup,
        "results": results,
        "goals": g,
        "spearman_matrix": spearman_matrix,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(table(results, setup))
    if g:
        print("\n" + json.dumps(g, indent=2))
    print(f"\nwrote {a.out}", file=sys.stderr)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
