"""Preparing the output folder of a build: nothing finished is deleted unless asked.

new folder, or an empty one            -> a new build
a build in progress, same settings     -> resume it
a build in progress, other settings    -> its files move to .aside/<its key>/, a new build
                                          (and a build whose key is in .aside/ resumes from there)
a finished index, same settings        -> nothing to do, unless `overwrite` (then rebuilt)
a finished index, other settings       -> refused (naming the settings), unless `overwrite`
anything else (other files, a file)    -> refused
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from attribution.errors import ConfigError
from index.layout import IndexLayout
from index.manifest import manifest_settings, settings_diff, settings_key


@dataclass
class FolderPlan:
    action: str  # new | resume | done | overwrite | aside
    old_key: str | None = None
    note: str = ""  # what the build says about the folder, if anything


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished_settings(lay: IndexLayout) -> tuple[str | None, dict | None]:
    m = _read_json(lay.manifest)
    try:
        s = manifest_settings(m)
    except (KeyError, TypeError):
        return None, None
    return settings_key(s), s


def plan_folder(lay: IndexLayout, key: str, settings: dict, overwrite: bool = False) -> FolderPlan:
    """What to do with the folder `lay.root` for a build with `settings` (read-only; every rank
    may call it). Raises ConfigError for a folder that must not be touched."""
    root = lay.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root}: this is a file, not a folder; give a folder for the index")
    if not root.exists():
        return FolderPlan("new")
    if lay.is_finished:
        old_key, old = _finished_settings(lay)
        if old_key == key and not overwrite:
            return FolderPlan(
                "done",
                key,
                f"{root}: the index is already built with these settings (--overwrite rebuilds it)",
            )
        if old_key == key:
            return FolderPlan("overwrite", key, f"{root}: rebuilding the index there (--overwrite)")
        what = (
            ("other settings (" + settings_diff(old, settings) + ")")
            if old is not None
            else "a manifest that cannot be read"
        )
        if not overwrite:
            raise ConfigError(
                f"{root}: holds a finished index with {what}; pass --overwrite to replace "
                "it, or choose another --out folder"
            )
        return FolderPlan("overwrite", old_key, f"{root}: replacing the finished index there (--overwrite)")
    if lay.build.is_file():
        prev = _read_json(lay.build)
        prev_key = prev.get("key") if isinstance(prev, dict) else None
        if prev_key == key:
            return FolderPlan("resume", key)
        diff = settings_diff(prev.get("settings") or {}, settings) if isinstance(prev, dict) else "unreadable"
        return FolderPlan(
            "aside", prev_key or "unknown", f"{root}: holds an unfinished build with other settings ({diff})"
        )
    foreign = lay.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ConfigError(
            f"--out {root}: this folder is not an index and is not empty (it holds {shown}); "
            "give a new or empty folder"
        )
    leftovers = [p for p in root.iterdir() if p.name != lay.ASIDE]
    if leftovers:  # own files without build.json (a build killed while moving aside, or edited by hand)
        return FolderPlan("aside", "unknown", f"{root}: holds index files without a build.json")
    return FolderPlan("new")


def _free(path: Path) -> Path:
    n, cand = 1, path
    while cand.exists():
        n += 1
        cand = path.with_name(f"{path.name}-{n}")
    return cand


def move_aside(lay: IndexLayout, key: str) -> Path:
    """Move an unfinished build's files to .aside/<key>/ (build.json last, so a kill midway leaves a
    folder that is still recognised and moved on the next run). Returns the new folder."""
    dest = _free(lay.aside / key)
    dest.mkdir(parents=True)
    names = sorted(
        p.name for p in lay.root.iterdir() if lay.is_own_name(p.name) and p.name not in (lay.ASIDE, lay.BUILD)
    )
    for name in [*names, lay.BUILD]:
        if lay.path(name).exists():
            lay.path(name).rename(dest / name)
    return dest


def restore_aside(lay: IndexLayout, key: str) -> bool:
    """Move back a build with `key` set aside earlier (so it resumes); False if there is none."""
    src = lay.aside / key
    if not (src / lay.BUILD).is_file():
        return False
    for p in sorted(src.iterdir(), key=lambda p: p.name == lay.BUILD):  # build.json last
        p.rename(lay.path(p.name))
    src.rmdir()
    return True


def remove_finished(lay: IndexLayout) -> None:
    """Delete a finished index (only on --overwrite): the manifest first, so a kill midway leaves
    an unfinished build rather than a finished index with missing files."""
    lay.manifest.unlink(missing_ok=True)
    for name in lay.FILES:
        lay.path(name).unlink(missing_ok=True)
    shutil.rmtree(lay.shards, ignore_errors=True)


def remove_temporaries(lay: IndexLayout) -> None:
    """Delete the temporary files a killed run left behind (never a finished file)."""
    for folder in (lay.root, lay.shards):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and ".tmp" in p.name and (lay.is_own_name(p.name) or folder == lay.shards):
                    p.unlink()


def apply_plan(lay: IndexLayout, plan: FolderPlan, key: str, say) -> None:
    """Carry out `plan` (rank 0 only); `say` prints a line for the user."""
    lay.root.mkdir(parents=True, exist_ok=True)
    if plan.note and plan.action != "aside":
        say(plan.note)
    if plan.action == "overwrite":
        remove_finished(lay)
    elif plan.action == "aside":
        dest = move_aside(lay, plan.old_key or "unknown")
        say(f"{plan.note}; moved its files to {dest} (nothing deleted) and starting a new build")
    if plan.action in ("new", "overwrite", "aside") and restore_aside(lay, key):
        say(f"resuming the build with these settings set aside earlier in {lay.aside / key}")
