"""One error path (issue 14): each bad command line, bad model folder or unwritable output ends in
one plain line on stderr and exit code 2, never a traceback. Every case runs as its own process,
`python -m explorer.cli …`, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.data import save_images

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a process per case: ~5 s each on the 2-core machine


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    """Model folders (good, broken), image folders and an index of the tiny model."""
    import shutil

    from attribution.model import build_model, save_model

    d = tmp_path_factory.mktemp("cli-errors")
    ds = tiny_workspace.data()
    save_images(ds.images[:6], d / "train", prefix="t")
    save_images(ds.images[6:8], d / "queries", prefix="q")
    model = tiny_workspace.model_dir
    broken = {
        "bad-config": ("unet/config.json", "{not json"),
        "bad-config-values": ("unet/config.json", '{"sample_size": -3, "block_out_channels": "x"}'),
        "bad-scheduler": ("scheduler/scheduler_config.json", "[1, 2"),
        "bad-scheduler-values": ("scheduler/scheduler_config.json", '{"num_train_timesteps": "many"}'),
    }
    for name, (file, text) in broken.items():
        shutil.copytree(model, d / name)
        (d / name / file).write_text(text)
    save_model(build_model("tiny", seed=1), d / "other-model")
    (d / "a-file").write_text("not a folder")
    return {
        "d": d,
        "model": model,
        "index": tiny_workspace.index("ekfac"),
        "n": tiny_workspace.n,
        "image": d / "queries" / "q00000.png",
    }


def attribution(ws, *args: str) -> subprocess.CompletedProcess:
    args = [str(a).format(**ws) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "explorer.cli", *args],
        cwd=ws["d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


SCORES = ("scores", "--data", "{d}/train", "--queries", "{d}/queries", "--method", "pixel")
QUERY = ("query", "--index", "{index}", "--image", "{image}")

# (name, arguments, words the one line holds)
CASES = [
    (
        "scores: config.json not JSON",
        (*SCORES, "--model", "{d}/bad-config", "--out", "s.npy"),
        "could not be loaded",
    ),
    (
        "scores: config.json bad values",
        (*SCORES, "--model", "{d}/bad-config-values", "--out", "s.npy"),
        "could not load the U-Net",
    ),
    (
        "scores: scheduler_config.json not JSON",
        (*SCORES, "--model", "{d}/bad-scheduler", "--out", "s.npy"),
        "could not be loaded",
    ),
    (
        "scores: scheduler_config.json bad values",
        (*SCORES, "--model", "{d}/bad-scheduler-values", "--out", "s.npy"),
        "could not be loaded",
    ),
    (
        "scores: --dim -1",
        (*SCORES, "--model", "{model}", "--out", "s.npy", "--dim", "-1"),
        "argument --dim: must be at least 0, not -1",
    ),
    (
        "scores: --draws 0",
        (*SCORES, "--model", "{model}", "--out", "s.npy", "--draws", "0"),
        "argument --draws: must be at least 1, not 0",
    ),
    (
        "scores: --damping -1",
        (*SCORES, "--model", "{model}", "--out", "s.npy", "--damping", "-1"),
        "argument --damping: must be a positive number",
    ),
    (
        "scores: --out under /proc",
        (*SCORES, "--model", "{model}", "--out", "/proc/no/such/s.npy"),
        "cannot make its folder",
    ),
    (
        "scores: --out under a file",
        (*SCORES, "--model", "{model}", "--out", "{d}/a-file/s.npy"),
        "cannot make its folder",
    ),
    (
        "scores: model folder missing",
        (*SCORES, "--model", "{d}/nope", "--out", "s.npy"),
        "model folder not found",
    ),
    (
        "query: --top-k -1",
        (*QUERY, "--model", "{model}", "--top-k", "-1"),
        "argument --top-k: must be at least 1, not -1",
    ),
    (
        "query: --top-k 0",
        (*QUERY, "--model", "{model}", "--top-k", "0"),
        "argument --top-k: must be at least 1, not 0",
    ),
    ("query: --top-k x", (*QUERY, "--model", "{model}", "--top-k", "x"), "'x' is not a whole number"),
    ("query: model folder missing", (*QUERY, "--model", "{d}/nope"), "model folder not found"),
    ("query: index of another model", (*QUERY, "--model", "{d}/other-model"), "built for another model"),
    (
        "query: index folder missing",
        ("query", "--index", "{d}/nope", "--image", "{image}", "--model", "{model}"),
        "not found",
    ),
    (
        "query: --json under /proc",
        (*QUERY, "--model", "{model}", "--json", "/proc/no/x.json"),
        "cannot make its folder",
    ),
    (
        "index build --n -4990",
        ("index", "build", "--model", "{model}", "--out", "ix", "--n", "-4990"),
        "argument --n: must be at least 1, not -4990",
    ),
    (
        "sample --seed -1",
        ("sample", "--model", "{model}", "--seed", "-1"),
        "argument --seed: must be between 0",
    ),
    (
        "sample --steps 0",
        ("sample", "--model", "{model}", "--steps", "0"),
        "argument --steps: must be at least 1",
    ),
    (
        "train --batch-size 0",
        ("train", "--out", "m", "--batch-size", "0"),
        "argument --batch-size: must be at least 1",
    ),
    (
        "train --ema-decay 1",
        ("train", "--out", "m", "--ema-decay", "1"),
        "argument --ema-decay: must be at least 0",
    ),
    ("evaluate lds --draws 0", ("evaluate", "lds", "--draws", "0"), "argument --draws: must be at least 1"),
    (
        "evaluate retrain-top-k --fractions 1.5",
        ("evaluate", "retrain-top-k", "--fractions", "1.5"),
        "argument --fractions: must be between 0 and 1",
    ),
    ("evaluate groundtruth --worker 2/2", ("evaluate", "groundtruth", "--worker", "2/2"), "need 0 <= i < n"),
    (
        "stability --k 0",
        ("stability", "--model", "{model}", "--data", "{d}/train", "--queries", "{d}/queries", "--k", "0"),
        "argument --k: must be at least 1",
    ),
    ("serve --port 70000", ("serve", "--port", "70000"), "argument --port: must be between 0 and 65535"),
    ("serve --concurrency 0", ("serve", "--concurrency", "0"), "argument --concurrency: must be at least 1"),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plain_one_line_error_and_exit_code_2(ws, args, words):
    r = attribution(ws, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr
    assert "error: " in lines[0] and words in lines[0], lines[0]
    assert r.stdout == "", r.stdout


def test_scores_out_name_reports_the_file_it_wrote(ws):
    r = attribution(ws, *SCORES, "--model", "{model}", "--out", "out/NAME")
    assert r.returncode == 0, r.stderr
    assert (ws["d"] / "out" / "NAME.npy").is_file() and not (ws["d"] / "out" / "NAME").exists()
    assert "wrote out/NAME.npy:" in r.stderr, r.stderr


def test_query_top_k_above_the_index_size_is_capped_with_a_note(ws):
    r = attribution(ws, *QUERY, "--model", "{model}", "--top-k", str(ws["n"] + 50))
    assert r.returncode == 0, r.stderr
    assert (
        f"note: --top-k {ws['n'] + 50} is more than the {ws['n']} images in the index; showing all {ws['n']}"
        in r.stderr
    )
    rows = [ln for ln in r.stdout.splitlines()[1:] if ln.strip()]
    assert len(rows) == ws["n"] and rows[-1].split()[0] == str(ws["n"])
