"""Bad settings, a read-only folder and a full disk: a plain message (exit code 2), no traceback,
no temporary file left behind (issue 14)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.atomic import replace_with
from attribution.data import load_dataset
from attribution.errors import AttributionError, ConfigError
from attribution.influence import AttributionConfig
from attribution.model import build_model, save_model
from index.build import build_index, main
from index.checks import user_error

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "nosuch"], "argument --method: invalid choice: 'nosuch'"),
        (["--dim", "-1"], "argument --dim: must be at least 0, not -1"),
        (["--shard-size", "0"], "argument --shard-size: must be at least 1, not 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
        (["--n", "0"], "argument --n: must be at least 1, not 0"),
        (["--n", "-5"], "argument --n: must be at least 1, not -5"),
        (["--draws", "0"], "argument --draws: must be at least 1, not 0"),
        (["--draws", "two"], "argument --draws: 'two' is not a whole number"),
        (["--faiss", "IVF,nonsense"], "argument --faiss"),
    ],
)
def test_bad_command_line_settings_exit_2_with_a_plain_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "idx"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists()


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0), load_dataset("mnist", channels=1, size=8, n=16)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(shard_size=0), "shard size 0"),
        (dict(cfg=dict(batch_size=0)), "batch size 0"),
        (dict(cfg=dict(draws=-1)), "draws -1"),
        (dict(cfg=dict(curvature_images=-3)), "curvature images -3"),
        (dict(cfg=dict(method="trak", dim=None)), "needs a projection"),
        (dict(n=0), "no training images"),
        (dict(faiss_type="pq"), "unknown FAISS index type 'pq'"),
    ],
)
def test_bad_settings_in_build_index_are_config_errors(tiny, tmp_path, change, message):
    model, data = tiny
    cfg = AttributionConfig(**{"method": "gradcos", "dim": 16, "draws": 1, **change.pop("cfg", {})})
    if "n" in change:
        data = data.subset([])
        change.pop("n")
    with pytest.raises(ConfigError, match=message):
        build_index(model, data, tmp_path / "idx", cfg, progress=False, **change)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize(
    "exc,kind",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
        (OSError("1000000 requested and 32752 written"), "disk is full"),  # numpy
        (
            RuntimeError("Error in faiss::write_index: write error in x: 1 != 3 (No space left on device)"),
            "disk is full",
        ),
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "disk is full",
        ),
        (OSError(errno.EROFS, "Read-only file system"), "cannot write there"),
        (OSError(errno.EACCES, "Permission denied"), "cannot write there"),
        (RuntimeError("could not open x for writing: Read-only file system"), "cannot write there"),
    ],
)
def test_disk_errors_become_plain_messages(tmp_path, exc, kind):
    err = user_error(exc, tmp_path)
    assert isinstance(err, AttributionError) and kind in str(err) and str(tmp_path) in str(err)
    assert user_error(RuntimeError("something else"), tmp_path) is None


def test_a_failed_write_leaves_no_temporary(tmp_path):
    def write(t: Path) -> None:
        t.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        replace_with(tmp_path / "features.faiss", write)
    assert list(tmp_path.iterdir()) == []


def _in_small_filesystem(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace where $MNT is a fresh tmpfs; skip the test
    where this machine does not allow unprivileged mounts."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("unprivileged mount namespaces are not available here")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MNT": str(mnt), "PY": sys.executable}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )


BUILD = (
    '"$PY" -m index.build --model "$MODEL" --data mnist --n 16 --out "$MNT/idx" --method ekfac --dim 16 '
    '--draws 1 --curvature-draws 1 --batch-size 16 --shard-size 16; echo "rc=$?"; '
    'ls -A "$MNT/idx" "$MNT/idx/shards" 2>&1'
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors") / "model"
    save_model(build_model("tiny", seed=0), d)
    return d


def test_read_only_output_folder(tmp_path, model_dir):
    r = _in_small_filesystem(
        tmp_path,
        f'export MODEL="{model_dir}"; mount -t tmpfs -o size=1m tmpfs "$MNT" && '
        f'mkdir "$MNT/idx" && mount -o remount,ro "$MNT" && {BUILD}',
    )
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert "cannot write there" in r.stderr and "Read-only file system" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_full_disk(tmp_path, model_dir):
    """Room for build.json but not for the curvature (≈ 1 MB): a plain message, no temporary."""
    r = _in_small_filesystem(
        tmp_path, f'export MODEL="{model_dir}"; mount -t tmpfs -o size=256k tmpfs "$MNT" && {BUILD}'
    )
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert "the disk is full" in r.stderr and "rerun the same command" in r.stderr
    assert "Traceback" not in r.stderr
    listing = r.stdout.split("rc=2", 1)[1]
    assert ".tmp" not in listing and "build.json" in listing, listing
