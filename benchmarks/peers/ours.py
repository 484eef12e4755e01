"""Our methods: the product's index build + one FAISS pass for all queries (ours-ekfac, ours-kfac),
and the unprojected EK-FAC scores straight from the Attributor (ours-unprojected, the reference).

The curvature sees exactly K_c draws per image, like every peer (`curvature_min_rows=0`: the
product's extra draws for small sets are off, so that all libraries fit on the same rows)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from benchmarks.peers.common import OURS_DAMPING, BenchInputs, PeerResult, peak_rss_mb
from benchmarks.peers.timer import Timer

# every library gets the same seeded (x_t, t, ε) rows: plain stratified draws (no antithetic pairs,
# no importance density), as the peers' own MC loops draw them
SAME_ROWS = dict(antithetic=False, importance=False, damping=OURS_DAMPING)


def run_unprojected(setup: dict, inp: BenchInputs, timer: Timer) -> PeerResult:
    """Attributor(method="ekfac", dim=None).fit().scores(queries)."""
    from attribution.influence import AttributionConfig, Attributor

    rss0 = peak_rss_mb()
    cfg = AttributionConfig(
        method="ekfac",
        draws=setup["k"],
        query_draws=setup["k"],
        curvature_draws=setup["kc"],
        curvature_min_rows=0,
        dim=None,
        seed=setup["seed"],
        **SAME_ROWS,
    )
    with timer.stage("curvature"):
        att = Attributor(inp.model, inp.data, cfg, progress=False).fit()
    with timer.stage("train_features_and_scores"):
        scores = att.scores(inp.queries).numpy()
    settings = {"method": "ekfac", "dim": None, "damping": f"{OURS_DAMPING} x mean eigenvalue per layer"}
    return PeerResult.from_timer(scores, timer, settings, rss0)


def run_index(setup: dict, inp: BenchInputs, timer: Timer, name: str) -> PeerResult:
    """build_index(method=name) + load + all scores of the queries from one exhaustive FAISS
    pass; then the latency of single new queries against the built index."""
    from attribution.influence import AttributionConfig
    from index.build import build_index
    from index.store import load

    rss0 = peak_rss_mb()
    k, seed = setup["k"], setup["seed"]
    fast = name == "kfac"  # the K-FAC fast path: Kronecker projection, preconditioning folded in
    cfg = AttributionConfig(
        method=name,
        draws=k,
        query_draws=k,
        curvature_draws=setup["kc"],
        curvature_min_rows=0,
        dim=setup.get("kfac_dim", 8192) if fast else setup["dim"],
        projection="kronecker" if fast else "sketch",
        seed=seed,
        **SAME_ROWS,
    )
    out = Path(setup["workdir"]) / f"index-{name}"
    shutil.rmtree(out, ignore_errors=True)
    with timer.stage("build_index"):
        build_index(inp.model, inp.data, out, cfg, faiss_type="auto", device="cpu", progress=False)
    rss_build = peak_rss_mb()
    with timer.stage("load_and_query_all"):
        idx = load(out, inp.model, device="cpu")
        scores = idx.all_scores(idx.query_features(inp.queries))  # (Q, N); top-k is a slice of it
    single, single_cpu = _single_queries(idx, inp.queries, setup["single_queries"])
    build = json.loads((out / "manifest.json").read_text())["build"]
    res = PeerResult.from_timer(
        scores,
        timer,
        _index_settings(idx, name),
        rss0,
        single_query_s=statistics.median(single),
        single_query_cpu_s=statistics.median(single_cpu),
        single_query_all_s=single,
        peak_rss_build_mb=round(rss_build, 1),
        throughput=_throughput(inp, setup, build["seconds_features"]),
    )
    # the build's own split of its wall time (its manifest)
    res.stages_s = {
        "build_index": res.stages_s["build_index"],
        "build_curvature": build["seconds_curvature"],
        "build_features": build["seconds_features"],
        "load_and_query_all": res.stages_s["load_and_query_all"],
    }
    return res


def _single_queries(idx, queries, n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `n` single queries (image -> top-16 proponents/opponents), after
    one unmeasured query."""
    idx.query(queries[0])
    timed = [Timer.measure(lambda i=i: idx.query(queries[i])) for i in range(min(len(queries), n))]
    return [w for _, w, _ in timed], [c for _, _, c in timed]


def _index_settings(idx, name: str) -> dict:
    return {
        "method": name,
        "dim": idx.manifest["projection"]["total_dim"],
        "projection": idx.manifest["projection"]["kind"],
        "faiss": idx.manifest["faiss"]["type"],
        "damping": (
            f"{OURS_DAMPING} x mean eigenvalue per layer (exact)"
            if name == "ekfac"
            else f"factored: sqrt({OURS_DAMPING}) x mean eigenvalue of A and of S"
        ),
    }


def _throughput(inp: BenchInputs, setup: dict, seconds_features: float) -> dict:
    plain = plain_rows_per_s(inp.model, inp.data.images, setup["k"], setup["seed"], setup["batch_size"])
    feat = setup["n"] * setup["k"] / seconds_features
    return {
        "feature_rows_per_s": feat,
        "plain_fwd_bwd_rows_per_s": plain,
        "ratio": feat / plain,
        "note": "features stage of the build (incl. writing the store) vs a plain batched "
        "forward+backward of the diffusion loss on the same rows, same process",
    }


def plain_rows_per_s(model, images, k: int, seed: int, batch_size: int, batches: int = 4) -> float:
    """(image×draw)/s of a plain batched forward + backward of the diffusion loss (parameter
    gradients, `index_speed.plain_step`) on the benchmark's own rows: the physical limit of
    gradient-based attribution. The first batch warms up; images wrap around when N is small."""
    from benchmarks.index_speed import plain_step

    rows, seconds = 0, 0.0
    for j in range(batches + 1):
        keys = list(range(j * batch_size, (j + 1) * batch_size))
        x0 = images[[i % len(images) for i in keys]]
        _, wall, _ = Timer.measure(lambda x0=x0, keys=keys: plain_step(model, x0, keys, k, seed))
        if j:
            rows, seconds = rows + len(keys) * k, seconds + wall
    return rows / seconds


def run(setup: dict, inp: BenchInputs, timer: Timer, method: str) -> PeerResult:
    if method == "ours-unprojected":
        return run_unprojected(setup, inp, timer)
    return run_index(setup, inp, timer, method.split("-", 1)[1])
