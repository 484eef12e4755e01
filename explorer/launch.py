"""Start the explorer app: options, the model and its indexes, serving.

    python app.py [--model DIR] [--index DIR[,DIR…]] [--host 127.0.0.1] [--port 7860]
    attribution demo | serve [the same options]       (the same, through the CLI)

Environment variables (used when the flag is not given): ATTRIBUTION_MODEL (model folder),
ATTRIBUTION_INDEX (comma-separated index folders; several give a method selector; a folder that
holds no finished index yet is built there in the background, e.g. a Space's persistent /data/index,
with the default settings plus ATTRIBUTION_BUILD_ARGS, e.g. "--data DIR --n 500"),
GRADIO_SERVER_NAME, GRADIO_SERVER_PORT; a flag that is given always wins. Binding anywhere but
loopback prints a one-line warning. From the command line the server runs with
MALLOC_ARENA_MAX=2 (`limit_malloc_arenas`). Without options the default model (assets/mnist-unet)
and the default index (indexes/mnist-ekfac) are used; a missing default index is built first,
in the background, while the page shows its progress.

    python app.py --model mnist-unet,mnist-latent   (or attribution serve --model …)

Several models: a model selector, one tab per model, each answering from its own default index.
The first model's API names are as with one model (`/attribute`, `/attribute_generated`,
`/attribute_by_band`, `/attribute_conditional`, `/attribute_generated_conditional`,
`/self_influence`, `/compare`); every later model's take a prefix made of its name
(`api_prefix`: `mnist-latent` gives `/mnist_latent_attribute_generated_conditional`,
`/mnist_latent_compare`, …; a model folder, its folder's name).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from attribution.console import say
from explorer.cli import add_serve_args


def serve(
    demo,
    host: str = "127.0.0.1",
    port: int = 7860,
    prevent_thread_lock: bool = False,
    concurrency: int = 1,
    warmup: bool = True,
    **kwargs,
):
    """Queue (`concurrency` requests per event at once; the model runs one at a time anyway, and
    8 clients × 5 queries ran ~10% faster with 1 than with 4, which only adds waiting threads;
    Gradio's queue shows a waiting user its position), launch,
    then warm the model up and start a pending index build (both in the background, after launch,
    so that the page answers at once)."""
    from explorer.render import CSS

    refuse_url_files(demo)
    demo.queue(default_concurrency_limit=concurrency)
    out = demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        css=CSS,
        show_error=True,
        max_file_size="64mb",
        footer_links=["api"],
        state_session_capacity=500,
        **kwargs,
    )  # a session's state is ~0.3 MB
    explorers = getattr(demo, "explorers", None) or [e for e in [getattr(demo, "explorer", None)] if e]
    for ex in explorers:
        if warmup and ex.ready:
            threading.Thread(target=ex.warmup, daemon=True, name="warm-up").start()
    if len(explorers) == 1:
        explorers[0].start_build()
    elif any(ex.build is not None for ex in explorers):  # several models: their builds in turn
        threading.Thread(target=_builds_in_turn, args=(explorers,), daemon=True, name="builds").start()
    if not prevent_thread_lock:
        demo.block_thread()
    return out


def _builds_in_turn(explorers) -> None:
    for ex in explorers:
        ex.start_build()
        if ex.build is not None and ex.build.is_alive():
            ex.build.join()


URL_REFUSED = "a file given as a URL is refused (it is never fetched): send the file itself"


def refuse_url_files(demo) -> None:
    """An http(s) URL as the path of a file payload (an API call can send one) is refused before
    anything is fetched: Gradio would download it into its cache before the handler runs."""
    import gradio as gr
    from gradio_client.utils import is_http_url_like

    def guard(move, is_async: bool):
        def check(path):
            if path is not None and is_http_url_like(str(path)):
                raise gr.Error(URL_REFUSED, print_exception=False)

        if is_async:

            async def guarded(path):
                check(path)
                return await move(path)
        else:

            def guarded(path):
                check(path)
                return move(path)

        guarded.url_guard = True
        return guarded

    for block in demo.blocks.values():
        for name, is_async in (
            ("async_move_resource_to_block_cache", True),
            ("move_resource_to_block_cache", False),
        ):
            move = getattr(block, name, None)
            if move is not None and not getattr(move, "url_guard", False):
                setattr(block, name, guard(move, is_async))


def restrict_image_decoders() -> None:
    """Pillow identifies files only as the accepted formats in this process: the page's image
    component opens an upload with Pillow before the library's `open_image` (which has its own
    allow-list) sees it, and must not reach the EPS (Ghostscript) or any other plugin."""
    from PIL import Image

    from attribution.data import ACCEPTED_FORMATS

    Image.init()
    Image.ID[:] = [f for f in Image.ID if f in ACCEPTED_FORMATS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_serve_args(p)
    return p.parse_args(argv)


def _address(args: argparse.Namespace) -> tuple[str, int]:
    """Host and port: a flag that was given wins; else the environment (a Space sets
    GRADIO_SERVER_NAME=0.0.0.0); else 127.0.0.1:7860. ConfigError for a port that is not one."""
    from attribution.errors import ConfigError

    host = getattr(args, "host", None) or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = getattr(args, "port", None)
    if port is None:
        text = os.environ.get("GRADIO_SERVER_PORT") or "7860"
        try:
            port = int(text)
        except ValueError:
            raise ConfigError(f"GRADIO_SERVER_PORT={text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not between 0 and 65535")
    return host, port


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str) -> None:
    """One line when the app will listen beyond this machine."""
    if not is_loopback(host):
        say(
            f"warning: listening on {host}, not only on this machine: anyone who can reach this "
            "address can use the app; give --host 127.0.0.1 to keep it local"
        )


ARENA_MAX = "2"


def limit_malloc_arenas() -> None:
    """Re-execute this very command with MALLOC_ARENA_MAX=2 unless the variable is set already.

    glibc gives each thread that contends for malloc its own arena (up to 8 × cores); the
    server's request threads then fragment memory and its RSS grew from 1.2 to 2.2 GB over 360
    queries (issue 14), against ~1.0 GB with two arenas. glibc reads the variable once, when the
    process starts, so setting os.environ now would do nothing: the process replaces itself
    (os.execv, same pid, same arguments: `sys.orig_argv`) with the variable set. Called only by
    the command-line entry points (`attribution serve|demo`, `python app.py`), never when the
    app is started from Python. Set MALLOC_ARENA_MAX yourself to choose another value."""
    import platform
    import sys

    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return
    os.environ["MALLOC_ARENA_MAX"] = ARENA_MAX
    argv = list(getattr(sys, "orig_argv", []))
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    except OSError as e:  # keep running without the limit
        say(f"note: could not restart with MALLOC_ARENA_MAX={ARENA_MAX} ({e}); memory may grow under load")


def default_index(model_path: str | None) -> Path:
    """The default index of the model: indexes/mnist-latent-ekfac for the shipped latent model
    (`--model mnist-latent` or its folder), else indexes/mnist-ekfac (the default model's)."""
    from attribution.model import SHIPPED_MODELS, model_dir
    from explorer.build_job import DEFAULT_INDEX

    latent = SHIPPED_MODELS["mnist-latent"].resolve()
    if model_path is not None and model_dir(model_path).resolve() == latent:
        return DEFAULT_INDEX.with_name("mnist-latent-ekfac")
    return DEFAULT_INDEX


def _is_shipped(model_path: str | None) -> bool:
    from attribution.model import SHIPPED_MODELS, model_dir

    shipped = {p.resolve() for p in SHIPPED_MODELS.values()}
    return model_path is None or model_dir(model_path).resolve() in shipped


def _load_indexes(index_dirs: list[Path], model, model_path: str | None, device, build_missing=()):
    """The indexes that load, and the build of a missing index (None: nothing to build): the
    default index, or a folder in `build_missing` (those named by ATTRIBUTION_INDEX, e.g. a Space's
    persistent /data/index) that holds no finished index yet; it is built there in the background
    with the default settings plus ATTRIBUTION_BUILD_ARGS (`attribution index build` options), and
    loaded from there on later starts. Raises IndexLoadError for any other index that does not load."""
    from attribution.errors import IndexLoadError
    from explorer.build_job import build_spec
    from index.layout import IndexLayout
    from index.store import load as load_index

    indexes, build = [], None
    for d in index_dirs:
        try:
            indexes.append(load_index(d, model, device=device))
        except IndexLoadError as e:
            is_default = d.resolve() == default_index(model_path).resolve() and _is_shipped(model_path)
            buildable = d in build_missing and not IndexLayout(d).is_finished and build is None
            if not (is_default or buildable):
                raise IndexLoadError(
                    f"{e}\nbuild it with: attribution index build --model "
                    f"{model_path or 'assets/mnist-unet'} --out {d}"
                ) from None
            say(f"{e}\nbuilding the index at {d} in the background; the page shows its progress")
            build = {
                **build_spec(d, os.environ.get("ATTRIBUTION_BUILD_ARGS", "")),
                "model_path": model_path or "default",
            }
    return indexes, build


def api_prefix(name: str) -> str:
    """A model's prefix for its API names: its shipped name or its folder's name, lower case,
    every run of other characters one '_' ('mnist-latent' -> 'mnist_latent'; 'model' if none)."""
    import re

    base = Path(name.strip().rstrip("/\\")).name.lower()
    return re.sub(r"[^a-z0-9]+", "_", base).strip("_") or "model"


def prefix_api_names(demo, prefix: str) -> None:
    """Every named event of `demo` (not yet rendered) renamed `{prefix}_{name}`."""
    for fn in demo.fns.values():
        if isinstance(fn.api_name, str):
            fn.api_name = f"{prefix}_{fn.api_name}"


def model_tabs(names: list[str], demos: list):
    """The model selector: one tab per model, each holding that model's whole page. The first
    model's API names stay as they are; every later model's take its `api_prefix` (made unique
    by its position where two models' names give the same prefix)."""
    import gradio as gr

    used = set()
    for i, (name, d) in enumerate(zip(names, demos)):
        if i:
            p = api_prefix(name)
            p = p if p not in used else f"{p}_{i + 1}"
            used.add(p)
            prefix_api_names(d, p)
    with gr.Blocks(title="Training-data attribution explorer", delete_cache=(3600, 7200)) as outer:
        with gr.Tabs():
            for name, d in zip(names, demos):
                with gr.Tab(name):
                    d.render()
    outer.explorers = [d.explorer for d in demos]
    return outer


def _several_models(args, names: list[str], index_arg: str, host: str, port: int) -> int:
    """`--model a,b`: the model selector (`model_tabs`); each model answers from its own default
    index (`default_index`), built in the background when missing, one build after another. Every
    model after the first has its API names prefixed (`model_tabs`, `api_prefix`:
    `/mnist_latent_attribute_generated_conditional`)."""
    from attribution.errors import ConfigError, IndexLoadError, ModelError
    from attribution.model import pick_device
    from explorer.cli_args import load_model
    from explorer.service import Explorer
    from explorer.ui import build_demo

    if index_arg:
        say(
            "error: with several models (--model a,b) each uses its own default index; --index is for one model"
        )
        return 2
    device, t0, demos = pick_device(getattr(args, "device", None)), time.time(), []
    try:
        for name in names:
            model = load_model(name, device=device)
            indexes, build = _load_indexes([default_index(name)], model, name, device)
            demos.append(build_demo(model, explorer=Explorer(model, indexes), build=build))
    except (ModelError, IndexLoadError, ConfigError) as e:
        say(f"error: {e}")
        return 2
    restrict_image_decoders()
    _one_thread(device)
    say(f"{len(names)} models loaded in {time.time() - t0:.1f} s; open http://{host}:{port} (Ctrl+C to stop)")
    serve(model_tabs(names, demos), host, port, concurrency=getattr(args, "concurrency", None) or 1)
    return 0


def _one_thread(device) -> None:
    import torch

    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # One query is many small ops: on a shared 2-core machine two OpenMP threads made it
        # 4-10x slower than one (0.6-2.5 s vs 0.13-0.19 s per query, default model); an index
        # build still uses every core. Set OMP_NUM_THREADS to choose.
        torch.set_num_threads(1)


def main(args: argparse.Namespace | None = None) -> int:
    """Start the app (`args` from `parse_args` or the CLI's serve/demo: model, index, host, port)."""

    from attribution.errors import ConfigError, IndexLoadError, ModelError
    from attribution.model import pick_device
    from explorer.cli_args import load_model  # a ModelError for invalid config files, too
    from explorer.service import Explorer
    from explorer.ui import build_demo

    if args is None:  # `python app.py`: the command line is this process's own
        args = parse_args()
        limit_malloc_arenas()
    model_path = getattr(args, "model", None) or os.environ.get("ATTRIBUTION_MODEL") or None
    index_arg = getattr(args, "index", None) or os.environ.get("ATTRIBUTION_INDEX") or ""
    try:
        host, port = _address(args)
    except ConfigError as e:
        say(f"error: {e}")
        return 2
    warn_if_exposed(host)
    if model_path and "," in model_path:  # the model selector
        names = [m.strip() for m in model_path.split(",") if m.strip()]
        return _several_models(args, names, index_arg if getattr(args, "index", None) else "", host, port)
    index_dirs = [Path(s.strip()) for s in index_arg.split(",") if s.strip()] or [default_index(model_path)]
    device = pick_device(getattr(args, "device", None))
    t0 = time.time()
    try:
        model = load_model(model_path, device=device)
    except ModelError as e:
        hint = "" if model_path else " (train it with `attribution train --out assets/mnist-unet`)"
        say(f"error: {e}{hint}")
        return 2
    try:
        from_env = (
            index_dirs if not getattr(args, "index", None) and os.environ.get("ATTRIBUTION_INDEX") else []
        )
        indexes, build = _load_indexes(
            index_dirs, model, model_path, device, from_env
        )  # from_env: built if missing
    except (IndexLoadError, ConfigError) as e:
        say(f"error: {e}")
        return 2
    restrict_image_decoders()
    demo = build_demo(model, explorer=Explorer(model, indexes), build=build)
    _one_thread(device)
    say(
        f"model and {len(indexes)} index(es) loaded in {time.time() - t0:.1f} s; "
        f"open http://{host}:{port} (Ctrl+C to stop)"
    )
    serve(demo, host, port, concurrency=getattr(args, "concurrency", None) or 1)
    return 0
