"""Atomic writes: each file is written under a temporary name beside it, then renamed, so a
reader (or a resumed job) sees either the old file, the whole new file, or none."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def replace_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path` (same suffix), then rename it to `path`.
    If the write fails (a full disk, a read-only folder, an interrupt), the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only folder: the original error is the one to report
            pass
        raise
    return path


def save_numpy(path: str | Path, arr: np.ndarray) -> Path:
    return replace_with(path, lambda t: np.save(t, arr, allow_pickle=False))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    return replace_with(
        path, lambda t: save_file({k: v.contiguous() for k, v in tensors.items()}, str(t), metadata=metadata)
    )


def save_json(path: str | Path, obj) -> Path:
    return replace_with(path, lambda t: t.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def save_text(path: str | Path, text: str) -> Path:
    return replace_with(path, lambda t: t.write_text(text))


def save_torch(path: str | Path, state: dict) -> Path:
    """A training checkpoint of plain tensors and numbers (loaded with weights_only=True)."""
    return replace_with(path, lambda t: torch.save(state, t))
