"""Million-image search (issue 19): retrieve and rerank (index/rerank.py) on synthetic features of
the real dimension, recall@16 against exact scores, latency and bytes per image in RAM.

    python benchmarks/million_search.py [--sizes 100000 1000000] [--first PCA2048,PQ512x4fs]
        [--candidates 512 1024 2048] [--queries 64] [--work runs/million]

Synthetic features mimic real ones (fitted to 512 training features of the default EK-FAC index
at D = 16384, `--fit SHARD` re-measures): a random orthogonal basis (Q₁ ⊗ Q₂, two Haar-random
128 × 128 factors) in which 1,024 directions carry half the energy with variances ∝ k^(−0.4) and the
other half is isotropic; each row is scaled to unit norm, then by exp(N(0, 0.245²)) (the real
log-norm spread). On the real features this reproduces the sample spectrum (energy in the top 1,
16, 256 of 512 singular values: real 0.010 / 0.104 / 0.737, synthetic 0.009 / 0.097 / 0.745)
and the spread of cosines (0.020). Queries come from the same generator with another seed.

Resumable: the full float16 features, the exact top-16 of every query (kept while streaming the
blocks) and each stage's results live under --work (gitignored), one step at a time. Writes
benchmarks/results/million_search.json. Keeps under ~2 GiB resident besides the first stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from index.rerank import FULL, Reranked, coded_stage, first_stage, principal_transform  # noqa: E402

D = 16384
SIGNAL, SIGNAL_DECAY, SIGNAL_ENERGY, LOG_NORM_SD = 1024, 0.4, 0.5, 0.245
BLOCK = 2048
K = 16


def spectrum(d: int = D) -> torch.Tensor:
    """Standard deviations per coordinate before the rotation: the signal directions first."""
    lam = torch.full((d,), (1 - SIGNAL_ENERGY) / d, dtype=torch.float64)
    k = torch.arange(1, SIGNAL + 1, dtype=torch.float64) ** -SIGNAL_DECAY
    lam[:SIGNAL] += SIGNAL_ENERGY * k / k.sum()
    return lam.sqrt().float()


def basis(seed: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random orthogonal basis Q₁ ⊗ Q₂ (two √D × √D Haar-random orthogonal factors) and the
    order in which the spectrum's standard deviations are laid on its directions."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(d**0.5))
    q1, q2 = (
        torch.linalg.qr(torch.randn(side, side, generator=g, dtype=torch.float64))[0].float() for _ in "12"
    )
    return q1, q2, spectrum(d)[torch.randperm(d, generator=g)]


def block(seed: int, index: int, rows: int, d: int = D, rotate: bool = True) -> np.ndarray:
    """Rows of the synthetic features, seeded by (seed, block index): (rows, d) float32. Without
    `rotate`, in the generator's own basis (the same distribution up to a fixed rotation)."""
    q1, q2, sd = basis(seed, d)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    z = (torch.randn(rows, d, generator=g) * sd).view(rows, q1.shape[0], q2.shape[0])
    x = (q1 @ z @ q2.T if rotate else z).reshape(rows, d)
    x /= x.norm(dim=1, keepdim=True)
    x *= torch.exp(LOG_NORM_SD * torch.randn(rows, 1, generator=g))
    return x.numpy()


def queries(n: int, rotate: bool = True) -> np.ndarray:
    """Query features: the same basis (seed 0), other draws (block indices past any data)."""
    return block(0, 1 << 30, n, rotate=rotate)


def principal_coordinates(m: int) -> np.ndarray:
    """Without rotation, the generator's m directions of largest variance are coordinates."""
    return np.sort(np.argsort(-basis(0)[2].numpy(), kind="stable")[:m])


def selection_transform(coords: np.ndarray, d: int = D):
    """x ↦ x[coords] as a FAISS linear transform (the idealised principal projection)."""
    a = np.zeros((len(coords), d), np.float32)
    a[np.arange(len(coords)), coords] = 1
    lt = faiss.LinearTransform(d, len(coords), False)
    faiss.copy_array_to_vector(a.ravel(), lt.A)
    lt.is_trained = True
    return lt


class Top:
    """Running exact top-k and bottom-k per query over streamed blocks."""

    def __init__(self, q: int, k: int = K):
        self.s = np.full((2, q, k), -np.inf, np.float32)
        self.i = np.full((2, q, k), -1, np.int64)

    def add(self, scores: np.ndarray, start: int) -> None:
        for end, sc in enumerate((scores, -scores)):
            s = np.concatenate([self.s[end], sc], axis=1)
            i = np.concatenate(
                [self.i[end], np.broadcast_to(np.arange(sc.shape[1]) + start, sc.shape)], axis=1
            )
            best = np.argsort(-s, axis=1, kind="stable")[:, : self.s.shape[2]]
            self.s[end], self.i[end] = np.take_along_axis(s, best, 1), np.take_along_axis(i, best, 1)


def generate(work: Path, n: int, psi: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
    """Write the float16 features (resumable per block) and return the exact top/bottom-K rows
    (2, Q, K) of every query, from float32 scores of the float16 rows as stored. With `coords`:
    unrotated rows, and their `coords` columns written to reduced<m>.npy as well."""
    work.mkdir(parents=True, exist_ok=True)
    path, state = work / FULL, work / "generate.npz"
    full = np.lib.format.open_memmap(
        path, mode="r+" if path.exists() else "w+", dtype=np.float16, shape=(n, D)
    )
    red = None
    if coords is not None:
        rpath = work / f"reduced{len(coords)}.npy"
        red = np.lib.format.open_memmap(
            rpath, mode="r+" if rpath.exists() else "w+", dtype=np.float16, shape=(n, len(coords))
        )
    top, done = Top(len(psi)), 0
    if state.exists():
        z = np.load(state)
        top.s, top.i, done = z["s"], z["i"], int(z["done"])
    t0 = time.time()
    for start in range(done, n, BLOCK):
        rows = min(BLOCK, n - start)
        x = block(0, start // BLOCK, rows, rotate=coords is None).astype(np.float16)
        full[start : start + rows] = x
        if red is not None:
            red[start : start + rows] = x[:, coords]
        top.add(psi @ x.astype(np.float32).T, start)
        if (start // BLOCK) % 16 == 15 or start + rows == n:
            full.flush()
            if red is not None:
                red.flush()
            np.savez(work / "generate.tmp.npz", s=top.s, i=top.i, done=start + rows)
            os.replace(work / "generate.tmp.npz", state)
            print(f"  generated {start + rows}/{n} ({time.time() - t0:.0f} s)", flush=True)
    del full, red
    return top.i


def simulate(work: Path, n: int, psi: np.ndarray, coords: np.ndarray) -> tuple[Path, np.ndarray]:
    """The same distribution as unrotated `block` rows, drawn exactly but only where it matters:
    the `coords` (signal) part v_s in full, and of the isotropic rest v_r (σ² per coordinate) only
    its projection u on the span of the queries' rest parts (orthonormal basis U) and the squared
    norm of the remainder, σ²·χ²(D − m − Q). Then ψ·φ = s·(ψ_s·v_s + (Uᵀψ_r)·u)/‖v‖ exactly, with
    ‖v‖² = ‖v_s‖² + ‖u‖² + σ²χ². Writes the first stage's input φ_s (float16, resumable) and
    returns it with the exact top/bottom-K rows of every query."""
    work.mkdir(parents=True, exist_ok=True)
    m, q = len(coords), len(psi)
    rest = np.setdiff1d(np.arange(D), coords)
    sd = basis(0)[2].numpy()
    sig_sd, sigma = sd[coords], float(sd[rest].mean())
    assert np.allclose(sd[rest], sigma)
    u_basis = np.linalg.qr(psi[:, rest].T.astype(np.float64))[0]  # (D − m, Q)
    psi_s, psi_u = psi[:, coords].astype(np.float64), psi[:, rest] @ u_basis
    path, state = work / f"reduced{m}.npy", work / "simulate.npz"
    red = np.lib.format.open_memmap(
        path, mode="r+" if path.exists() else "w+", dtype=np.float16, shape=(n, m)
    )
    top, done = Top(q), 0
    if state.exists():
        z = np.load(state)
        top.s, top.i, done = z["s"], z["i"], int(z["done"])
    for start in range(done, n, BLOCK):
        rows = min(BLOCK, n - start)
        g = np.random.default_rng([0, start // BLOCK])
        v_s = g.standard_normal((rows, m)) * sig_sd
        u = g.standard_normal((rows, q)) * sigma
        chi2 = sigma**2 * g.chisquare(D - m - q, rows)
        scale = np.exp(LOG_NORM_SD * g.standard_normal(rows)) / np.sqrt(
            (v_s**2).sum(1) + (u**2).sum(1) + chi2
        )
        phi_s = (v_s * scale[:, None]).astype(np.float16)
        red[start : start + rows] = phi_s
        top.add((psi_s @ phi_s.astype(np.float64).T + (psi_u @ u.T) * scale).astype(np.float32), start)
        if (start // BLOCK) % 64 == 63 or start + rows == n:
            red.flush()
            np.savez(work / "simulate.tmp.npz", s=top.s, i=top.i, done=start + rows)
            os.replace(work / "simulate.tmp.npz", state)
            print(f"  simulated {start + rows}/{n}", flush=True)
    del red
    return path, top.i


def evaluate_first(index, psi: np.ndarray, exact: np.ndarray, cands: list[int]) -> dict:
    """Simulated rows (no full features): the share of the exact top/bottom-16 among the first
    stage's candidates, which is the recall after an exact rerank, and its latency per query."""
    out = {}
    for c in cands:
        wall, cpu, rec = [], [], [[], []]
        for j in range(len(psi)):
            t0, c0 = time.perf_counter(), time.process_time()
            prop = index.search(np.ascontiguousarray(np.stack([psi[j], -psi[j]]), dtype=np.float32), c)[1]
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            for end in (0, 1):
                rec[end].append(len(set(prop[end]) & set(exact[end][j])) / K)
        out[str(c)] = {
            "recall_at_16_top": float(np.mean(rec[0])),
            "recall_at_16_bottom": float(np.mean(rec[1])),
            "median_first_stage_ms": 1e3 * float(np.median(wall)),
            "median_first_stage_cpu_ms": 1e3 * float(np.median(cpu)),
        }
        print(f"  C={c}: {out[str(c)]}", flush=True)
    return out


def run_simulated(work: Path, n: int, firsts: list[str], reduce: int, cands: list[int], sample: int, q: int):
    """One size with `simulate`d rows: the first stage's recall (= after rerank) and latency."""
    work = work / f"{n}-simulated"
    psi = queries(q, rotate=False)
    coords = principal_coordinates(reduce)
    t0 = time.time()
    red, exact = simulate(work, n, psi, coords)
    res = {"n": n, "rows": "simulated (exact in distribution; no full features)", "stages": {}}
    res["seconds_generate"] = time.time() - t0
    lt, rows = selection_transform(coords), np.load(red, mmap_mode="r")
    for first in firsts:
        t0 = time.time()
        inner = coded_stage(
            first, reduce, rows[:sample], lambda: (rows[s : s + 65536] for s in range(0, n, 65536))
        )
        index = faiss.IndexPreTransform(lt, inner)
        ram = int(faiss.serialize_index(index).nbytes)
        print(f"N={n} simulated, first stage PCA{reduce},{first}: {ram / n:.0f} bytes per image", flush=True)
        res["stages"][f"PCA{reduce},{first}"] = {
            "ram_bytes_per_image": ram / n,
            "code_bytes_per_image": int(inner.sa_code_size()),
            "seconds_build": time.time() - t0,
            "candidates": evaluate_first(index, psi, exact, cands),
        }
    return res


def chunks_of(path: Path):
    def chunks():
        full = np.load(path, mmap_mode="r")
        for s in range(0, full.shape[0], 8 * BLOCK):
            yield np.asarray(full[s : s + 8 * BLOCK], dtype=np.float32)

    return chunks


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def evaluate(rr: Reranked, psi: np.ndarray, exact: np.ndarray, cands: list[int]) -> dict:
    """Per candidate count: recall@16 of both ends, the first stage's and the rerank's median
    latency for one query (one thread; wall clock and this process's CPU time, which a shared
    machine does not inflate), and the first stage's own recall before reranking."""
    out = {}
    for c in cands:
        wall, cpu, tops, bots, first_rec = [], [], [], [], []
        for j in range(len(psi)):
            t0, c0 = time.perf_counter(), time.process_time()
            prop = rr.propose(np.stack([psi[j], -psi[j]]), c)
            t1, c1 = time.perf_counter(), time.process_time()
            tops.append(rr.rerank(psi[j], prop[0], K)[1])
            bots.append(rr.rerank(-psi[j], prop[1], K)[1])
            wall.append((t1 - t0, time.perf_counter() - t1))
            cpu.append((c1 - c0, time.process_time() - c1))
            first_rec.append(len(set(prop[0][:K]) & set(exact[0][j])) / K)
        wall, cpu = 1e3 * np.array(wall), 1e3 * np.array(cpu)
        out[str(c)] = {
            "recall_at_16_top": recall(tops, exact[0]),
            "recall_at_16_bottom": recall(bots, exact[1]),
            "first_stage_alone_recall_at_16": float(np.mean(first_rec)),
            "median_first_stage_ms": float(np.median(wall[:, 0])),
            "median_first_stage_cpu_ms": float(np.median(cpu[:, 0])),
            "median_rerank_ms": float(np.median(wall[:, 1])),
            "median_rerank_cpu_ms": float(np.median(cpu[:, 1])),
            "p90_total_ms": float(np.quantile(wall.sum(1), 0.9)),
        }
        print(f"  C={c}: {out[str(c)]}", flush=True)
    return out


def reduced_rows(work: Path, lt, n: int) -> Path:
    """The principal projections of all rows, float16 (N, m), computed once (resumable: whole)."""
    path = work / f"reduced{lt.d_out}.npy"
    if not path.exists():
        tmp = work / f".reduced{lt.d_out}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, lt.d_out))
        start = 0
        for c in chunks_of(work / FULL)():
            out[start : start + len(c)] = lt.apply(np.ascontiguousarray(c))
            start += len(c)
        out.flush()
        del out
        os.replace(tmp, path)
    return path


def run_size(
    work: Path, n: int, firsts: list[str], reduce: int, cands: list[int], sample: int, q: int, ideal: bool
):
    """One size: generate, project, build each first stage, evaluate. `ideal`: unrotated rows and
    the generator's own principal directions instead of a fitted projection (no D × m product
    per row, so 1M rows fit a shared CPU)."""
    work = work / (f"{n}-ideal" if ideal else str(n))
    psi = queries(q, rotate=not ideal)
    coords = principal_coordinates(reduce) if ideal else None
    t0 = time.time()
    exact = generate(work, n, psi, coords)
    res = {"n": n, "seconds_generate": time.time() - t0, "stages": {}}
    res["principal_projection"] = (
        "the generator's own top directions (idealised)"
        if ideal
        else (f"fitted: randomised SVD of the first {sample} rows")
    )
    lt_path = work / f"pca{reduce}.vt"
    t0 = time.time()
    if ideal:
        lt = selection_transform(coords)
    elif lt_path.exists():
        lt = faiss.downcast_VectorTransform(faiss.read_VectorTransform(str(lt_path)))
    else:  # the rows are i.i.d., so the first `sample` rows are a random sample
        lt = principal_transform(np.asarray(np.load(work / FULL, mmap_mode="r")[:sample], np.float32), reduce)
        faiss.write_VectorTransform(lt, str(lt_path))
    red = work / f"reduced{reduce}.npy" if ideal else reduced_rows(work, lt, n)
    res["seconds_principal_projection"] = time.time() - t0
    full = np.load(work / FULL, mmap_mode="r")
    for first in firsts:
        path, t0 = work / f"first-{reduce}-{first.replace(',', '_')}.faiss", time.time()
        if path.exists():
            index = faiss.read_index(str(path))
        else:
            rows = np.load(red, mmap_mode="r")
            samp = np.asarray(full[:sample], np.float32)
            index = first_stage(
                lt, first, samp, lambda r=rows: (r[s : s + 65536] for s in range(0, n, 65536))
            )
            faiss.write_index(index, str(path))
        rr = Reranked(index, full, cands[0])
        print(f"N={n} first stage PCA{reduce},{first}: {rr.ram_bytes / n:.0f} bytes per image", flush=True)
        res["stages"][f"PCA{reduce},{first}"] = {
            "ram_bytes_per_image": rr.ram_bytes / n,
            "seconds_build": time.time() - t0,
            "candidates": evaluate(rr, psi, exact, cands),
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--first", nargs="+", default=["PQ256x4fs", "PQ512x4fs", "SQ8"])
    p.add_argument("--reduce", type=int, default=1024)
    p.add_argument("--candidates", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument(
        "--sample", type=int, default=8192, help="rows the principal projection and codes train on"
    )
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "million")
    p.add_argument("--ideal", type=int, nargs="*", default=[], help="sizes run with the idealised projection")
    p.add_argument(
        "--simulated", type=int, nargs="*", default=[1_000_000], help="sizes run with `simulate`d rows"
    )
    p.add_argument("--table", action="store_true", help="print the results file as a markdown table")
    a = p.parse_args()
    if a.table:
        print(table())
        return
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out_path = ROOT / "benchmarks" / "results" / "million_search.json"
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.update(
        {
            "dimension": D,
            "k": K,
            "queries": a.queries,
            "threads": 1,
            "generator": {
                "basis": "Q1 ⊗ Q2, two Haar-random 128 × 128 orthogonal factors (seed 0)",
                "signal_directions": SIGNAL,
                "signal_variance_decay": f"k^-{SIGNAL_DECAY}",
                "signal_energy": SIGNAL_ENERGY,
                "rest": "isotropic",
                "row_norm": f"unit, times exp(N(0, {LOG_NORM_SD}^2))",
                "fitted_to": "512 training features of the default EK-FAC index (mnist, D = 16384)",
                "storage": "float16 on disk; exact scores are float32 products of the stored float16 rows",
            },
            "note": "latencies: one query at a time, one thread, on a shared 2-core CPU; rerank reads "
            "the candidates' float16 rows from the memory-mapped file (page cache permitting)",
        }
    )
    out.setdefault("sizes", {})
    for n in a.sizes:
        ideal = n in a.ideal
        key = f"{n}-simulated" if n in a.simulated else f"{n}-ideal" if ideal else str(n)
        if n in a.simulated:
            res = run_simulated(a.work, n, a.first, a.reduce, a.candidates, a.sample, a.queries)
        else:
            res = run_size(a.work, n, a.first, a.reduce, a.candidates, a.sample, a.queries, ideal)
        if out_path.exists():  # another run may have written other sizes or stages meanwhile
            out["sizes"] = {**json.loads(out_path.read_text()).get("sizes", {}), **out["sizes"]}
        res["stages"] = {**out["sizes"].get(key, {}).get("stages", {}), **res["stages"]}
        out["sizes"][key] = res
        out_path.write_text(json.dumps(out, indent=2))
    print(f"wrote {out_path}")


def table(path: Path = ROOT / "benchmarks" / "results" / "million_search.json") -> str:
    """The README's markdown table of a results file: `python benchmarks/million_search.py --table`."""
    out = [
        "| N | rows | first stage | RAM per image | C | recall@16 (top / bottom) | first stage, CPU ms | rerank, CPU ms |"
    ]
    out.append("|---|---|---|---|---|---|---|---|")
    for key, size in json.loads(path.read_text())["sizes"].items():
        rows = "simulated" if key.endswith("simulated") else "full, on disk"
        for name, st in size["stages"].items():
            for c, r in st["candidates"].items():
                rerank = f"{r['median_rerank_cpu_ms']:.1f}" if "median_rerank_cpu_ms" in r else "–"
                out.append(
                    f"| {size['n']:,} | {rows} | {name} | {st['ram_bytes_per_image']:,.0f} B | {c} | "
                    f"{r['recall_at_16_top']:.3f} / {r['recall_at_16_bottom']:.3f} | "
                    f"{r['median_first_stage_cpu_ms']:.1f} | {rerank} |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    main()
