"""Speed, memory and agreement against the attribution libraries people use today (issue 7).

    python -m benchmarks.peers --quick               # N=100, Q=5, K=2: a smoke test (minutes)
    python -m benchmarks.peers --jobs 2              # N=1,000, Q=100, K=8, the six DEFAULT_METHODS two
                                                     # at a time on 2 cores (about 25 min)
    python -m benchmarks.peers --model rgb32         # the larger 32×32 RGB U-Net with attention
    python -m benchmarks.peers --n 5000              # the size the speed goals are stated for
    pip install torch==2.13.0 -r benchmarks/requirements-peers.txt && pip uninstall -y torchvision

(`python benchmarks/vs_peers.py …` is the same command.)

Every method sees the same model, the same N training images, the same Q queries and the same
rows: `Measurement("loss").rows(x0, keys, K, seed, alphas_cumprod)` with our keys (training
image i uses key i, every query uses `QUERY_KEY`), K draws per training image and per query and
K_c = max(1, K // 2) draws per image for the curvature. Each peer's loss / measurement function is
written around those exact (x_t, t, ε) rows, so the only differences are the algorithms.

Methods (each runs in its own subprocess, so its peak RSS is its own), one adapter module each:
  ours-ekfac          ours.py: build_index(method="ekfac", the product's D, --faiss auto) + load().all_scores
  ours-kfac           the same with method="kfac" (Kronecker fast path, D ≈ 8192, factored damping)
  ours-unprojected    Attributor(method="ekfac", dim=None).fit().scores(queries): the reference
  kronfluence-ekfac   peer_kronfluence.py: Analyzer.fit_all_factors(strategy="ekfac") + compute_pairwise_scores
  kronfluence-ekfac-own-mc  the same with kronfluence drawing its own MC-GGN samples
  trak                peer_traker.py: TRAKer (BasicProjector on CPU), f = the diffusion loss, Q = 1
  dattri-trak         peer_dattri.py: TRAKAttributor, same function
  dattri-datainf      IFAttributorDataInf: dattri's influence function that handles Conv2d (every
                      parameter; the empirical Fisher inverted per layer from rank-one terms)
  dattri-ekfac        IFAttributorEKFAC (nn.Linear layers only; see the JSON for why)

Each adapter is `run(setup, inputs, timer) -> PeerResult` (common.py): the inputs are loaded by
the runner, the stages are timed through the `Timer` passed in (timer.py). Damping: ours and the
peers' EK-FAC use 1e-8 × each layer's mean eigenvalue; the TRAKs 1e-3 × the mean eigenvalue of
XᵀX (see each adapter for how it is set in that library).

Timings are wall-clock, end to end (curvature, training-side work, scoring), single-threaded
(OMP_NUM_THREADS=1, torch.set_num_threads(1)) unless --threads says otherwise. Writes
benchmarks/results/vs_peers.json (or --out) and prints a markdown table (tables.py; the
runner is runner.py).
"""
