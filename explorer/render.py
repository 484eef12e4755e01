"""What the page shows, as text and images: thumbnails, gallery captions, the timings line, the
index banner, and the page's CSS. No Gradio here; `explorer.ui` puts these on the page."""

from __future__ import annotations

import numpy as np

from attribution.influence import METHODS
from explorer import report
from explorer.service import Answer, Explorer

GALLERY_PX = 96  # thumbnails are enlarged (nearest neighbour) to about this size
QUERY_PX = 168


def enlarge(u8: np.ndarray, px: int):
    """(H, W[, C]) uint8 -> PIL image enlarged by an integer factor, nearest neighbour."""
    from PIL import Image

    u8 = np.asarray(u8)
    if u8.ndim == 3 and u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    img = Image.fromarray(u8)
    f = max(1, round(px / max(img.size)))
    return img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)


def plain(msg: str) -> str:
    """Markdown emphasis off, for toasts and API errors."""
    return msg.replace("**", "").replace("`", "")


CSS = """
.gradio-container {max-width: 1280px !important; padding-top: 4px !important; padding-bottom: 4px !important}
#title h2 {margin: 0; font-size: 1.35em} #title p {margin: 0; font-size: 0.9em}
#banner p, #status p {margin: 0; font-size: 0.9em}
#timings p {font-size: 0.8em; margin: 0; color: var(--body-text-color-subdued)}
#query-info p {font-size: 0.85em; margin: 0}
.hits, .hits .grid-wrap, .hits .gallery-container {height: auto !important; min-height: 0 !important;
  max-height: none !important}
.hits .grid-container {gap: 6px !important; padding-top: 26px !important}
.hits .thumbnail-item {aspect-ratio: auto !important; display: flex !important; flex-direction: column !important;
  height: auto !important; box-shadow: none !important; border: none !important}
.hits .thumbnail-item img {aspect-ratio: 1 / 1; width: 100%; height: auto !important; image-rendering: pixelated}
.hits .caption-label {position: static !important; white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important; max-width: none !important; width: 100% !important; font-size: 10.5px !important;
  line-height: 1.25 !important; padding: 2px 0 0 0 !important; margin: 0 !important; background: none !important;
  color: var(--body-text-color) !important; text-align: center; border: none !important; box-shadow: none !important}
footer {display: none !important}
"""


def gallery(ans: Answer, side: str, thumbs) -> list:
    return [
        (enlarge(thumbs[h["row"]], GALLERY_PX) if thumbs is not None else None, report.caption(h))
        for h in ans.data[side]
    ]


TIMING_NAMES = {
    "sampling": "sampling",
    "decoding": "decoding",
    "wait_for_model": "waiting for the model",
    "query_gradient": "query gradient",
    "search": "FAISS search",
    "all_scores": "all N scores",
    "render": "page",
}


def timings_md(t: dict) -> str:
    def fmt(v: float) -> str:
        return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.0f} ms" if v >= 0.01 else f"{v * 1e3:.1f} ms"

    keys = [k for k in TIMING_NAMES if k in t] + [k for k in t if k not in TIMING_NAMES]
    return "**Timings:** " + " · ".join(f"{TIMING_NAMES.get(k, k)} {fmt(t[k])}" for k in keys)


def index_md(ex: Explorer, label: str | None = None) -> str:
    if not ex.ready:
        return ex.build.status() if ex.build else "No index is loaded."
    idx = ex.index(label)
    p = report.provenance(idx.manifest, idx.path)
    return (
        f"Index **{label or ex.labels[0]}** — {METHODS[p['method']].description}; "
        f"{p['data']['n']} training images ({p['data']['source']}), D = {p['projection_dim']}, "
        f"model sha256 `{str(p['model']['weights_sha256'])[:12]}…`"
    )
