"""dattri's methods, each on the example's diffusion loss over its K rows:

dattri-trak     TRAKAttributor, with our TRAK ridge (1e-3 × mean eigenvalue of XᵀX)
dattri-datainf  IFAttributorDataInf: its influence function that handles Conv2d (every
                parameter; the empirical Fisher inverted per layer from rank-one terms)
dattri-ekfac    IFAttributorEKFAC (nn.Linear layers with 2-D inputs only; see its note)
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.peers.common import (
    OURS_DAMPING,
    TRAK_DAMPING,
    BenchInputs,
    ExampleRows,
    PeerResult,
    SingleRows,
    peak_rss_mb,
    version,
)
from benchmarks.peers.timer import Timer


def relative_ridge(scale: float):
    """dattri's `regularization` (added to the kernel's diagonal before its solve) made relative:
    `diagonal.add_(relative_ridge(s))` adds s × the mean of that diagonal, i.e. our TRAK ridge
    s · mean eigenvalue of XᵀX, which only exists once dattri has formed XᵀX."""
    import torch

    class RelativeRidge(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if (
                func is torch.Tensor.add_
                and len(args) == 2
                and type(args[1]) is cls
                and type(args[0]) is not cls
            ):
                with torch._C.DisableTorchFunctionSubclass():
                    return args[0].add_(scale * args[0].mean())
            return super().__torch_function__(func, types, args, kwargs or {})

    return torch.zeros(()).as_subclass(RelativeRidge)


def _loss_functions(unet):
    import torch

    def unet_rows(params, x, t):
        """ε̂ for rows given with any leading shape: x (..., C, H, W), t (...)."""
        return torch.func.functional_call(
            unet, params, args=(x.reshape(-1, *x.shape[-3:]), t.reshape(-1))
        ).sample

    def loss_func(params, item):
        """The example's diffusion loss, mean over its K rows (dattri passes (K, ...) or (1, K, ...))."""
        x, t, y = item
        return (unet_rows(params, x, t) - y.reshape(-1, *y.shape[-3:])).pow(2).flatten(1).mean(1).mean()

    return unet_rows, loss_func


def _cache_and_attribute(
    timer: Timer,
    att,
    cache_loader,
    train,
    query_set,
    bs: int,
    after_cache=None,
    train_in_attribute: bool = True,
):
    """dattri's two stages, timed: att.cache(cache_loader) (then `after_cache()`), then
    att.attribute over the queries (and the training items); returns the (N, Q) scores."""
    from torch.utils.data import DataLoader

    with timer.stage("cache"):
        att.cache(cache_loader)
        if after_cache is not None:
            after_cache()
    with timer.stage("attribute"):
        queries = DataLoader(query_set, batch_size=bs, shuffle=False)
        if train_in_attribute:
            return att.attribute(DataLoader(train, batch_size=bs, shuffle=False), queries)
        return att.attribute(queries)


def _trak(setup, inp, timer, task, train, query_set, bs):
    import torch
    from dattri.algorithm.trak import TRAKAttributor
    from torch.utils.data import DataLoader

    def zero_prob(params, item):  # TRAK's Q = 1 − p; f is the loss itself, so Q = 1
        return torch.zeros(())

    att = TRAKAttributor(
        task,
        correct_probability_func=zero_prob,
        device="cpu",
        projector_kwargs={"proj_dim": setup["trak_dim"], "device": "cpu", "proj_seed": setup["seed"]},
        regularization=relative_ridge(TRAK_DAMPING),
    )
    scores = _cache_and_attribute(
        timer,
        att,
        DataLoader(train, batch_size=bs, shuffle=False),
        train,
        query_set,
        bs,
        train_in_attribute=False,
    )
    return (
        scores,
        {
            "proj_dim": setup["trak_dim"],
            "ridge": f"{TRAK_DAMPING} x mean eigenvalue of XtX (dattri's regularization, relative)",
            "version": version("dattri"),
        },
        None,
    )


def _datainf(setup, inp, timer, task, train, query_set, bs):
    from dattri.algorithm.influence_function import IFAttributorDataInf
    from torch.utils.data import DataLoader

    att = IFAttributorDataInf(task, device="cpu", regularization=1.0)

    def datainf_damping():  # DataInf's rule: 0.1 × mean squared training-gradient entry (one value)
        att.regularization = float(0.1 * att._cached_train_reps[0].pow(2).mean())

    scores = _cache_and_attribute(
        timer, att, DataLoader(train, batch_size=bs, shuffle=False), train, query_set, bs, datainf_damping
    )
    return (
        scores,
        {
            "regularization": att.regularization,
            "regularization_rule": "0.1 x mean squared training-gradient entry",
            "curvature": "empirical Fisher of the diffusion loss, DataInf's closed form",
            "version": version("dattri"),
        },
        None,
    )


def _ekfac(setup, inp, timer, task_args, train, query_set, bs):
    """IFAttributorEKFAC handles nn.Linear only, and only 2-D Linear inputs."""
    import torch
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    unet, (unet_rows, loss_func) = inp.model.unet, task_args
    linear2d = [
        name
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (name.startswith("time_embedding") or name.endswith("time_emb_proj"))
    ]
    d = float(inp.queries[0].numel())

    def target_func(params, item):
        """Rows with z (curvature fit): the MC-GGN loss with our samples; else the diffusion loss."""
        if len(item) == 3:
            return loss_func(params, item)
        x, t, y, z = item
        out = unet_rows(params, x, t)
        return (out - (out.detach() - math.sqrt(d / 2) * z)).pow(2).flatten(1).mean(1).mean()

    task = AttributionTask(
        loss_func=loss_func, model=unet, checkpoints=unet.state_dict(), target_func=target_func
    )
    att = IFAttributorEKFAC(task, module_name=linear2d, device="cpu", damping=0.0)

    def our_damping():  # per layer
        for name, lam in att.cached_lambdas.items():
            att.cached_lambdas[name] = lam + OURS_DAMPING * lam.mean()

    rows = SingleRows(inp.model, inp.data.images, range(setup["n"]), setup["kc"], setup["seed"])
    scores = _cache_and_attribute(
        timer,
        att,
        DataLoader(rows, batch_size=bs * setup["kc"], shuffle=False),
        train,
        query_set,
        bs,
        our_damping,
    )
    settings = {
        "layers": linear2d,
        "params_covered": sum(
            p.numel() for nm, p in unet.named_parameters() if nm.rsplit(".", 1)[0] in linear2d
        ),
        "params_total": sum(p.numel() for p in unet.parameters()),
        "damping": f"{OURS_DAMPING} x mean corrected eigenvalue per layer",
        "fisher": "MC GGN with our samples z (rows), test side: diffusion loss",
        "version": version("dattri"),
    }
    note = (
        "dattri's EK-FAC supports nn.Linear only (no Conv2d) and fails on Linear layers with 3-D inputs "
        "(attention tokens); run on the 2-D-input Linear layers only (time embedding), so its scores cover "
        "a small part of the model"
    )
    return scores, settings, note


def run(setup: dict, inp: BenchInputs, timer: Timer, method: str) -> PeerResult:
    from dattri.task import AttributionTask

    from attribution.influence import QUERY_KEY

    rss0 = peak_rss_mb()
    k, seed, n, q, bs = setup["k"], setup["seed"], setup["n"], inp.queries.shape[0], setup["batch_size"]
    unet = inp.model.unet
    for p in unet.parameters():
        p.requires_grad_(True)
    train = ExampleRows(inp.model, inp.data.images, range(n), k, seed)
    query_set = ExampleRows(inp.model, inp.queries, [QUERY_KEY] * q, k, seed)
    unet_rows, loss_func = _loss_functions(unet)
    if method == "dattri-ekfac":
        scores, settings, note = _ekfac(setup, inp, timer, (unet_rows, loss_func), train, query_set, bs)
    else:
        task = AttributionTask(loss_func=loss_func, model=unet, checkpoints=unet.state_dict())
        fn = {"dattri-trak": _trak, "dattri-datainf": _datainf}[method]
        scores, settings, note = fn(setup, inp, timer, task, train, query_set, bs)
    return PeerResult.from_timer(
        np.asarray(scores.detach().T, dtype=np.float32), timer, settings, rss0, note=note
    )
