"""Export files of one answer (a PNG report, the scores as JSON and CSV, the query image), each
export in a fresh folder under EXPORT_ROOT; folders older than an hour are removed."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from explorer import report
from index.store import Index

EXPORT_ROOT = Path(tempfile.gettempdir()) / "attribution-exports"
MAX_AGE_S = 3600  # Gradio has copied older exports to its own cache by then


def remove_old(root: Path = EXPORT_ROOT, max_age_s: float = MAX_AGE_S) -> None:
    """Remove export folders under `root` older than `max_age_s`."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > max_age_s:
            shutil.rmtree(old, ignore_errors=True)


def write_exports(data: dict, query_u8: np.ndarray, idx: Index, root: Path = EXPORT_ROOT) -> list[str]:
    """report.png, scores.json, scores.csv and query.png of the payload `data` (its index `idx`)
    in a fresh folder; returns their paths in that order."""
    from PIL import Image

    remove_old(root)
    out = Path(tempfile.mkdtemp(prefix="export-", dir=root))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    files = [
        report.render_report(data, query_u8, idx.thumbs, out / f"report-{stamp}.png"),
        report.write_json(data, out / f"scores-{stamp}.json"),
        report.write_csv(data, out / f"scores-{stamp}.csv",
                         sources=[it["source"] for it in idx.items], labels=[it["label"] for it in idx.items]),
    ]
    Image.fromarray(query_u8).save(out / f"query-{stamp}.png")
    return [str(p) for p in files] + [str(out / f"query-{stamp}.png")]
