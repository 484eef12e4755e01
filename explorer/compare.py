"""Methods side by side: two answers to one query (two indexes over the same training images),
their top-k lists, the overlap of those lists and the Spearman correlation of their scores; a
conditional model's query under its condition, which the comparison records.
No Gradio here; `explorer.views` puts it on the page, `explorer.api` serves it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from attribution.errors import DataError
from attribution.ranks import spearman as rank_correlation
from index.conditions import shown

if TYPE_CHECKING:
    from attribution.conditions import Conditions
    from explorer.service import Query


def under(q: Query, cond: Conditions | None) -> Query:
    """The query `q` (e.g. a training image, under its own condition) under `cond` instead (a
    class or prompt, Conditions of one; None or the same: `q` itself). Its params record the
    condition; its description says which one it is attributed under."""
    if cond is None or shown(cond) == shown(q.condition):
        return q
    text = shown(cond)
    return replace(
        q,
        condition=cond,
        description=f"{q.description}; attributed under {text}",
        params={**q.params, "condition": text, "condition_kind": cond.kind},
    )


def spearman(a, b) -> float:
    """Spearman's rank correlation of two score vectors (ties get their mean rank)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise DataError(f"Spearman needs two score lists of one length ≥ 2 (got {a.size} and {b.size})")
    r = rank_correlation(a, b)
    return float(r) if np.isfinite(r) else float("nan")


def overlap(a: list[dict], b: list[dict]) -> dict:
    """Rows shown by both lists, and their share of the (shorter) list."""
    ra, rb = [h["row"] for h in a], [h["row"] for h in b]
    both = [r for r in ra if r in set(rb)]
    k = max(1, min(len(ra), len(rb)))
    return {"rows": both, "count": len(both), "fraction": len(both) / k}


def comparison(a: dict, b: dict, label_a: str, label_b: str) -> dict:
    """Two payloads (explorer.report.payload) of one query -> the comparison (JSON-able).

    The training sets must be the same images (equal fingerprints and counts); the Spearman
    correlation is over all N scores where both payloads have them, else over the union of the
    shown rows whose scores both payloads hold (stated in `spearman_over`)."""
    da, db = a["index"]["data"], b["index"]["data"]
    if (da.get("sha256"), da.get("n")) != (db.get("sha256"), db.get("n")):
        raise DataError(
            f"{label_a} and {label_b} index different training images (N = {da.get('n')} and "
            f"{db.get('n')}); side by side needs two indexes of the same images"
        )
    if a["scores"] is not None and b["scores"] is not None:
        rho, over = spearman(a["scores"], b["scores"]), f"all {len(a['scores'])} training images"
    else:
        sa = {h["row"]: h["score"] for h in a["proponents"] + a["opponents"]}
        sb = {h["row"]: h["score"] for h in b["proponents"] + b["opponents"]}
        common = sorted(set(sa) & set(sb))
        rho = spearman([sa[r] for r in common], [sb[r] for r in common]) if len(common) > 1 else float("nan")
        over = f"the {len(common)} shown images both lists score"
    cond = a["query"].get("condition")
    return {
        "query": a["query"],
        **({} if cond is None else {"condition": cond, "condition_kind": a["query"].get("condition_kind")}),
        "methods": [label_a, label_b],
        "k": a["settings"].get("k"),
        "a": {"method": label_a, "proponents": a["proponents"], "opponents": a["opponents"]},
        "b": {"method": label_b, "proponents": b["proponents"], "opponents": b["opponents"]},
        "overlap": {
            "proponents": overlap(a["proponents"], b["proponents"]),
            "opponents": overlap(a["opponents"], b["opponents"]),
        },
        "spearman": None if np.isnan(rho) else rho,
        "spearman_over": over,
        "timings_s": {f"{label_a}": sum(a["timings_s"].values()), f"{label_b}": sum(b["timings_s"].values())},
    }


def comparison_md(c: dict) -> str:
    """The compare view's summary line."""
    o = c["overlap"]
    rho = "–" if c["spearman"] is None else f"{c['spearman']:.3f}"
    cond = f" (the query under {c['condition']})" if c.get("condition") else ""
    return (
        f"**{c['methods'][0]}** vs **{c['methods'][1]}**{cond}: top-{c['k']} proponents overlap "
        f"{o['proponents']['count']} of {c['k']}, opponents {o['opponents']['count']} of {c['k']} · "
        f"Spearman correlation of the scores **{rho}** (over {c['spearman_over']})."
    )
