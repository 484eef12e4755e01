"""The build and the query on CUDA (issue 19); skipped where no GPU is present.

- The count sketch hashes on the GPU to the same map as on the CPU.
- An index built on CUDA holds the features of one built on the CPU (float32 rounding apart), and
  a query on CUDA returns the CPU index's proponents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.data import mnist
from attribution.influence import AttributionConfig
from attribution.model import build_model
from attribution.projection import sketch_add
from index.build import build_index
from index.store import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sketch_on_cuda_is_the_cpu_sketch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 70, generator=g, dtype=torch.float64)
    r = torch.randint(0, 1 << 32, (300,), generator=g, dtype=torch.int64)
    c = torch.randint(0, 1 << 32, (70,), generator=g, dtype=torch.int64)
    cpu = sketch_add(torch.zeros(3, 1000, dtype=torch.float64), x, r, c)
    gpu = sketch_add(torch.zeros(3, 1000, dtype=torch.float64, device="cuda"), x.cuda(), r.cuda(), c.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


def test_build_and_query_on_cuda_match_the_cpu(tmp_path):
    data = mnist(size=8, n=64)
    cfg = AttributionConfig(dim=256, draws=4, curvature_draws=1, query_draws=8, batch_size=16)
    out = {}
    for device in ("cpu", "cuda"):
        model = build_model("tiny", seed=0)
        build_index(model, data, tmp_path / device, cfg, "flat", device=device, progress=False, shard_size=32)
        idx = load(tmp_path / device, model, device=device)
        out[device] = (idx.all_features(), idx.query(data.images[0], k=8))
    f_cpu, f_gpu = out["cpu"][0], out["cuda"][0]
    assert np.abs(f_gpu - f_cpu).max() <= 1e-3 * np.abs(f_cpu).max()
    top_cpu = {h.row for h in out["cpu"][1].proponents}
    top_gpu = {h.row for h in out["cuda"][1].proponents}
    assert len(top_cpu & top_gpu) >= 6
