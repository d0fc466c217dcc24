"""The pieces that make a sharded build resumable and reproducible: plans, atomic shard
directories, timestamp-free files, and the store checksum that compares builds."""

import zipfile

import numpy as np
import pytest

from indexer import store
from indexer.corpus import Chunk
from indexer.curvature import LayerStats, Stats
from indexer.plan import Plan, shard_ranges, write_plan


def test_npz_files_carry_no_timestamps(tmp_path):
    stats = Stats({"h.0": LayerStats(np.eye(3), 2 * np.eye(2), 7.0)})
    stats.save(tmp_path / "a.npz")
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    again = Stats.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(again.layers["h.0"].s_sum, 2 * np.eye(2))
    again.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_checksum_covers_data_files_and_names_but_not_info(tmp_path):
    (tmp_path / "bm25").mkdir()
    (tmp_path / "grad.npy").write_bytes(b"1234")
    (tmp_path / "bm25" / "vocab.json").write_text("{}")
    store.write_info(tmp_path, {"timings_s": 1})
    first = store.checksum(tmp_path)
    store.write_info(tmp_path, {"timings_s": 2})
    assert store.checksum(tmp_path) == first
    (tmp_path / "grad.npy").write_bytes(b"1235")
    assert store.checksum(tmp_path) != first
    (tmp_path / "grad.npy").write_bytes(b"1234")
    (tmp_path / "grad.npy").rename(tmp_path / "dense.npy")
    assert store.checksum(tmp_path) != first


def test_atomic_dir_publishes_whole_or_not_at_all(tmp_path):
    final = tmp_path / "00001"
    with pytest.raises(RuntimeError):
        with store.atomic_dir(final) as tmp:
            (tmp / "raw.npy").write_bytes(b"half")
            raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []
    with store.atomic_dir(final) as tmp:
        (tmp / "raw.npy").write_bytes(b"first")
    with store.atomic_dir(final) as tmp:  # a redelivered task finishing second
        (tmp / "raw.npy").write_bytes(b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["00001"]
    assert (final / "raw.npy").read_bytes() == b"first"
    with pytest.raises(FileNotFoundError):  # the build was removed: late shards stop here
        with store.atomic_dir(tmp_path / "gone" / "00002"):
            pass


def test_plan_round_trips_chunks_texts_and_entries(tmp_path):
    texts = ["Mirela Stoven was born in 1873.", "Ünïcödé — text", "", "x" * 50, "last"]
    chunks = [Chunk(10 + i, i, i + len(t), list(range(i, i + 3 + i))) for i, t in enumerate(texts)]
    write_plan(tmp_path, chunks, texts, {10: 3, 11: 4, 99: 0}, shard_size=2, extra={"provenance": {"job_id": 1}})
    plan = Plan.load(tmp_path)
    assert plan.rows == 5 and plan.shards == [(0, 2), (2, 4), (4, 5)] == shard_ranges(5, 2)
    assert plan.chunks(1, 4) == chunks[1:4]
    assert plan.texts(1, 4) == texts[1:4] and plan.texts(0, 5) == texts
    assert plan.entries() == [(c.document_id, c.char_start, c.char_end) for c in chunks]
    assert plan.doc_tokens() == {10: 3, 11: 4, 99: 0}
    assert plan.meta["provenance"] == {"job_id": 1} and plan.meta["tokens"] == sum(len(c.token_ids) for c in chunks)
    write_plan(tmp_path, chunks[:1], texts[:1], {}, shard_size=2, extra={})  # a duplicate run keeps the first
    assert Plan.load(tmp_path).rows == 5
