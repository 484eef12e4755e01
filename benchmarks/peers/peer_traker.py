"""traker's TRAK (TRAKer with its BasicProjector on CPU): f = the example's diffusion loss over its
K rows, out-to-loss gradient Q = 1, and our TRAK ridge (1e-3 × mean eigenvalue of XᵀX) through
traker's own score-computer hook."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from benchmarks.peers.common import TRAK_DAMPING, BenchInputs, PeerResult, example_rows, peak_rss_mb, version
from benchmarks.peers.timer import Timer


def _output_and_ridge():
    """traker's model-output function for the diffusion loss, and a score computer with our ridge."""
    import torch
    from trak.modelout_functions import AbstractModelOutput
    from trak.score_computers import BasicScoreComputer

    class DiffusionLossOutput(AbstractModelOutput):
        """f(z) = the example's diffusion loss over its K rows; out-to-loss gradient Q = 1."""

        def __init__(self):
            pass

        @staticmethod
        def get_output(model, weights, buffers, x, t, y):
            out = torch.func.functional_call(model, (weights, buffers), args=(x, t)).sample
            return (out - y).pow(2).flatten(1).mean(1).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    class RelativeRidge(BasicScoreComputer):
        """XᵀX + λI with λ = TRAK_DAMPING · mean eigenvalue of XᵀX (our TRAK's a-priori rule)."""

        def get_xtx(self, grads):
            xtx = super().get_xtx(grads)
            return xtx + TRAK_DAMPING * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)

    return DiffusionLossOutput, RelativeRidge


def run(setup: dict, inp: BenchInputs, timer: Timer) -> PeerResult:
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    from attribution.influence import QUERY_KEY

    rss0 = peak_rss_mb()
    k, seed, n, q, bs = setup["k"], setup["seed"], setup["n"], inp.queries.shape[0], setup["batch_size"]
    unet = inp.model.unet
    output, ridge = _output_and_ridge()
    save = Path(setup["workdir"]) / "trak"
    shutil.rmtree(save, ignore_errors=True)
    for p in unet.parameters():
        p.requires_grad_(True)
    with timer.stage("featurize_and_finalize"):
        projector = BasicProjector(
            grad_dim=sum(p.numel() for p in unet.parameters()),
            proj_dim=setup["trak_dim"],
            seed=seed,
            proj_type=ProjectionType.normal,
            device="cpu",
            dtype=torch.float32,
            block_size=setup["trak_block"],
        )
        traker = TRAKer(
            model=unet,
            task=output(),
            train_set_size=n,
            save_dir=str(save),
            device="cpu",
            projector=projector,
            use_half_precision=False,
            logging_level=40,
            score_computer=ridge,
        )
        traker.load_checkpoint(unet.state_dict(), model_id=0)
        for i in range(0, n, bs):
            x, t, y = example_rows(inp.model, inp.data.images[i : i + bs], range(i, min(n, i + bs)), k, seed)
            traker.featurize(batch=(x, t, y), num_samples=x.shape[0])
        traker.finalize_features()
    with timer.stage("score_queries"):
        traker.start_scoring_checkpoint("queries", unet.state_dict(), model_id=0, num_targets=q)
        for i in range(0, q, bs):
            x, t, y = example_rows(inp.model, inp.queries[i : i + bs], [QUERY_KEY] * min(bs, q - i), k, seed)
            traker.score(batch=(x, t, y), num_samples=x.shape[0])
        scores = np.asarray(traker.finalize_scores("queries")).T  # (Q, N)
    settings = {
        "proj_dim": setup["trak_dim"],
        "projector": "BasicProjector (normal, float32)",
        "output_function": "diffusion loss (mean over K rows)",
        "ridge": f"{TRAK_DAMPING} x mean eigenvalue of XtX (BasicScoreComputer.get_xtx)",
        "version": version("traker"),
    }
    return PeerResult.from_timer(scores, timer, settings, rss0)
