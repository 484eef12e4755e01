"""Export files of one answer (a PNG report, the scores as JSON and CSV, the query image), each
export in a fresh folder under this process's private export root; exports older than an hour
are removed.

Clean-up never follows links and never touches what it did not create: the root is made by
`tempfile.mkdtemp` (a fresh, unguessable name, mode 0700) once per process and checked before
every use (`os.lstat`: a real folder, not a link, owned by this user, closed to others); only the
export folders this process made (kept in memory) are removed, by `shutil.rmtree`, which does not
follow links inside them.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from attribution.errors import ConfigError
from explorer import report
from index.store import Index

MAX_AGE_S = 3600  # Gradio has copied older exports to its own cache by then
ROOT_PREFIX = "attribution-exports-"

_lock = threading.Lock()
_root: Path | None = None
_created: dict[Path, float] = {}  # export folders this process made -> time made


def _private_dir(path: Path) -> str | None:
    """Why `path` is not a private folder of this user (None if it is); never follows a link."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"belongs to user {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def export_root() -> Path:
    """This process's private export root, made on first use (again if it was removed or replaced)."""
    global _root
    with _lock:
        if _root is None or _private_dir(_root) is not None:
            _root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
            _created.clear()
        return _root


def remove_old(max_age_s: float = MAX_AGE_S) -> list[Path]:
    """Remove the export folders this process made more than `max_age_s` ago; returns them.
    A folder that is no longer a real folder in a private root (replaced by a link, say) is
    forgotten, not followed."""
    now, removed = time.time(), []
    with _lock:
        for path, made in list(_created.items()):
            if now - made <= max_age_s:
                continue
            del _created[path]
            if _private_dir(path.parent) is None and _private_dir(path) is None:
                shutil.rmtree(path, ignore_errors=True)  # fd-based on Linux: links inside are not followed
                removed.append(path)
    return removed


def write_exports(data: dict, query_u8: np.ndarray, idx: Index, root: Path | None = None) -> list[str]:
    """report.png, scores.json, scores.csv and query.png of the payload `data` (its index `idx`)
    in a fresh folder under `root` (default: `export_root()`; a given root must be a private
    folder of this user); returns their paths in that order."""
    from PIL import Image

    remove_old()
    if root is None:
        root = export_root()
    elif (why := _private_dir(Path(root))) is not None:
        raise ConfigError(f"export folder {root} {why}; exports need a private folder")
    out = Path(tempfile.mkdtemp(prefix="export-", dir=root))
    with _lock:
        _created[out] = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    files = [
        report.render_report(data, query_u8, idx.thumbs, out / f"report-{stamp}.png"),
        report.write_json(data, out / f"scores-{stamp}.json"),
        report.write_csv(
            data,
            out / f"scores-{stamp}.csv",
            sources=[it["source"] for it in idx.items],
            labels=[it["label"] for it in idx.items],
            conditions=[report.condition_text(it) for it in idx.items],
        ),
    ]
    Image.fromarray(query_u8).save(out / f"query-{stamp}.png")
    return [str(p) for p in files] + [str(out / f"query-{stamp}.png")]


def write_audit_exports(st: dict, idx: Index, root: Path | None = None) -> list[str]:
    """The memorisation audit `st` ({self_influence, pairs, method}): a PNG contact sheet, JSON
    and CSV in a fresh folder (as `write_exports`); returns their paths."""
    import json

    from explorer import audit
    from explorer.audit_report import render_audit

    remove_old()
    root = export_root() if root is None else Path(root)
    if (why := _private_dir(root)) is not None:
        raise ConfigError(f"export folder {root} {why}; exports need a private folder")
    out = Path(tempfile.mkdtemp(prefix="audit-", dir=root))
    with _lock:
        _created[out] = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {k: st[k] for k in ("self_influence", "pairs") if st.get(k)}
    png = render_audit({**data}, idx.thumbs, out / f"audit-{stamp}.png")
    js = out / f"audit-{stamp}.json"
    js.write_text(json.dumps({"method": st.get("method"), **audit.to_json(data)}, indent=2))
    csv = audit.write_csv(data, out / f"audit-{stamp}.csv")
    return [str(png), str(js), str(csv)]
