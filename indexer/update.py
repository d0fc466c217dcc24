"""New versions of a published store: rows added (`append`) or rows removed (`remove`).

A published store directory is never written again. Each change writes a complete new directory
(unchanged files are hard links, so a deletion copies no arrays) that `service.update` renames
into place and records in SQL in one transaction. Row positions never move: added rows go after
the last one, removed rows stay in the arrays, listed in `removed.npy`, and leave FAISS
(`remove_ids`) and BM25 (refitted over the live rows, so its IDF is a fresh build's).

Curvature, when rows are added, is either kept (the new rows get the build's EK-FAC; old rows are
untouched) or refitted: the new shards' K-FAC sums and gradient moments are added to the kept
`kfac-c{c}.npz` and EK-FAC is fitted again, which rewrites every row's features. Stored features
are unit-norm preconditioned gradients, and normalisation cancels the unknown scale, so an old row
is rewritten as normalise(C_new C_old⁻¹ f_old) without its raw gradient: a refit equals a fresh
build up to float16 rounding of the old features (the sums of deleted rows stay in the fit).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from db.errors import InputError
from indexer import curvature, lexical, semantic, store
from indexer.ann import build_faiss
from indexer.build import Progress, copy_shard_rows, feature_block, merged_runtime, raw_blocks, shard_stats
from indexer.config import BuildConfig

KFAC = "kfac-c{c}.npz"
CURVATURE = "curvature-c{c}.npz"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (stores are immutable once published); a copy across filesystems."""
    if src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def can_refit(folder: Path, info: dict) -> str | None:
    """Why the build's curvature cannot be refitted, or None."""
    if info["config"]["gradient"]["curvature"] != "ekfac":
        return "it has no curvature (built with curvature 'none')"
    for c in range(len(info["gradient"]["dims"])):
        path = Path(folder) / KFAC.format(c=c)
        if not path.exists() or curvature.load_state(path)[1] is None:
            return "it keeps no curvature sums (built before updates existed, or with unprojected gradients)"
    return None


def _faiss_with(old: Path, path: Path, vectors: np.ndarray, first_id: int) -> None:
    """The index at `old` plus `vectors` under ids first_id, first_id + 1, …"""
    import faiss
    index = faiss.read_index(str(old))
    for start in range(0, len(vectors), store.BLOCK):
        block = np.ascontiguousarray(vectors[start:start + store.BLOCK], dtype=np.float32)
        index.add_with_ids(block, np.arange(first_id + start, first_id + start + len(block), dtype=np.int64))
    faiss.write_index(index, str(path))


def _faiss_without(old: Path, path: Path, ids: np.ndarray) -> None:
    import faiss
    index = faiss.read_index(str(old))
    if len(ids):
        index.remove_ids(np.asarray(ids, dtype=np.int64))
    faiss.write_index(index, str(path))


def _bm25(out: Path, live_texts: list[str], live_positions: list[int], rows: int) -> None:
    if not live_texts:
        raise InputError("no document of the build would be left: keep at least one, or ingest into a new corpus")
    dense_rows = live_positions == list(range(rows))
    lexical.build(live_texts, out / "bm25", None if dense_rows else np.asarray(live_positions), rows)


def _curvatures(old: Path, out: Path, shards: list[Path], c: int, config: BuildConfig, refit: bool):
    """(old curvature, curvature of the new version) of checkpoint c; writes the new one's files.

    The kept sums grow by the new rows' either way, so a later refit covers every row.
    """
    if config.gradient.curvature != "ekfac":
        return None, None
    src = old / CURVATURE.format(c=c)
    before = curvature.Curvature.load(src)
    stats = moments = None
    if (old / KFAC.format(c=c)).exists():  # builds made before updates existed keep no sums
        stats, moments = curvature.load_state(old / KFAC.format(c=c))
        stats.add(shard_stats(shards, c))
        if moments is not None:
            for block in raw_blocks(shards, c):
                moments.add_block(block)
        curvature.save_state(out / KFAC.format(c=c), stats, moments)
    if not refit:
        link_or_copy(src, out / CURVATURE.format(c=c))
        return before, before
    after = curvature.fit_moments(stats, moments, config.gradient.damping)
    after.save(out / CURVATURE.format(c=c))
    return before, after


def _gradients(old: Path, out: Path, shards: list[Path], info: dict, new_rows: int, refit: bool,
               progress: Progress) -> None:
    config = BuildConfig(**info["config"])
    dims, weights, old_rows = info["gradient"]["dims"], info["gradient"]["weights"], info["rows"]
    before = store.open_array(old, "grad")
    grad = store.create_array(out, "grad", old_rows + new_rows, sum(dims))
    col = 0
    for c, dim in enumerate(dims):
        was, now = _curvatures(old, out, shards, c, config, refit)
        for start in range(0, old_rows, store.BLOCK):
            part = before[start:start + store.BLOCK, col:col + dim]
            if refit:  # C_old⁻¹ undoes the old preconditioning up to scale; normalising drops the scale
                part = feature_block(was.unapply(part.astype(np.float32) / weights[c]), now, weights[c])
            grad[start:start + len(part), col:col + dim] = part
        row = old_rows
        for block in raw_blocks(shards, c):
            grad[row:row + len(block), col:col + dim] = feature_block(block, now, weights[c])
            row += len(block)
        col += dim
        progress("curvature", 1, len(dims))
    grad.flush()


def append(old: Path, out: Path, shards: list[Path], live_texts: list[str], live_positions: list[int],
           refit: bool, progress: Progress) -> dict:
    """The store at `old` plus the rows of `shards` (from `compute_shard`, in order), into `out`.

    `live_texts`/`live_positions`: every live row's text after the change (BM25 is refitted).
    Returns the new info.json.
    """
    t = time.perf_counter()
    info = store.read_info(old)
    if refit and (why := can_refit(old, info)):
        raise InputError(f"cannot refit the curvature: {why}; update without --refit-curvature, or rebuild")
    metas = [json.loads((s / "meta.json").read_text()) for s in shards]
    if any(m["dims"] != info["gradient"]["dims"] for m in metas):
        raise InputError("the new rows' gradients do not match the build's dimensions: rebuild with `wherefrom index`")
    old_rows, new_rows = info["rows"], sum(m["rows"] for m in metas)
    rows = old_rows + new_rows
    _gradients(old, out, shards, info, new_rows, refit, progress)
    dense = store.create_array(out, "dense", rows, semantic.DIM)
    dense[:old_rows] = store.open_array(old, "dense")
    copy_shard_rows(dense, shards, "dense.npy", old_rows)
    removed = store.removed_rows(old)
    if len(removed):
        link_or_copy(old / store.REMOVED, out / store.REMOVED)
    _bm25(out, live_texts, live_positions, rows)
    if refit:  # every vector changed
        build_faiss(store.open_array(out, "grad"), out / "grad.faiss.all", info["faiss_factory"])
        _faiss_without(out / "grad.faiss.all", out / "grad.faiss", removed)
        (out / "grad.faiss.all").unlink()
    else:
        _faiss_with(old / "grad.faiss", out / "grad.faiss", store.open_array(out, "grad")[old_rows:], old_rows)
    _faiss_with(old / "dense.faiss", out / "dense.faiss", store.open_array(out, "dense")[old_rows:], old_rows)
    progress("faiss", new_rows, new_rows)
    step = {"added_rows": new_rows, "curvature": ("refitted" if refit else "kept")
            if info["config"]["gradient"]["curvature"] == "ekfac" else "none",
            "seconds": round(time.perf_counter() - t + sum(m["timings_s"]["gradients"] + m["timings_s"]["embeddings"]
                                                           for m in metas), 3),
            "runtime": merged_runtime(metas)}  # where the new rows were computed, as a build records it
    return _next_info(old, out, info, rows, len(removed), step)


def remove(old: Path, out: Path, positions: np.ndarray, live_texts: list[str], live_positions: list[int]) -> dict:
    """The store at `old` with rows `positions` removed from FAISS and BM25, into `out`."""
    info = store.read_info(old)
    removed = np.union1d(store.removed_rows(old), np.asarray(positions, dtype=np.int64))
    for child in old.iterdir():
        if child.name not in (store.INFO, store.REMOVED, "grad.faiss", "dense.faiss", "bm25"):
            link_or_copy(child, out / child.name)
    np.save(out / store.REMOVED, removed)
    for name in ("grad.faiss", "dense.faiss"):
        _faiss_without(old / name, out / name, positions)
    _bm25(out, live_texts, live_positions, info["rows"])
    return _next_info(old, out, info, info["rows"], len(removed), {"removed_rows": len(positions)})


def _next_info(old: Path, out: Path, info: dict, rows: int, removed: int, step: dict) -> dict:
    """info.json of the new version: `lineage` names the build's first store, `updates` its history."""
    new = {**info, "lineage": info.get("lineage", old.name), "rows": rows, "removed_rows": removed, "generation": info.get("generation", 0) + 1,
           "updates": [*info.get("updates", []), step], "code_version": store.code_version(),
           "checksum": store.checksum(out)}
    store.write_info(out, new)
    return new
