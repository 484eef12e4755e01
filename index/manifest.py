"""The index manifest: what an index was built from, and the checks that refuse a mismatch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from attribution.errors import IndexLoadError  # noqa: F401  (re-exported)
from index.conditions import check_family
from index.layout import IndexLayout

FORMAT_VERSION = 3  # 2: count-sketch projection, split preconditioner; 3: sketch hashed per layer
CODE_VERSION = "0.4.0"  # 0.3: checksums of the files in the manifest; 0.4: no per-parameter tables


def settings_key(settings: dict) -> str:
    """A short hash of everything that determines the features (model, data, method, seeds)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_settings(manifest: dict) -> dict:
    """The build settings a manifest records (what its key hashes): the model, data, method and
    format sections as they stand, the requested store type and the shard size."""
    return {
        "model": manifest["model"],
        "data": manifest["data"],
        "method": manifest["method"],
        "format_version": manifest["format_version"],
        "faiss": manifest["faiss"]["requested"],
        "shard_size": manifest["shard_size"],
    }


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix or "(settings)": d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def settings_diff(old: dict, new: dict, limit: int = 6) -> str:
    """The settings that differ, for a message: "method.seed: 0 there, 1 now; …"."""
    a, b = (_flat(json.loads(json.dumps(x, default=str))) for x in (old, new))  # tuples == lists
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "(none)") != b.get(k, "(none)"))
    parts = [f"{k}: {a.get(k, '(none)')!r} there, {b.get(k, '(none)')!r} now" for k in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more if parts else "(no visible difference)"


def read_manifest(index_dir: str | Path) -> dict:
    index_dir = Path(index_dir)
    lay = IndexLayout(index_dir)
    path = lay.manifest
    if not index_dir.is_dir():
        raise IndexLoadError(f"{index_dir}: index folder not found; build it with `attribution index build`")
    if not path.is_file():
        hint = (
            " (a build was started here but has not finished; rerun it to resume)"
            if lay.build.exists()
            else ""
        )
        raise IndexLoadError(f"{index_dir}: no manifest.json, so this is not a finished index{hint}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexLoadError(
            f"{path}: corrupted manifest ({e}); rebuild it with `attribution index build … --overwrite`"
        ) from None
    if not isinstance(m, dict):
        raise IndexLoadError(
            f"{path}: corrupted manifest (a JSON {type(m).__name__}, not an object); "
            "rebuild it with `attribution index build … --overwrite`"
        )
    if m.get("format_version") != FORMAT_VERSION:
        raise IndexLoadError(
            f"{index_dir}: index format version {m.get('format_version')!r}, this code "
            f"reads version {FORMAT_VERSION}; rebuild it with `attribution index build … --overwrite`"
        )
    check_sections(m, path)
    got = settings_key(manifest_settings(m))
    if got != m["key"]:
        raise IndexLoadError(
            f"{path}: the settings in the manifest do not match its key ({got}, recorded "
            f"{m['key']}): it was edited after the build; rebuild it with `attribution index build … --overwrite`"
        )
    return m


REQUIRED = {
    "model": {"weights_sha256": str},
    "data": {"n": int},
    "method": {"method": str},
    "projection": {"total_dim": int},
    "faiss": {"type": str, "requested": str},
}


def check_sections(m: dict, path) -> None:
    """Refuse a manifest without the sections (and their entries) that loading relies on."""
    missing = [k for k in (*REQUIRED, "key", "shard_size") if k not in m]
    missing += [
        f"{sec}.{k}"
        for sec, keys in REQUIRED.items()
        if isinstance(m.get(sec), dict)
        for k, t in keys.items()
        if not isinstance(m[sec].get(k), t)
    ]
    missing += [sec for sec in REQUIRED if sec in m and not isinstance(m[sec], dict)]
    if missing:
        raise IndexLoadError(
            f"{path}: corrupted manifest (missing or malformed: {', '.join(missing)}); "
            "rebuild it with `attribution index build … --overwrite`"
        )


def check_model(manifest: dict, model, index_dir) -> None:
    """IndexLoadError if the index was built for another model: another family (pixel / latent),
    condition kind or class map (index/conditions.py), or other weights. `model` is the
    DiffusionModel (or, for callers that have only that, its weights sha256: no family check)."""
    if not isinstance(model, str):
        check_family(manifest, model, index_dir)
        model = model.weights_sha256()
    want = manifest["model"]["weights_sha256"]
    if want != model:
        raise IndexLoadError(
            f"{index_dir}: the index was built for another model (weights sha256 "
            f"{want[:12]}…, this model {model[:12]}…); rebuild it for this model "
            f"with `attribution index build --model … --out {index_dir}`"
        )


def check_data(manifest: dict, fingerprint: str, index_dir) -> None:
    want = manifest["data"]["sha256"]
    if want != fingerprint:
        raise IndexLoadError(
            f"{index_dir}: the index was built from other training data (fingerprint "
            f"{want[:12]}…, given data {fingerprint[:12]}…); rebuild it for this data"
        )
