"""Exports of one attribution: the scores as JSON and CSV, a PNG report, the score histogram.

Everything is built from one JSON-able dictionary, the *payload* (`payload()`): the query, the
settings, the index's provenance, the top-k proponents and opponents and, for flat indexes, the
scores of all N training images. The app's API returns exactly this payload; the app's export
writes it as `scores.json` / `scores.csv` and renders it as `report.png`.

Matplotlib is used through its object API (no pyplot state), with a lock around rendering, so
concurrent requests of a server can call these functions.
"""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np

from explorer import bands_view
from index.conditions import describe, is_plain, manifest_family

_MPL_LOCK = threading.Lock()
PROPONENT_COLOR = "#1a7f37"
OPPONENT_COLOR = "#cf222e"


def fmt_score(score: float) -> str:
    """The short score format used in captions and reports (sign, 3 significant digits)."""
    return f"{score:+.3g}"


def caption(hit: dict) -> str:
    """'#rank · score · id row · label L' for one hit (a dict with rank, row, score, label)."""
    label = hit["label"] if hit["label"] >= 0 else "?"
    return f"#{hit['rank']} · {fmt_score(hit['score'])} · id {hit['row']} · label {label}"


def stability_caption(hit: dict) -> str:
    """'± se · halves #a/#b ✓' (✓: more than two standard errors from the first one not shown);
    '' for a hit without stability figures."""
    if hit.get("se") is None:
        return ""
    halves = f" · halves #{hit['rank_a']}/#{hit['rank_b']}" if hit.get("rank_a") is not None else ""
    mark = {True: " ✓", False: " ~"}.get(hit.get("distinct"), "")
    return f"± {hit['se']:.2g}{halves}{mark}"


def stability_md(data: dict) -> str:
    """The page's stability panel: how far each shown score would move under new draws."""
    st = data.get("stability")
    if not st and (data.get("bands") or {}).get("ranked_by"):
        return "**Stability:** not shown while the top-k is ranked by one timestep band (rank by all timesteps to see it)."
    if not st:
        return (
            "**Stability:** not available for this index (TRAK-style methods, the trajectory "
            "measurement, or an index built without independent halves of its draws)."
        )
    lines = [
        f"**Stability** (standard error under new draws, from two independent halves of the training "
        f"and query draws; ✓ = more than {st['z']:g} standard errors above the first image not shown, "
        f"~ = not distinguishable from it): {st['distinct_proponents']} of {len(data['proponents'])} "
        f"proponents and {st['distinct_opponents']} of {len(data['opponents'])} opponents are distinguishable.",
        "",
        "| side | # | id | score ± se | rank under half A / B | |",
        "|---|---|---|---|---|---|",
    ]
    for side, hits in (("proponent", data["proponents"]), ("opponent", data["opponents"])):
        for h in hits:
            ranks = f"{h['rank_a']} / {h['rank_b']}" if h.get("rank_a") is not None else "–"
            mark = {True: "✓", False: "~"}.get(h.get("distinct"), "")
            lines.append(
                f"| {side} | {h['rank']} | {h['row']} | {fmt_score(h['score'])} ± {h['se']:.2g} | "
                f"{ranks} | {mark} |"
            )
    return "\n".join(lines)


def provenance(manifest: dict, path: str | Path | None = None) -> dict:
    """What an index was built from, in a compact form (for exports and the page).

    No key is called "path": gradio_client takes any dict with a "path" string for a file.
    """
    m = manifest
    out = {
        "index": str(path) if path is not None else None,
        "method": m.get("method", {}).get("method"),
        "method_config": m.get("method", {}),
        "model": {
            "folder": m.get("model", {}).get("path"),
            "weights_sha256": m.get("model", {}).get("weights_sha256"),
            **manifest_family(m),  # family (pixel / latent), condition_kind, class_map
        },
        "data": {k: m.get("data", {}).get(k) for k in ("source", "n", "sha256", "channels", "size")},
        "projection_dim": m.get("projection", {}).get("total_dim"),
        "faiss": m.get("faiss", {}).get("type"),
        "created": m.get("created"),
        "code_version": m.get("code_version"),
        "format_version": m.get("format_version"),
    }
    return out


def payload(
    result,
    manifest: dict,
    *,
    index_path=None,
    query: dict | None = None,
    settings: dict | None = None,
    timings: dict | None = None,
) -> dict:
    """A `QueryResult` (index.store) + context -> a JSON-able dict.

    Keys: query, settings, index (provenance), proponents, opponents (lists of
    {rank, row, score, label, source, se, rank_a, rank_b, distinct, bands (the score's parts by
    timestep band, or None)}), stability (the summary, or None), bands ({edges, names, ranked_by},
    or None), scores (all N scores by row, or None), timings_s.
    """
    scores = None
    if getattr(result, "all_scores", None) is not None:
        scores = [float(s) for s in np.asarray(result.all_scores, dtype=np.float32)]
    t = {k: float(v) for k, v in (result.timings or {}).items()}
    t.update({k: float(v) for k, v in (timings or {}).items()})
    return {
        "query": dict(query or {}),
        "settings": dict(settings or {}),
        "index": provenance(manifest, index_path),
        "proponents": [dict(h.__dict__) for h in result.proponents],
        "opponents": [dict(h.__dict__) for h in result.opponents],
        "stability": getattr(result, "stability", None),
        "bands": getattr(result, "bands", None),
        "scores": scores,
        "timings_s": t,
    }


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_csv(
    data: dict,
    path: str | Path,
    sources: list[str] | None = None,
    labels: list[int] | None = None,
    conditions: list[str] | None = None,
) -> Path:
    """One line per training image (all N when the payload holds all scores, else the hits),
    sorted by score, highest first: rank, row, score, label, source, proponent/opponent rank, and
    for the shown hits their stability figures (se, rank under each half, distinguishable) and their
    score's parts by timestep band (one column per band). A latent or conditional index's CSV ends
    with its model family, condition kind, the query's condition and each row's (`conditions`)."""
    path = Path(path)
    prop = {h["row"]: h["rank"] for h in data["proponents"]}
    opp = {h["row"]: h["rank"] for h in data["opponents"]}
    hits = {h["row"]: h for h in data["proponents"] + data["opponents"]}
    if data.get("scores") is not None:
        scores = np.asarray(data["scores"], dtype=np.float64)
        rows = list(range(len(scores)))
    else:
        rows = list(hits)
        scores = {r: hits[r]["score"] for r in rows}
    order = sorted(rows, key=lambda r: -scores[r])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "rank",
                "row",
                "score",
                "label",
                "source",
                "proponent_rank",
                "opponent_rank",
                "se",
                "rank_half_a",
                "rank_half_b",
                "distinguishable",
                *bands_view.csv_columns(data),
                *_family_columns(data),
            ]
        )
        for rank, r in enumerate(order, 1):
            h = hits.get(r, {})
            if h:
                label, source = h["label"], h["source"]
            else:
                label = labels[r] if labels is not None else ""
                source = sources[r] if sources is not None else ""
            stab = [("" if h.get(k) is None else h[k]) for k in ("se", "rank_a", "rank_b", "distinct")]
            parts = [repr(v) for v in h.get("bands") or []] or [""] * len(bands_view.csv_columns(data))
            w.writerow(
                [
                    rank,
                    r,
                    repr(float(scores[r])),
                    label,
                    source,
                    prop.get(r, ""),
                    opp.get(r, ""),
                    *stab,
                    *parts,
                    *_family_values(data, conditions, r),
                ]
            )
    return path


def _family_columns(data: dict) -> list[str]:
    """The CSV's last columns for a latent or conditional index (none for a pixel, unconditional one)."""
    fam = data["index"]["model"]
    if is_plain({"family": fam.get("family", "pixel"), "condition_kind": fam.get("condition_kind", "none")}):
        return []
    return ["model_family", "condition_kind", "query_condition", "condition"]


def _family_values(data: dict, conditions: list[str] | None, row: int) -> list:
    if not _family_columns(data):
        return []
    fam, q = data["index"]["model"], data["query"]
    own = conditions[row] if conditions is not None else ""
    return [fam["family"], fam["condition_kind"], q.get("condition") or "", own]


def condition_text(item: dict) -> str:
    """A training row's condition as items.jsonl records it, for a CSV cell ('' if none)."""
    c = item.get("condition") or {}
    if "text" in c:
        return c["text"]
    if "class" not in c:
        return ""
    name = c.get("name")
    return f"{name} (class {c['class']})" if name not in (None, str(c["class"])) else f"class {c['class']}"


def _histogram(ax, scores, proponents: list[dict], opponents: list[dict]) -> None:
    if scores is not None and len(scores):
        s = np.asarray(scores, dtype=np.float64)
        counts, edges = np.histogram(s, bins=min(60, max(10, len(s) // 20)))
        ax.stairs(counts, edges, fill=True, color="#8c959f", baseline=0.5)  # one artist, not 60 bars
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(1.0, counts.max()) * 1.5)
        ax.set_ylabel("images (log)", fontsize=7)
        title = f"all {len(s)} scores; shown ones marked"
    else:
        title = "shown scores (this index keeps no dense scores)"
    ymax = ax.get_ylim()[1] if scores is not None else 1.0
    for hits, color, name in (
        (proponents, PROPONENT_COLOR, "proponents"),
        (opponents, OPPONENT_COLOR, "opponents"),
    ):
        xs = [h["score"] for h in hits]
        if xs:
            ax.vlines(xs, 0, ymax, colors=color, linewidth=0.8, alpha=0.8, label=f"top {len(xs)} {name}")
    lo, hi = ax.get_xlim()
    if lo < 0 < hi:
        ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("score τ (influence: > 0 raises the query's likelihood)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left", frameon=False)


def score_histogram(data: dict, figsize=(5.0, 2.2)):
    """A matplotlib Figure: histogram of all N scores with the shown proponents/opponents marked."""
    from matplotlib.figure import Figure

    with _MPL_LOCK:
        fig = Figure(figsize=figsize, dpi=100)
        _histogram(fig.add_subplot(), data.get("scores"), data["proponents"], data["opponents"])
        fixed_margins(fig)
    return fig


def fixed_margins(fig) -> None:
    """Margins for a one-panel 5 × 2.2 in figure with small labels, set once: a constrained
    layout re-solves them on every draw (it was half of the app's time to render the chart)."""
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.2, top=0.9)


def _show(ax, img: np.ndarray, title: str | None = None, color: str = "black", fontsize: float = 6) -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color(color)
        s.set_linewidth(1.5)
    if title:
        ax.set_title(title, fontsize=fontsize, color=color, pad=2)


def _settings_text(data: dict) -> str:
    q, s, p = data["query"], data["settings"], data["index"]
    mc = p.get("method_config") or {}
    lines = [f"query: {q.get('description', q.get('kind', '?'))}"]
    fam = p["model"]
    if "family" in fam and not is_plain(fam):
        lines.append(f"model family: {describe(fam)}; query condition: {q.get('condition') or 'none'}")
    lines += [f"{k}: {v}" for k, v in s.items()]
    lines += [
        f"method: {p.get('method')} (draws {mc.get('draws')}, query draws {mc.get('query_draws')}, "
        f"D = {p.get('projection_dim')})",
        f"index: {p.get('index')} (faiss {p.get('faiss')}, built {p.get('created')})",
        f"model: {p['model'].get('folder')}  sha256 {str(p['model'].get('weights_sha256'))[:16]}…",
        f"data: {p['data'].get('source')}  N = {p['data'].get('n')}  sha256 "
        f"{str(p['data'].get('sha256'))[:16]}…",
        f"code {p.get('code_version')}, index format {p.get('format_version')}",
    ]
    notes = q.get("notes") or []
    if notes:
        lines.append("conversion: " + "; ".join(notes))
    return "\n".join(lines)


def render_report(
    data: dict,
    query_image: np.ndarray,
    thumbs: np.ndarray | None,
    path: str | Path,
    title: str = "Training-data attribution report",
    ncol: int = 8,
) -> Path:
    """Write a PNG report: query, settings + provenance, score histogram, top-k of each side.

    `query_image` (H, W[, C]) uint8 as the model sees it; `thumbs` (N, H, W[, C]) uint8 training
    images by row (None: the galleries show row numbers only).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    props, opps = data["proponents"], data["opponents"]
    k = max(len(props), len(opps), 1)
    ncol = max(1, min(ncol, k))
    krows = (k + ncol - 1) // ncol
    width = max(14.0 if bands_view.has_bands(data) else 11.0, 1.3 * ncol)
    heights = [2.6, 0.25] + [1.3] * krows + [0.25] + [1.3] * krows
    with _MPL_LOCK:
        fig = Figure(figsize=(width, sum(heights) + 0.6), dpi=110)
        FigureCanvasAgg(fig)
        fig.suptitle(title, fontsize=12, x=0.01, ha="left")
        outer = fig.add_gridspec(
            len(heights),
            1,
            height_ratios=heights,
            hspace=0.35,
            left=0.02,
            right=0.98,
            top=1 - 0.5 / (sum(heights) + 0.6),
            bottom=0.02,
        )
        chart = bands_view.has_bands(data)
        head = outer[0].subgridspec(
            1, 4 if chart else 3, width_ratios=[1.0, 2.6, 2.4] + ([2.4] if chart else []), wspace=0.12
        )
        _show(fig.add_subplot(head[0]), query_image, "query (as the model sees it)", fontsize=8)
        tx = fig.add_subplot(head[1])
        tx.axis("off")
        tx.text(
            0.0,
            1.0,
            _settings_text(data),
            va="top",
            ha="left",
            fontsize=6.5,
            family="monospace",
            wrap=True,
            transform=tx.transAxes,
        )
        _histogram(fig.add_subplot(head[2]), data.get("scores"), props, opps)
        if chart:
            bands_view.draw(fig.add_subplot(head[3]), data)
        sides = (
            (props, "proponents (highest τ: make the query more likely)", PROPONENT_COLOR),
            (opps, "opponents (lowest τ: make it less likely)", OPPONENT_COLOR),
        )
        for block, (hits, name, color) in enumerate(sides):
            start = 1 + block * (krows + 1)
            _gallery(
                fig,
                [outer[start + j] for j in range(krows + 1)],
                hits,
                f"top {len(hits)} {name}",
                color,
                thumbs,
                ncol,
            )
        fig.savefig(path, format="png")
    return path


def _gallery(
    fig, slots, hits: list[dict], label: str, color: str, thumbs: np.ndarray | None, ncol: int
) -> None:
    """One side's label (the first slot) and its thumbnails, `ncol` a row (the other slots)."""
    lab = fig.add_subplot(slots[0])
    lab.axis("off")
    lab.text(0, 0.5, label, fontsize=9, color=color, va="center", transform=lab.transAxes)
    for r in range(len(slots) - 1):
        cells = slots[1 + r].subgridspec(1, ncol, wspace=0.15)
        for c in range(ncol):
            i = r * ncol + c
            ax = fig.add_subplot(cells[c])
            if i >= len(hits):
                ax.axis("off")
                continue
            h = hits[i]
            img = thumbs[h["row"]] if thumbs is not None else np.zeros((8, 8), np.uint8)
            title = caption(h).replace(" · id", "\nid")
            _show(
                ax, img, title + ("\n" + stability_caption(h) if h.get("se") is not None else ""), color=color
            )


__all__ = [
    "payload",
    "provenance",
    "stability_md",
    "stability_caption",
    "write_json",
    "write_csv",
    "score_histogram",
    "render_report",
    "fmt_score",
    "caption",
]
