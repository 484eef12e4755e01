"""Messages for the person at the terminal: progress and errors, on stderr, one line each."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """Print `msg` to stderr at once (stdout stays free for results)."""
    print(msg, file=sys.stderr, flush=True)
