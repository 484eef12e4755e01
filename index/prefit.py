"""Curvatures shipped beside the code (`assets/curvature/`), so that a fresh `make demo` skips the
2–4 minute curvature fit of the default index.

A shipped curvature is the very file a build writes (`curvature.safetensors`), named by a key
that hashes everything the fit depends on: the model's weights, the training data, the curvature
settings and rows, the batch size (the order of the sums), the fit's source code and the torch
version.
A build whose key matches copies the file instead of fitting (`--fit-curvature` refuses the
copy); any other build fits as before. A sidecar JSON records the file's SHA-256, checked before
use: a damaged or edited file is ignored with a message, never used.

    python -m index.prefit ship INDEX_DIR [--to assets/curvature]   # ship a built index's curvature
    python -m index.prefit check INDEX_DIR                           # a fresh fit equals the shipped one?

The default index's curvature is made by fitting it as the default build does, then shipping it:

    INDEX_BUILD_KILL_AT=curvature-written attribution index build --data mnist --out /tmp/prefit
    python -m index.prefit ship /tmp/prefit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from attribution.atomic import replace_with, save_json
from attribution.console import say
from attribution.curvature import Curvature
from attribution.influence import Attributor
from index.integrity import sha256_file

PREFIT_DIR = Path(__file__).resolve().parent.parent / "assets" / "curvature"
KEY = "prefit_key"  # the key, in the curvature file's metadata
ATTRIBUTION = Path(__file__).resolve().parent.parent / "attribution"
FIT_CODE = ("capture.py", "curvature.py", "measurements.py", "conditions.py", "seeds.py")


def fit_code_sha256() -> str:
    """A hash of the source files whose code computes the fit's numbers: any edit to them (even
    a comment) retires every shipped curvature, so a stale one can never be used."""
    h = hashlib.sha256()
    for name in FIT_CODE:
        h.update((ATTRIBUTION / name).read_bytes())
    return h.hexdigest()


def curvature_identity(settings: dict, att: Attributor) -> dict:
    """What a curvature fit depends on (damping is applied at use, so it is left out)."""
    cfg = asdict(att.curvature_config())
    cfg.pop("damping")
    rows = json.dumps(att.curvature_rows()).encode()
    conditions = settings["data"].get("conditions")  # conditional models only: the rows' labels
    return {
        **({"conditions": conditions} if conditions else {}),
        "weights_sha256": settings["model"]["weights_sha256"],
        "data_sha256": settings["data"]["sha256"],
        "n": settings["data"]["n"],
        "curvature": cfg,
        "rows_sha256": hashlib.sha256(rows).hexdigest(),
        "batch_size": att.curvature_batch_size,
        "fit_code_sha256": fit_code_sha256(),
        "torch": torch.__version__.split("+")[0],
    }


def curvature_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def find(key: str, root: Path | None = None) -> Path | None:
    """The shipped curvature for `key`, if there is one and its checksum holds; else None."""
    root = PREFIT_DIR if root is None else Path(root)
    path, side = root / f"{key}.safetensors", root / f"{key}.json"
    if not path.exists() or not side.exists():
        return None
    try:
        want = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        say(f"ignoring the shipped curvature {path}: its record {side.name} cannot be read")
        return None
    if sha256_file(path) != want:
        say(f"ignoring the shipped curvature {path}: its checksum does not match {side.name}")
        return None
    return path


def ship(index_dir: str | Path, root: Path | None = None) -> Path:
    """Copies a built index's curvature into `root` under its key; returns the new file."""
    root = PREFIT_DIR if root is None else Path(root)
    src = Path(index_dir) / "curvature.safetensors"
    if not src.exists():
        raise SystemExit(f"{src}: not found (build the index first)")
    curvature = Curvature.load(src)
    key, identity = curvature.meta.get(KEY), curvature.meta.get("prefit_identity")
    if not key:
        raise SystemExit(f"{src}: has no {KEY} (fitted by an older version); rebuild the index")
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"{key}.safetensors"
    replace_with(dst, lambda tmp: shutil.copyfile(src, tmp))
    save_json(
        root / f"{key}.json", {"sha256": sha256_file(dst), "identity": identity, "from": str(index_dir)}
    )
    say(f"shipped {src} as {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    return dst


def check(index_dir: str | Path, root: Path | None = None) -> bool:
    """Whether the index's freshly fitted curvature has the bytes of the shipped one for its key."""
    src = Path(index_dir) / "curvature.safetensors"
    key = Curvature.load(src).meta.get(KEY)
    shipped = find(key, root) if key else None
    if shipped is None:
        say(f"no shipped curvature for {src} (key {key})")
        return False
    same = sha256_file(src) == sha256_file(shipped)
    say(f"{src} {'has the very bytes of' if same else 'DIFFERS from'} {shipped}")
    return same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="index.prefit", description=__doc__)
    p.add_argument("action", choices=["ship", "check"])
    p.add_argument("index", help="a built index folder (its curvature.safetensors)")
    p.add_argument("--to", default=None, help=f"folder of shipped curvatures (default {PREFIT_DIR})")
    a = p.parse_args(argv)
    if a.action == "ship":
        ship(a.index, a.to and Path(a.to))
        return 0
    return 0 if check(a.index, a.to and Path(a.to)) else 1


if __name__ == "__main__":
    sys.exit(main())
