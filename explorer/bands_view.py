"""The per-timestep view of an answer: each shown score split by timestep band
(attribution/bands.py), as a chart (the top few proponents, score by band) and a line of text.
Used by the page (explorer/ui.py) and the PNG report (explorer/report.py)."""

from __future__ import annotations

import threading

import numpy as np

TOP = 4  # proponents in the chart
_LOCK = threading.Lock()
COLORS = ("#1a7f37", "#0969da", "#8250df", "#bf8700", "#57606a", "#cf222e")


def has_bands(data: dict) -> bool:
    return (
        bool(data.get("bands"))
        and bool(data["proponents"])
        and data["proponents"][0].get("bands") is not None
    )


def draw(ax, data: dict, top: int = TOP) -> None:
    """Grouped bars on `ax`: for each band (x), the band's part of each of the top proponents."""
    names = [n.replace(" (", "\n(") for n in data["bands"]["names"]]
    hits = data["proponents"][:top]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(hits))
    for j, h in enumerate(hits):
        ax.bar(
            x + (j - (len(hits) - 1) / 2) * width,
            h["bands"],
            width,
            color=COLORS[j % len(COLORS)],
            label=f"#{h['rank']} id {h['row']} ({h['score']:+.3g})",
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, names, fontsize=6 if len(names) <= 4 else 5)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("part of the score τ", fontsize=7)
    ranked = data["bands"].get("ranked_by")
    ax.set_title(
        "top proponents" + (", ranked by one band" if ranked else "") + ": score by band", fontsize=8
    )
    parts = np.array([h["bands"] for h in hits], dtype=np.float64).reshape(len(hits), -1)
    lo, hi = min(0.0, float(parts.min(initial=0.0))), max(0.0, float(parts.max(initial=0.0)))
    span = (hi - lo) or 1.0
    ax.set_ylim(lo - 0.04 * span, hi + 0.45 * span)  # headroom: the legend sits above every bar
    # a fixed place, two columns: loc="best" searches the bars for a free spot, half the draw time
    ax.legend(fontsize=5.5, loc="upper center", ncol=2, frameon=False)


def figure(data: dict, figsize=(5.0, 2.2)):
    """A matplotlib Figure of `draw`, or None when the answer has no bands."""
    if not has_bands(data):
        return None
    from matplotlib.figure import Figure

    from explorer.report import fixed_margins

    with _LOCK:
        fig = Figure(figsize=figsize, dpi=100)
        draw(fig.add_subplot(), data)
        fixed_margins(fig)
    return fig


def summary_md(data: dict) -> str:
    """One line: how the shown proponents' scores split between the noise ends."""
    if not has_bands(data):
        return ""
    b = data["bands"]
    parts = np.array([h["bands"] for h in data["proponents"]], dtype=np.float64)
    total = parts.sum(1)
    share = parts / np.where(np.abs(total) > 0, total, 1)[:, None]
    low, high = share[:, 0].mean(), share[:, -1].mean()
    ranked = (
        f"Ranked by **{b['ranked_by']}** alone (scores shown are the whole scores). "
        if b.get("ranked_by")
        else ""
    )
    return (
        f"{ranked}**By timestep:** on average {low:.0%} of a shown proponent's score comes from "
        f"{b['names'][0]} and {high:.0%} from {b['names'][-1]} ({len(b['names'])} bands; the parts add up "
        "to the score)."
    )


def csv_columns(data: dict) -> list[str]:
    return [f"band {n}" for n in data["bands"]["names"]] if data.get("bands") else []
