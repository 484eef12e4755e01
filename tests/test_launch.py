"""The launcher: explicit flags beat environment variables, a warning for any non-loopback
address, the server's allocator arena limit (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from explorer import launch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def started(monkeypatch, tiny_workspace):
    """launch.main with the real model and index, but `serve` records where it would listen."""
    calls = []
    monkeypatch.setattr(launch, "serve", lambda demo, host, port, **kw: calls.append((host, port)))
    monkeypatch.setattr(launch, "restrict_image_decoders", lambda: None)  # process-wide; tested in a child
    model, index = str(tiny_workspace.model_dir), str(tiny_workspace.index("pixel"))

    def start(*flags: str) -> tuple[str, int]:
        args = launch.parse_args(["--model", model, "--index", index, *flags])
        assert launch.main(args) == 0
        return calls[-1]

    return start


def test_flags_beat_environment(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9999")
    assert launch._address(launch.parse_args(["--host", "127.0.0.1", "--port", "7860"])) == (
        "127.0.0.1",
        7860,
    )
    assert launch._address(launch.parse_args([])) == ("0.0.0.0", 9999)
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    assert launch._address(launch.parse_args([])) == ("127.0.0.1", 7860)


def test_explicit_loopback_host_wins_over_a_space_environment(started, monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert started("--host", "127.0.0.1", "--port", "0") == ("127.0.0.1", 0)
    err = capsys.readouterr().err
    assert "warning" not in err and "127.0.0.1" in err


@pytest.mark.parametrize(
    "flags, host",
    [(["--host", "0.0.0.0"], "0.0.0.0"), ([], "0.0.0.0"), (["--host", "192.0.2.7"], "192.0.2.7")],
)
def test_non_loopback_address_prints_one_warning_line(started, monkeypatch, capsys, flags, host):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert started(*flags, "--port", "0")[0] == host
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and host in warnings[0] and "--host 127.0.0.1" in warnings[0], warnings


def test_loopback_addresses():
    assert all(map(launch.is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(launch.is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.org", ""]))


def test_bad_port_in_the_environment_is_a_plain_error(monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    assert launch.main(launch.parse_args(["--model", "/nonexistent"])) == 2
    assert "GRADIO_SERVER_PORT='http' is not a port number" in capsys.readouterr().err


CHILD = (
    "import os, sys; from explorer import launch; print('start', os.getpid(), flush=True); "
    "launch.limit_malloc_arenas(); print('env', os.getpid(), os.environ.get('MALLOC_ARENA_MAX'))"
)


def test_the_entry_points_restart_with_the_arena_limit():
    """The variable only takes effect when present at process start: the entry point replaces
    the process (same pid) with the variable set, once."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.split("\n")
    assert out.returncode == 0, out.stderr
    starts = [ln for ln in lines if ln.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1], out.stdout  # ran twice, same process
    assert f"env {starts[0].split()[1]} 2" in lines
    env["MALLOC_ARENA_MAX"] = "4"  # the user's own value is kept, no restart
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.count("start") == 1 and out.stdout.strip().endswith(" 4"), out.stdout


def test_the_server_process_identifies_only_the_accepted_image_formats():
    code = (
        "import io; from PIL import Image; from explorer import launch; b = io.BytesIO(); "
        "Image.new('RGB', (8, 8)).save(b, 'EPS'); launch.restrict_image_decoders(); "
        "print(sorted(Image.ID)); b.seek(0)\n"
        "try:\n    Image.open(b); print('opened')\nexcept Image.UnidentifiedImageError:\n    print('refused')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['BMP', 'GIF', 'JPEG', 'PNG', 'TIFF', 'WEBP']", "refused"], (
        out.stdout
    )
