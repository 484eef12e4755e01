"""The `attribution` command's argument types and plain errors: counts and ranges checked by
argparse (one-line messages, exit code 2), model folders that fail to load and output paths that
cannot be written turned into `AttributionError`s, checked before any work."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from index.checks import NON_NEGATIVE, POSITIVE


def _number(cast, name: str, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: `cast(text)` within [lo, hi] (open ends where asked), else one plain line."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if (
            v != v
            or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and (v >= hi if hi_open else v > hi))
        ):
            raise argparse.ArgumentTypeError(f"must be {name}, not {text}")
        return v

    parse.__name__ = name
    return parse


POSITIVE_FLOAT = _number(float, "a positive number", lo=0, lo_open=True, hi=float("inf"), hi_open=True)
FRACTION = _number(float, "between 0 and 1 (both excluded)", lo=0, hi=1, lo_open=True, hi_open=True)
DECAY = _number(float, "at least 0 and below 1", lo=0, hi=1, hi_open=True)
SEED = _number(int, f"between 0 and {2**31 - 1}", lo=0, hi=2**31 - 1)
PORT = _number(int, "between 0 and 65535", lo=0, hi=65535)


def worker(text: str) -> str:
    """--worker i/n with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n (e.g. 0/2)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= i < n")
    return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `attribution scores: error: argument --draws: …`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_model(path, device=None):
    """`attribution.model.load_model` with a ModelError, not a traceback, for a model folder whose
    config.json or scheduler_config.json is not valid JSON or holds values diffusers cannot use."""
    from attribution.errors import AttributionError, ModelError
    from attribution.model import load_model as load

    try:
        return load(path, device=device or "cpu")
    except AttributionError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(
            f"{path or 'assets/mnist-unet'}: the model folder could not be loaded ({first}); "
            "check its config.json and scheduler/scheduler_config.json"
        ) from None


def output(path: str, flag: str, suffix: str = "") -> Path:
    """The file a command will write (np.save adds `suffix` when missing), checked before any
    work: its folder is made, and must be writable. ConfigError otherwise."""
    from attribution.errors import ConfigError

    out = Path(path)
    if suffix and out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{flag} {path}: cannot make its folder {out.parent} ({e.strerror}); give a path you can write to"
        ) from None
    if out.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        why = "is a folder" if out.is_dir() else f"{out.parent} is not writable"
        raise ConfigError(f"{flag} {path}: cannot write there ({why}); give a path you can write to")
    return out


def write(out: Path, flag: str, write) -> None:
    """Run write(out); a disk error becomes a plain ConfigError/AttributionError."""
    from attribution.errors import ConfigError
    from index.checks import user_error

    try:
        write(out)
    except OSError as e:
        raise user_error(e, out.parent) or ConfigError(f"{flag} {out}: could not write it ({e})") from None


__all__ = [
    "DECAY",
    "FRACTION",
    "NON_NEGATIVE",
    "PORT",
    "POSITIVE",
    "POSITIVE_FLOAT",
    "SEED",
    "Parser",
    "load_model",
    "output",
    "worker",
    "write",
]
