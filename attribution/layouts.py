"""Folder layouts of training and query images, and the conditions they carry.

Three layouts, told apart by what the folder holds:

- **flat**: image files directly in the folder (sub-folders skipped): unconditional, exactly as
  before (`data.list_images`);
- **class sub-folders**: no files, only sub-folders `<class>/<file>`: integer folder names are
  the class ids when every name is an integer, otherwise the names take ids 0, 1, … in sorted
  order (or the ids of a given map: the training set's or the model's); the map is recorded;
- **Hugging Face imagefolder metadata**: a `metadata.jsonl` whose lines are JSON objects with
  `file_name` (a path relative to the folder) and `text` (text conditions) or `label` (class
  conditions: integers, or names mapped as for sub-folders). Every image file under the folder
  needs a line.

Rows follow the sorted relative paths (posix form) in every layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from attribution.conditions import Conditions, class_ids
from attribution.errors import DataError
from attribution.images import ACCEPTED_NAMES, _shown

METADATA = "metadata.jsonl"
LAYOUTS = ("flat", "classes", "metadata")


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"{_shown(folder)}: folder cannot be read (permission denied)") from None
    except OSError as e:
        raise DataError(
            f"{_shown(folder)}: folder cannot be read ({e.strerror or type(e).__name__})"
        ) from None


def layout_of(folder: str | Path) -> str:
    """ "metadata" (a metadata.jsonl), "classes" (only sub-folders) or "flat" (anything else)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "flat"  # data.list_images says what is wrong
    if (folder / METADATA).is_file():
        return "metadata"
    entries = _entries(folder)
    if entries and all(p.is_dir() for p in entries):
        return "classes"
    return "flat"


def class_folder(folder: Path, known: dict[str, int] | None = None) -> tuple[list[Path], Conditions]:
    """Image files of `<class>/<file>` in sorted relative-path order, and their class conditions."""
    pairs = []
    for sub in _entries(folder):
        files = [p for p in _entries(sub) if p.is_file()]
        if not files:
            raise DataError(f"{_shown(sub)}: class folder is empty (expected image files: {ACCEPTED_NAMES})")
        pairs += [(f"{sub.name}/{p.name}", sub.name, p) for p in files]
    pairs.sort(key=lambda r: r[0])
    ids, mapping = class_ids([name for _, name, _ in pairs], known)
    return [p for _, _, p in pairs], Conditions.classes(ids, mapping)


def _metadata_rows(folder: Path) -> list[dict]:
    path = folder / METADATA
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{_shown(path)}: cannot be read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{_shown(path)}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{_shown(path)}, line {n}: expected an object with a file_name")
        rows.append(row)
    if not rows:
        raise DataError(f"{_shown(path)}: no rows (expected one JSON object per image)")
    return rows


def _inside(folder: Path, name: str, where: str) -> tuple[str, Path]:
    """(relative posix path, file) of a metadata file_name; it must stay inside the folder."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataError(f"{where}: file_name {name!r} must be a relative path inside the folder")
    path = folder / rel
    if not path.is_file():
        raise DataError(f"{where}: file_name {name!r} does not exist")
    return rel.as_posix(), path


def metadata_folder(folder: Path, known: dict[str, int] | None = None) -> tuple[list[Path], Conditions]:
    """Image files named by metadata.jsonl in sorted relative-path order, and their conditions
    (`text`, else `label`)."""
    rows = _metadata_rows(folder)
    where = _shown(folder / METADATA)
    key = "text" if "text" in rows[0] else "label" if "label" in rows[0] else None
    if key is None:
        raise DataError(f"{where}: rows need a text or label field besides file_name")
    by_rel: dict[str, tuple[Path, object]] = {}
    for n, row in enumerate(rows, 1):
        if key not in row or (key == "text" and not isinstance(row[key], str)):
            raise DataError(f"{where}, row {n}: no {key} (every row needs one, the first has one)")
        val = row[key]
        if key == "label" and not (
            isinstance(val, str) or (isinstance(val, int) and not isinstance(val, bool))
        ):
            raise DataError(f"{where}, row {n}: label must be an integer or a name, not {val!r}")
        rel, path = _inside(folder, row["file_name"], f"{where}, row {n}")
        if rel in by_rel:
            raise DataError(f"{where}, row {n}: {rel} is listed twice")
        by_rel[rel] = (path, val)
    _all_listed(folder, by_rel)
    order = sorted(by_rel)
    files = [by_rel[r][0] for r in order]
    values = [by_rel[r][1] for r in order]
    if key == "text":
        return files, Conditions.prompts(values)
    ids, mapping = class_ids([str(v) for v in values], known)
    return files, Conditions.classes(ids, mapping)


def _all_listed(folder: Path, listed: dict) -> None:
    """Every (non-hidden) file under the folder but metadata.jsonl must have a metadata row."""
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or rel.as_posix() == METADATA:
            continue
        if rel.as_posix() not in listed:
            raise DataError(f"{_shown(p)}: has no row in {METADATA} (every image needs a file_name row)")
