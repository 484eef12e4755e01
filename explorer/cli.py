"""The `attribution` command: train, sample, scores, index build, query, evaluate, serve, demo.

Every failure meant for the user (`attribution.errors.AttributionError`) is printed as one line,
`error: …`, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from attribution.console import say
from explorer.cli_args import (
    DECAY,
    NON_NEGATIVE,
    PORT,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    Parser,
    load_model,
    output,
    write,
)
from explorer.cli_evaluate import add_evaluate


def cmd_train(a: argparse.Namespace) -> None:
    from dataclasses import asdict

    from attribution.data import load_dataset
    from attribution.model import build_model, save_model
    from attribution.train import TrainConfig, train

    cfg = TrainConfig(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, ema_decay=a.ema_decay, warmup=a.warmup
    )
    previous = None
    if a.init:  # continue training a saved model: its (EMA) weights are the starting point
        model = load_model(a.init)
        info = Path(a.init) / "training.json"
        previous = (
            json.loads(info.read_text()) if info.exists() else {"weights_sha256": model.weights_sha256()}
        )
        name = f"the model in {a.init}"
    else:
        model = build_model(a.preset, seed=a.seed)
        name = f"preset {a.preset!r}"
    ds = load_dataset(a.data, channels=model.channels, size=model.size, n=a.n)
    n_params = sum(p.numel() for p in model.unet.parameters())
    say(
        f"training {name} ({n_params / 1e6:.2f}M parameters) on {len(ds)} images "
        f"from {a.data} for {cfg.steps} steps of {cfg.batch_size}; checkpoints in {a.workdir}"
    )
    t0 = time.time()
    model = train(model, ds.images, cfg, workdir=a.workdir, device=a.device or "cpu")
    extra = {
        "command": " ".join(["attribution", *sys.argv[1:]]),
        "preset": a.preset,
        "data": a.data,
        "n": len(ds),
        "data_sha256": ds.fingerprint(),
        "config": asdict(cfg),
        "seconds": round(time.time() - t0, 1),
    }
    if previous is not None:
        extra["continued_from"] = previous
    save_model(model, a.out, extra=extra)
    say(f"saved the EMA model to {a.out} ({time.time() - t0:.0f} s)")


def cmd_sample(a: argparse.Namespace) -> None:
    from attribution.data import grid, save_images
    from attribution.model import pick_device
    from attribution.sample import sample

    model = load_model(a.model, device=pick_device(a.device))
    conds = _sample_conditions(model, a.condition, a.n)
    say(f"sampling {a.n} images with {a.sampler.upper()} ({a.steps} steps, seed {a.seed})")
    s = sample(
        model, a.n, seed=a.seed, sampler=a.sampler, steps=a.steps, conditions=conds, guidance_scale=a.guidance
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grid(s.images, nrow=a.nrow).save(out / "grid.png")
    if not a.grid_only:
        save_images(s.images, out, prefix="sample_")
    say(f"wrote {out / 'grid.png'}" + ("" if a.grid_only else f" and {a.n} PNGs in {out}"))


def _sample_conditions(model, value: str | None, n: int):
    """`sample --condition`: a class (name or id) or a prompt for every image; a class-conditional
    model without one cycles through its classes (the null class left out)."""
    from attribution.conditions import Conditions
    from attribution.errors import DataError
    from index.conditions import class_id

    kind = model.condition_kind
    if kind == "none":
        if value:
            raise DataError("the model is unconditional: it takes no --condition")
        return None
    if kind == "text":
        if not value:
            raise DataError("the model is text-conditional: give --condition PROMPT")
        return Conditions.prompts([value] * n)
    cmap, null = model.class_map or {}, model.conditioning.get("null_class")
    if value is None:
        ids = sorted(set(cmap.values()) or range(model.unet.config.get("num_class_embeds") or 1))
        ids = [c for c in ids if c != null] or [0]
        return Conditions.classes([ids[i % len(ids)] for i in range(n)], model.class_map)
    return Conditions.classes([class_id(value, cmap)] * n, model.class_map)


def _method_config(a: argparse.Namespace):
    from attribution.influence import AttributionConfig, dim_arg

    kw = {"method": a.method, "seed": a.seed, "dim": dim_arg(getattr(a, "dim", None))}
    if a.draws is not None:
        kw["draws"] = a.draws
    if getattr(a, "projection", None):
        kw["projection"] = a.projection
    if getattr(a, "damping", None) is not None:
        kw["damping"] = a.damping
    return AttributionConfig(**kw)


def _scoring_inputs(a: argparse.Namespace):
    """What `scores` and `stability` read: (device, model, training images, query images, config)."""
    from attribution.data import image_folder
    from attribution.model import pick_device

    device = pick_device(a.device)
    model = load_model(a.model, device=device)
    train = model.prepare(image_folder(a.data, model.channels, model.size, class_map=model.class_map))
    known = train.conditions.class_map if train.conditions is not None else None
    queries = model.prepare(image_folder(a.queries, model.channels, model.size, class_map=known))
    return device, model, train, queries, _method_config(a)


def cmd_stability(a: argparse.Namespace) -> None:
    from attribution.stability import seed_stability

    js = output(a.json, "--json") if a.json else None
    device, model, train, queries, cfg = _scoring_inputs(a)
    say(
        f"seed stability of {cfg.method} (draws {cfg.draws}, query draws {cfg.query_draws}, D = "
        f"{cfg.dim or 'unprojected'}): {len(queries)} queries × {len(train)} training images, seeds "
        f"{a.seeds[0]} and {a.seeds[1]} (every random choice differs between them)"
    )
    res = seed_stability(model, train, queries.images.to(device), cfg, tuple(a.seeds), a.k, device=device)
    say(
        f"per-query Spearman {res['spearman']:.3f}, top-{res['k']} overlap {res['top_k_overlap']:.2f} "
        f"(per query {res['per_query_overlap']} of {res['k']})"
    )
    if js:
        write(js, "--json", lambda path: path.write_text(json.dumps(res, indent=2)))
        say(f"wrote {js}")


def cmd_scores(a: argparse.Namespace) -> None:
    import numpy as np

    from attribution.influence import Attributor

    out = output(a.out, "--out", ".npy")  # before the work: np.save writes NAME.npy for --out NAME
    device, model, train, queries, cfg = _scoring_inputs(a)
    say(
        f"scoring {len(queries)} queries against {len(train)} training images with {cfg.method} "
        f"(draws {cfg.draws}, D = {cfg.dim or 'unprojected'}, seed {cfg.seed}) on {device}"
    )
    t0 = time.time()
    cond = model.null_condition(len(queries)) if a.null_condition else queries.conditions
    att = Attributor(model, train, cfg, device=device).fit()
    scores = att.scores(queries.images.to(device), cond=cond).cpu().numpy().astype(np.float32)
    write(out, "--out", lambda path: np.save(path, scores))
    say(
        f"wrote {out}: float32 {scores.shape} (queries × training images, positive = proponent) "
        f"in {time.time() - t0:.0f} s"
    )


def cmd_index_build(a: argparse.Namespace) -> None:
    from index.build_cli import run_build

    run_build(a)


def cmd_index_rerank(a: argparse.Namespace) -> None:
    from index.rerank_stage import add_rerank, rerank_options

    add_rerank(a.index, rerank_options(a))


def cmd_query(a: argparse.Namespace) -> None:
    from attribution.data import load_image
    from attribution.model import pick_device
    from index.conditions import manifest_family, model_input, query_condition, shown
    from index.store import load

    js = output(a.json, "--json") if a.json else None
    device = pick_device(a.device)
    model = load_model(a.model, device=device)
    idx = load(a.index, model, device=device)
    cond = query_condition(idx.manifest, next((v for v in (a.cls, a.prompt, a.condition) if v), None))
    image = model_input(model, load_image(a.image, model.channels, model.size).to(device))  # latent: encoded
    k = min(a.top_k, len(idx))
    if k < a.top_k:
        say(f"note: --top-k {a.top_k} is more than the {len(idx)} images in the index; showing all {k}")
    res = idx.query(image, k=k, cond=cond)
    if cond is not None:
        say(f"query condition: {shown(cond)}")
    print(
        f"{'rank':>4}  {'proponent':>9}  {'label':>5}  {'score':>11}  {'± se':>8}    "
        f"{'opponent':>9}  {'label':>5}  {'score':>11}  {'± se':>8}"
    )

    def se(h) -> str:  # '~': not distinguishable from the first one not shown
        return "–" if h.se is None else f"{h.se:.1e}" + ("~" if h.distinct is False else " ")

    for p, o in zip(res.proponents, res.opponents):
        print(
            f"{p.rank:>4}  {p.row:>9}  {p.label:>5}  {p.score:>11.4e}  {se(p):>8}    "
            f"{o.row:>9}  {o.label:>5}  {o.score:>11.4e}  {se(o):>8}"
        )
    if res.stability:
        st = res.stability
        say(
            f"stability: {st['distinct_proponents']} of {len(res.proponents)} proponents are more than "
            f"{st['z']:g} standard errors above the first one not shown ('~' marks the others)"
        )
    t = res.timings
    say(f"query gradient {t['query_gradient'] * 1e3:.0f} ms, search {t['search'] * 1e3:.1f} ms")
    if a.json:
        out = {"image": str(a.image), "index": str(a.index), "method": idx.method}
        out.update(condition=shown(cond), model_family=manifest_family(idx.manifest), **res.to_dict())
        write(js, "--json", lambda path: path.write_text(json.dumps(out, indent=2)))
        say(f"wrote {js}")


def cmd_serve(a: argparse.Namespace) -> int:
    from explorer.launch import main as launch

    return launch(a)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a diffusion model (resumable)")
    t.add_argument("--data", default="mnist", help="'mnist' (embedded) or an image folder")
    t.add_argument("--preset", default="mnist")
    t.add_argument("--n", type=POSITIVE, default=None, help="use only the first N images")
    t.add_argument("--steps", type=POSITIVE, default=2000)
    t.add_argument("--batch-size", type=POSITIVE, default=128)
    t.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    t.add_argument("--warmup", type=NON_NEGATIVE, default=100)
    t.add_argument("--ema-decay", type=DECAY, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="continue training this model folder (else: a fresh preset)")
    t.add_argument("--workdir", default="runs/train", help="checkpoints (resumed if present)")
    t.add_argument("--out", required=True, help="model folder to write")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample images, write a grid and PNGs")
    s.add_argument("--model", default=None, help="model folder (default: assets/mnist-unet)")
    s.add_argument("--n", type=POSITIVE, default=64)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=POSITIVE, default=50)
    s.add_argument("--nrow", type=POSITIVE, default=8)
    s.add_argument(
        "--condition",
        default=None,
        help="a class (name or id) or prompt; a class model cycles its classes without",
    )
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    s.add_argument("--grid-only", action="store_true")
    s.add_argument("--out", default="out/samples")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_sample)


def _add_scoring_args(p: argparse.ArgumentParser, methods: list[str]) -> None:
    """What `scores` and `stability` share: the model, the folders and the method's settings."""
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder of training images (file-name order)")
    p.add_argument("--queries", required=True, help="folder of query images (file-name order)")
    p.add_argument("--method", default="ekfac", choices=methods)
    p.add_argument("--draws", type=POSITIVE, default=None)
    p.add_argument("--dim", type=NON_NEGATIVE, default=None, help="projection budget D (0: unprojected)")
    p.add_argument(
        "--projection",
        default=None,
        choices=["sketch", "kronecker"],
        help="count sketch (default, faithful) or Kronecker (the K-FAC fast path)",
    )
    p.add_argument(
        "--damping",
        type=POSITIVE_FLOAT,
        default=None,
        help="relative damping λ / mean eigenvalue (default: the method's, 0.1 for K-FAC/EK-FAC)",
    )
    p.add_argument("--device", default=None)


def _add_scores(sub, methods: list[str]) -> None:
    sc = sub.add_parser("scores", help="dense influence scores of query images on training images")
    _add_scoring_args(sc, methods)
    sc.add_argument("--out", required=True, help="scores.npy: float32 (queries, training images)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument(
        "--null-condition",
        action="store_true",
        help="measure queries under the null condition (empty prompt / null class): the unconditional "
        "measurement of classifier-free-guided samples; default: each query's own condition",
    )
    sc.set_defaults(func=cmd_scores)


def _add_stability(sub, methods: list[str]) -> None:
    st = sub.add_parser("stability", help="seed-to-seed Spearman and top-k overlap of a method (JSON)")
    _add_scoring_args(st, methods)
    st.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("S1", "S2"))
    st.add_argument("--k", type=POSITIVE, default=10, help="top-k for the overlap")
    st.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    st.add_argument("--json", default=None, help="write the figures (per query too) here")
    st.set_defaults(func=cmd_stability)


def _add_index(sub) -> None:
    from index.build_cli import add_build_args
    from index.rerank_stage import add_rerank_args

    ix = sub.add_parser("index", help="build the FAISS index of training features")
    ixs = ix.add_subparsers(dest="index_cmd", required=True)
    b = ixs.add_parser("build", help="build or resume an index")
    add_build_args(b)
    b.set_defaults(func=cmd_index_build)
    rr = ixs.add_parser("rerank", help="add the retrieve-and-rerank files to a finished index")
    rr.add_argument("index", help="index folder")
    add_rerank_args(rr, flag=False)
    rr.set_defaults(func=cmd_index_rerank)


def _add_query(sub) -> None:
    q = sub.add_parser("query", help="top-k proponents and opponents of one image")
    q.add_argument("--index", required=True)
    q.add_argument("--image", required=True)
    q.add_argument("--model", default=None, help="model folder (default: assets/mnist-unet)")
    q.add_argument(
        "--top-k", type=POSITIVE, default=16, help="hits per side (at least 1; at most the index size)"
    )
    q.add_argument("--json", default=None, help="write the result as JSON here")
    q.add_argument("--device", default=None)
    c = q.add_mutually_exclusive_group()  # a conditional model's query condition
    c.add_argument("--class", dest="cls", default=None, help="the query's class (a name or an id)")
    c.add_argument("--prompt", default=None, help="the query's prompt (text-conditional models)")
    c.add_argument("--condition", default=None, help="the query's class or prompt, whichever the model takes")
    q.set_defaults(func=cmd_query)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The options of the app: `attribution serve`, `attribution demo` and `python app.py`."""
    p.add_argument(
        "--model",
        default=None,
        help="model folder or shipped name (env ATTRIBUTION_MODEL; default assets/mnist-unet); "
        "several, comma-separated (mnist-unet,mnist-latent): a model selector, each with its default index",
    )
    p.add_argument(
        "--index",
        default=None,
        help="index folder(s), comma-separated (env ATTRIBUTION_INDEX; "
        "default indexes/mnist-ekfac, built if missing)",
    )
    p.add_argument("--host", default=None, help="address to bind (env GRADIO_SERVER_NAME; default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=None, help="port (env GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--concurrency",
        type=POSITIVE,
        default=None,
        help="requests per event handled at once (the model runs one at a time; default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    from attribution.influence import METHODS

    p = Parser(prog="attribution", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_scores(sub, list(METHODS))
    _add_stability(sub, list(METHODS))
    _add_index(sub)
    _add_query(sub)
    add_evaluate(sub, list(METHODS))
    for name in ("serve", "demo"):
        sv = sub.add_parser(name, help="start the explorer app (builds the default index if missing)")
        add_serve_args(sv)
        sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from attribution.errors import AttributionError

    args = build_parser().parse_args(argv)
    if argv is None and args.cmd in ("serve", "demo"):  # the server's own process: see explorer.launch
        from explorer.launch import limit_malloc_arenas

        limit_malloc_arenas()
    try:
        return args.func(args) or 0
    except AttributionError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; rerun the same command to resume where it applies")
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "add_serve_args"]
