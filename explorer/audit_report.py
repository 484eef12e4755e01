"""The memorisation audit as a PNG contact sheet: the training images with the highest and the
lowest self-influence, and the sample pairs (sample | its top proponent) with their dominance and
pixel distance (and a conditional model's sample, its condition). Matplotlib's object API under
the report's lock (explorer/report.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer.report import _MPL_LOCK, OPPONENT_COLOR, PROPONENT_COLOR, _show

NCOL = 10


def _grid(fig, spec, items: list[tuple[np.ndarray, str]], color: str) -> None:
    rows = max(1, -(-len(items) // NCOL))
    cells = spec.subgridspec(rows, NCOL, wspace=0.12, hspace=0.5)
    for i in range(rows * NCOL):
        ax = fig.add_subplot(cells[i // NCOL, i % NCOL])
        if i >= len(items):
            ax.axis("off")
            continue
        _show(ax, items[i][0], items[i][1], color=color, fontsize=5.5)


def _si_items(rows: list[dict], thumbs, key: str) -> list:
    return [(thumbs[r["row"]], f"id {r['row']} · {r['label']}\n{r[key]:+.3g}") for r in rows]


def _short(condition: str | None, width: int = 16) -> str:
    """' [class 3]' (a long prompt cut to `width` characters) for a caption; '' without one."""
    if not condition:
        return ""
    return f" [{condition if len(condition) <= width else condition[: width - 1] + '…'}]"


def _pair_items(pairs: dict, thumbs) -> list:
    out = []
    for r in pairs["samples"]:
        img = pairs["images"][r["sample"]]
        img = img[:, :, 0] if img.shape[2] == 1 else img
        top = thumbs[r["top_row"]].reshape(img.shape)
        gap = np.full((img.shape[0], 2, *img.shape[2:]), 128, np.uint8)
        out.append(
            (
                np.concatenate([img, gap, top], axis=1),
                f"s{r['sample']}{_short(r.get('condition'))} {r['dominance']:.2g}× id {r['top_row']}\n"
                f"px {r['pixel_distance']:.2f} "
                f"(nn {r['nearest_distance']:.2f})",
            )
        )
    return out


def render_audit(st: dict, thumbs: np.ndarray, path: str | Path, title: str = "Memorisation audit") -> Path:
    """Write the contact sheet of the audit state `st` ({self_influence, pairs}, either may be
    missing) to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = []
    si = st.get("self_influence")
    if si:
        key = (
            "self_influence"
            if si["highest"][0].get("group_self_influence") is None
            else "group_self_influence"
        )
        name = si["ranked_by"].split(" (")[0].replace("_", " ")
        blocks.append(
            (f"highest {name} ({si['method']})", _si_items(si["highest"], thumbs, key), PROPONENT_COLOR)
        )
        blocks.append((f"lowest {name}", _si_items(si["lowest"], thumbs, key), OPPONENT_COLOR))
    pairs = st.get("pairs")
    if pairs:
        under = pairs.get("settings", {}).get("condition")
        name = "samples | top proponent, by dominance" + (f"; samples under {under}" if under else "")
        blocks.append((name, _pair_items(pairs, thumbs), "black"))
    if not blocks:
        raise ValueError("the audit is empty")
    heights = []
    for _, items, _ in blocks:
        heights += [0.3, 1.25 * max(1, -(-len(items) // NCOL))]
    with _MPL_LOCK:
        fig = Figure(figsize=(11, sum(heights) + 0.5), dpi=110)
        FigureCanvasAgg(fig)
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
        outer = fig.add_gridspec(
            len(heights),
            1,
            height_ratios=heights,
            left=0.02,
            right=0.98,
            top=1 - 0.45 / (sum(heights) + 0.5),
            bottom=0.01,
        )
        for j, (label, items, color) in enumerate(blocks):
            lab = fig.add_subplot(outer[2 * j])
            lab.axis("off")
            lab.text(0, 0.3, label, fontsize=9, color=color, transform=lab.transAxes)
            _grid(fig, outer[2 * j + 1], items, color)
        fig.savefig(path, format="png")
    return Path(path)


def main(argv=None) -> None:
    """`python -m explorer.audit_report --index DIR --out PNG [--m 20] [--group]`: the contact sheet
    of an index's highest and lowest (group) self-influence, and its JSON next to it."""
    import argparse
    import json

    from attribution.model import load_model
    from explorer import audit
    from index.store import load

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--group", action="store_true")
    a = ap.parse_args(argv)
    model = load_model(a.model) if a.model else load_model()
    idx = load(a.index, model)
    group = audit.group_self_influence(idx) if a.group else None
    si = {"method": idx.method, **audit.self_influence(idx, a.m, group)}
    render_audit({"self_influence": si}, idx.thumbs, a.out, title=f"Self-influence, {Path(a.index).name}")
    Path(a.out).with_suffix(".json").write_text(json.dumps(si, indent=2))


if __name__ == "__main__":
    main()
