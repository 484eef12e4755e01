"""The page's two other views, each a tab beside "Attribute": the memorisation audit (training
images by self-influence; generated samples whose top proponent dominates, paired with it) and
methods side by side (one query, two indexes). A conditional model's tabs have a class or
prompt box (explorer/conditions_view.py): the audit's samples are generated under it (a class
model's default: each class in turn), a training image is compared under it (default: its own).
The work is explorer/audit.py and explorer/compare.py through `Explorer`; this module is layout
and events only."""

from __future__ import annotations

import logging
from dataclasses import replace

import gradio as gr
import numpy as np

from explorer import audit, compare, exports
from explorer.conditions_view import EVERY_CLASS, OWN_CONDITION, condition_box, given
from explorer.render import GALLERY_PX, enlarge, plain
from explorer.service import Busy, Explorer

log = logging.getLogger("attribution.app")
EXPECTED = (ValueError, Busy)  # AttributionError is a ValueError: a message for the user
RANKINGS = ("self-influence", f"group self-influence (itself and its {audit.GROUP - 1} strongest proponents)")


def _fail(e: Exception) -> None:
    if not isinstance(e, EXPECTED):
        log.exception("view failed")
    raise gr.Error(plain(str(e)), print_exception=False) from None


def _thumb(thumbs, row: int):
    return enlarge(thumbs[row], GALLERY_PX) if thumbs is not None else None


def pair_image(sample: np.ndarray, train: np.ndarray, px: int = 2 * GALLERY_PX):
    """A sample and a training image side by side (a 2-pixel grey gap), enlarged."""
    a, b = np.asarray(sample), np.asarray(train).reshape(np.asarray(sample).shape)
    gap = np.full((a.shape[0], 2, *a.shape[2:]), 128, np.uint8)
    return enlarge(np.concatenate([a, gap, b], axis=1), px)


def si_gallery(rows: list[dict], thumbs, group: bool) -> list:
    key = "group_self_influence" if group else "self_influence"
    return [
        (_thumb(thumbs, r["row"]), f"#{r['rank']} · id {r['row']} · label {r['label']} · {r[key]:+.3g}")
        for r in rows
    ]


def pairs_gallery(pairs: dict, thumbs) -> list:
    out = []
    for r in pairs["samples"]:
        img = pairs["images"][r["sample"]]
        img = img[:, :, 0] if img.shape[2] == 1 else img
        out.append(
            (
                pair_image(img, thumbs[r["top_row"]]),
                f"sample {r['sample']}{_cond(r)} · {r['dominance']:.2g}× · id {r['top_row']} · pixel "
                f"{r['pixel_distance']:.3f} (nearest {r['nearest_distance']:.3f}, id {r['nearest_row']})",
            )
        )
    return out


def _cond(r: dict) -> str:
    """' · class 3' for a conditional model's sample (its condition), '' otherwise."""
    return f" · {r['condition']}" if r.get("condition") else ""


def pairs_md(pairs: dict) -> str:
    s, dom = pairs["settings"], pairs["dominant"]
    t = pairs["timings_s"]
    under = ""
    if s.get("condition"):
        g = s.get("guidance_scale")
        under = f", {s['condition']}" + (f", guidance {g:g}" if g else "")
    return (
        f"**{len(dom)} of {s['n']}** samples (seed {s['seed']}, {s['sampler'].upper()} "
        f"{s['steps']} steps{under}) have a "
        f"top proponent that dominates (score ≥ {s['threshold']:g}× the mean of the next "
        f"{audit.NEXT}); sorted by that ratio. Each pair: the sample, then its top proponent; pixel = "
        "RMS pixel distance of the pair (0–1), nearest = the pixel-nearest training image (an independent "
        f"check). Sampling {t['sampling']:.1f} s, attribution {t['attribution']:.1f} s."
    )


def _gallery(label: str, elem_id: str, columns: int) -> gr.Gallery:
    return gr.Gallery(
        label=label,
        columns=columns,
        height="auto",
        object_fit="contain",
        allow_preview=False,
        elem_id=elem_id,
        elem_classes=["hits"],
    )


def _audit_tab(ex: Explorer) -> None:
    labels = [lab for lab, idx in ex.indexes.items() if idx.self_influence is not None] or ex.labels
    with gr.Row(equal_height=True):
        method = gr.Dropdown(
            labels, value=labels[0] if labels else None, label="index", elem_id="audit-method"
        )
        ranking = gr.Radio(list(RANKINGS), value=RANKINGS[0], label="rank by", elem_id="audit-ranking")
        m = gr.Number(20, precision=0, minimum=1, label="images per end", elem_id="audit-m", min_width=80)
        rank_btn = gr.Button("Rank training images", variant="primary", elem_id="audit-btn")
    info = gr.Markdown("", elem_id="audit-info")
    high, low = _gallery("highest", "audit-high", 10), _gallery("lowest", "audit-low", 10)
    gr.Markdown("### Generated samples whose top proponent dominates")
    with gr.Row(equal_height=True):
        n = gr.Number(
            16, precision=0, minimum=1, maximum=audit.MAX_SAMPLES, label="samples", elem_id="audit-n"
        )
        seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="audit-seed")
        steps = gr.Number(50, precision=0, minimum=1, maximum=1000, label="steps", elem_id="audit-steps")
        cond = condition_box(ex, "audit-condition", EVERY_CLASS, "the prompt every sample is generated under")
        gen_btn = gr.Button("Generate and audit", variant="primary", elem_id="audit-gen-btn")
    pairs_info = gr.Markdown("", elem_id="audit-pairs-info")
    pairs = _gallery("sample | top proponent", "audit-pairs", 4)
    state = gr.State({})
    export_btn = gr.Button("Export the audit (PNG, JSON, CSV)", size="sm", elem_id="audit-export-btn")
    files = gr.File(label="audit", file_count="multiple", visible=False, elem_id="audit-files", height=120)

    def on_rank(label, by, mm, st, progress=gr.Progress()):
        try:
            group = by == RANKINGS[1]
            si = ex.self_influence(label or None, mm, group=group, progress=progress if group else None)
        except Exception as e:
            _fail(e)
        thumbs, q = ex.index(label or None).thumbs, si["quantiles"]
        md = (
            f"**{si['n']} training images of {si['method']}** ranked by {si['ranked_by']}: median "
            f"{q['median']:+.3g}, quartiles {q['q25']:+.3g} … {q['q75']:+.3g}, range {q['min']:+.3g} … {q['max']:+.3g}."
        )
        return (
            md,
            si_gallery(si["highest"], thumbs, group),
            si_gallery(si["lowest"], thumbs, group),
            {**st, "self_influence": si, "method": label},
        )

    def on_samples(label, nn, sd, stp, c, st, progress=gr.Progress()):
        try:
            c = given(c, EVERY_CLASS)
            res = ex.audit_samples(label or None, nn, sd, "ddim", stp, progress=progress, condition=c)
        except Exception as e:
            _fail(e)
        return (
            pairs_md(res),
            pairs_gallery(res, ex.index(label or None).thumbs),
            {**st, "pairs": res, "method": label},
        )

    def on_export(st):
        if not st:
            gr.Warning("nothing to export yet: rank the training images or audit samples first")
            return gr.update(visible=False)
        return gr.update(
            value=exports.write_audit_exports(st, ex.index(st.get("method") or None)), visible=True
        )

    hidden = {"api_visibility": "private"}
    rank_btn.click(on_rank, [method, ranking, m, state], [info, high, low, state], **hidden)
    gen_btn.click(on_samples, [method, n, seed, steps, cond, state], [pairs_info, pairs, state], **hidden)
    export_btn.click(on_export, [state], [files], **hidden)


def compare_gallery(hits: list[dict], other: list[dict], thumbs) -> list:
    both = {h["row"] for h in other}
    return [
        (
            _thumb(thumbs, h["row"]),
            f"#{h['rank']} · {h['score']:+.3g} · id {h['row']}" + (" · ★ both" if h["row"] in both else ""),
        )
        for h in hits
    ]


def _compare_tab(ex: Explorer, page) -> None:
    labels = ex.labels
    with gr.Row(equal_height=True):
        a = gr.Dropdown(labels, value=labels[0] if labels else None, label="method A", elem_id="compare-a")
        b = gr.Dropdown(
            labels, value=labels[1] if len(labels) > 1 else None, label="method B", elem_id="compare-b"
        )
        k = gr.Number(8, precision=0, minimum=1, maximum=64, label="k", elem_id="compare-k", min_width=60)
    with gr.Row(equal_height=True):
        row = gr.Number(0, precision=0, minimum=0, label="training image id", elem_id="compare-row")
        cond = condition_box(ex, "compare-condition", OWN_CONDITION, "empty: the training image's own prompt")
        row_btn = gr.Button("Compare on this training image", variant="primary", elem_id="compare-row-btn")
        cur_btn = gr.Button("Compare on the current query (Attribute tab)", elem_id="compare-current-btn")
    summary = gr.Markdown(
        "Needs two indexes of the same training images (start the app with two `--index` folders)."
        if len(labels) < 2
        else "Choose a query.",
        elem_id="compare-info",
    )
    out = []
    with gr.Row(equal_height=False):
        for side in ("A", "B"):
            with gr.Column():
                for kind in ("proponents", "opponents"):
                    out.append(
                        gr.Gallery(
                            label=f"{side}: {kind}",
                            columns=4,
                            height="auto",
                            allow_preview=False,
                            elem_id=f"compare-{side.lower()}-{kind}",
                            elem_classes=["hits"],
                        )
                    )

    def show(make, la, lb, kk):
        try:
            c = ex.compare(make(), la, lb, kk)
        except Exception as e:
            _fail(e)
        ta, tb = ex.index(la).thumbs, ex.index(lb).thumbs
        return (
            compare.comparison_md(c),
            compare_gallery(c["a"]["proponents"], c["b"]["proponents"], ta),
            compare_gallery(c["a"]["opponents"], c["b"]["opponents"], ta),
            compare_gallery(c["b"]["proponents"], c["a"]["proponents"], tb),
            compare_gallery(c["b"]["opponents"], c["a"]["opponents"], tb),
        )

    def on_row(r, c, la, lb, kk):
        def make():  # the training image under its own condition, or under the one chosen
            q, c_ = ex.training(r, la or None), given(c, OWN_CONDITION)
            return q if c_ is None else compare.under(q, ex.condition(c_, la or None))

        return show(make, la, lb, kk)

    def on_current(previous, la, lb, kk):
        if previous is None:
            raise gr.Error("no query yet: make one in the Attribute tab first", print_exception=False)
        return show(lambda: replace(previous.query, seconds=0.0), la, lb, kk)

    hidden = {"api_visibility": "private"}
    row_btn.click(on_row, [row, cond, a, b, k], [summary, *out], **hidden)
    cur_btn.click(on_current, [page.answer, a, b, k], [summary, *out], **hidden)


def layout(ex: Explorer, page) -> None:
    """The audit and compare tabs (inside the page's Tabs)."""
    with gr.Tab("Memorisation audit", id="audit"):
        _audit_tab(ex)
    with gr.Tab("Compare methods", id="compare"):
        _compare_tab(ex, page)
