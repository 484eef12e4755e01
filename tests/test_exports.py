"""Export clean-up never follows links and removes only what the app itself created (issue 14)."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from attribution.errors import ConfigError
from explorer import exports

OLD = time.time() - 2 * exports.MAX_AGE_S


class FakeIndex:
    thumbs = np.zeros((3, 8, 8), np.uint8)
    items = [{"source": f"mnist:{i}", "label": i} for i in range(3)]


def _payload() -> dict:
    return {"proponents": [], "opponents": [], "scores": None}


def _touch(path) -> Path:
    Path(path).write_text("{}")
    return Path(path)


def _export() -> list[str]:
    return exports.write_exports(_payload(), np.zeros((8, 8), np.uint8), FakeIndex())


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private TMPDIR and a process state with no export root yet."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(exports, "_root", None)
    monkeypatch.setattr(exports, "_created", {})
    # the report's content is tests/test_app.py's; here only the folders matter
    monkeypatch.setattr(exports.report, "render_report", lambda data, q, thumbs, path: _touch(path))
    monkeypatch.setattr(exports.report, "write_json", lambda data, path: _touch(path))
    monkeypatch.setattr(exports.report, "write_csv", lambda data, path, **kw: _touch(path))
    return tmp


def _victim(tmp_path: Path) -> Path:
    """Another user's folder with an hour-old subfolder, the kind the old clean-up deleted."""
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    (victim / "precious" / "data.txt").write_text("keep me")
    os.utime(victim / "precious", (OLD, OLD))
    return victim


def _exported_ok(paths: list[str]) -> None:
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)


def test_root_is_private_and_made_per_process(fresh):
    paths = _export()
    _exported_ok(paths)
    root = exports.export_root()
    assert Path(paths[0]).parent.parent == root and root.parent == fresh
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert root.name.startswith(exports.ROOT_PREFIX) and root.name != exports.ROOT_PREFIX


def test_symlinked_root_name_is_never_used_or_followed(fresh, tmp_path):
    """The old fixed name `$TMPDIR/attribution-exports` planted as a link to a victim folder."""
    victim = _victim(tmp_path)
    (fresh / "attribution-exports").symlink_to(victim)
    _exported_ok(_export())
    for made in list(exports._created):
        exports._created[made] = OLD
    exports.remove_old()
    assert (victim / "precious" / "data.txt").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]


def test_a_root_replaced_by_a_link_is_not_followed(fresh, tmp_path):
    """The process's own root swapped for a link after use: a new private root is made, the
    link's target is left alone, and the remembered folders are forgotten, not followed."""
    victim = _victim(tmp_path)
    _exported_ok(_export())
    root = exports.export_root()
    made = next(iter(exports._created))
    (victim / made.name).mkdir()  # the same name in the victim folder
    os.rename(root, fresh / "moved-away")
    root.symlink_to(victim)
    exports._created[made] = OLD
    assert exports.remove_old() == []
    assert (victim / made.name).is_dir() and (victim / "precious" / "data.txt").exists()
    _exported_ok(_export())
    assert exports.export_root() != root and not exports.export_root().is_symlink()


def test_only_exports_the_app_made_are_removed(fresh):
    _exported_ok(_export())
    root = exports.export_root()
    planted = root / "export-planted"
    planted.mkdir()
    os.utime(planted, (OLD, OLD))
    mine = next(iter(exports._created))
    exports._created[mine] = OLD
    recent = _export()
    assert exports.remove_old() == []  # write_exports already removed the old one
    assert not mine.exists() and planted.is_dir() and Path(recent[0]).exists()


def test_link_inside_an_export_is_not_followed(fresh, tmp_path):
    victim = _victim(tmp_path)
    paths = _export()
    folder = Path(paths[0]).parent
    (folder / "link").symlink_to(victim)
    exports._created[folder] = OLD
    assert exports.remove_old() == [folder]
    assert not folder.exists() and (victim / "precious" / "data.txt").exists()


def test_a_given_root_must_be_private(fresh, tmp_path):
    victim = _victim(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        exports.write_exports(_payload(), np.zeros((8, 8), np.uint8), FakeIndex(), root=link)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="open to other users"):
        exports.write_exports(_payload(), np.zeros((8, 8), np.uint8), FakeIndex(), root=open_dir)
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
