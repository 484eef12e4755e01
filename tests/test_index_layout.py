"""IndexLayout: the one place that names the files of an index folder."""

from __future__ import annotations

from index import IndexLayout


def test_paths_and_shard_names(tmp_path):
    lay = IndexLayout(tmp_path)
    assert lay.manifest == tmp_path / "manifest.json" and lay.build == tmp_path / "build.json"
    assert lay.features.name == "features.faiss" and lay.thumbs.name == "thumbs.npy"
    assert lay.shard(256, 512) == tmp_path / "shards" / "0000256-0000512.safetensors"
    assert IndexLayout.parse_shard(lay.shard(256, 512)) == (256, 512)
    assert IndexLayout.parse_shard("shards/.0000000-0000032.safetensors.tmp.safetensors") is None
    assert IndexLayout.parse_shard("notes.txt") is None


def test_finished_shards_and_progress(tmp_path):
    lay = IndexLayout(tmp_path)
    assert lay.finished_shards() == [] and lay.rows_done() == 0
    lay.shards.mkdir()
    for s, e in [(32, 64), (0, 32), (64, 70)]:
        lay.shard(s, e).write_bytes(b"")
    (lay.shards / ".0000070-0000100.safetensors.tmp.safetensors").write_bytes(b"")
    assert [(s, e) for s, e, _ in lay.finished_shards()] == [(0, 32), (32, 64), (64, 70)]
    assert lay.rows_done() == 70


def test_own_and_foreign_entries(tmp_path):
    lay = IndexLayout(tmp_path)
    for name in ("manifest.json", ".features.faiss.tmp.faiss", "features.faiss.tmp", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "shards").mkdir()
    (tmp_path / ".aside").mkdir()
    assert lay.foreign_entries() == ["notes.txt"]
    assert lay.is_finished and not lay.is_unfinished_build
