"""Build the stores of one index: gradient features per checkpoint, sentence embeddings, BM25.

Row i of every store is chunk i. A build runs in shards (ranges of chunks, see `indexer.plan`):
each computes raw projected gradients, K-FAC factor sums and sentence embeddings of its rows;
`merge_shards` then reduces the statistics, fits EK-FAC once, and writes unit-norm features per
checkpoint weighted by √(lr_c / Σ lr). The concatenation has unit norm, and an inner product is
TracIn's learning-rate-weighted sum of per-checkpoint influence cosines.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from db.errors import InputError
from indexer import curvature, lexical, semantic, store
from indexer.ann import build_faiss, choose_factory
from indexer.corpus import Chunk
from indexer.curvature import Stats
from indexer.gradients import collate, featurizer_for
from indexer.config import BuildConfig
from indexer.modelio import CheckpointInfo

Progress = Callable[[str, int, int], None]  # (stage, rows done now, stage total)


def checkpoint_weights(ckpts: list[CheckpointInfo], mode: str) -> list[float]:
    lrs = [c.learning_rate for c in ckpts]
    if mode == "uniform" or any(lr is None for lr in lrs) or sum(lrs) <= 0:
        return [1 / math.sqrt(len(ckpts))] * len(ckpts)
    total = sum(lrs)
    return [math.sqrt(lr / total) for lr in lrs]


def compute_shard(folder: Path, chunks: list[Chunk], texts: list[str], ckpts: list[CheckpointInfo],
                  config: BuildConfig, progress: Progress) -> dict:
    """Raw projected gradients, K-FAC factor sums and sentence embeddings of one shard's chunks.

    Writes `raw-c{c}.npy` (n × D_c, float32), `stats-c{c}.npz`, `dense.npy` (n × 384, float32) and
    `meta.json` into `folder`, rows in list order. Batches are formed inside the shard only
    (sorted by length, for less padding), so a row's floats depend on the shard it belongs to and
    never on which process computed it; `merge_shards` reduces the statistics instead of
    recomputing them.
    """
    timings, t = {}, time.perf_counter()
    meta = {"rows": len(chunks), **shard_gradients(folder, chunks, ckpts, config, progress)}
    timings["gradients"] = time.perf_counter() - t
    t = time.perf_counter()
    dense = np.lib.format.open_memmap(folder / "dense.npy", mode="w+", dtype=np.float32,
                                      shape=(len(texts), semantic.DIM))
    dense[:] = semantic.embed(texts, progress=lambda n: progress("embeddings", n, len(texts)))
    dense.flush()
    timings["embeddings"] = time.perf_counter() - t
    meta["timings_s"] = timings
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def shard_gradients(folder: Path, chunks: list[Chunk], ckpts: list[CheckpointInfo], config: BuildConfig,
                    progress: Progress) -> dict:
    """`raw-c{c}.npy` and `stats-c{c}.npz` of one shard: the forward+backward passes of a build."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids))
    meta = {"dims": [], "adam_normalised_layers": [], "layers": []}
    for c, ckpt in enumerate(ckpts):
        model, tokenizer, feat = featurizer_for(ckpt, config.gradient)
        feat.stats = Stats()
        raw = np.lib.format.open_memmap(folder / f"raw-c{c}.npy", mode="w+", dtype=np.float32,
                                        shape=(len(chunks), feat.dim))
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            batch = collate([chunks[i].token_ids for i in rows], tokenizer.pad_token_id,
                            label_spans=[chunks[i].labels for i in rows])
            raw[rows] = feat.features(*batch).numpy()
            progress("gradients", len(rows), len(chunks) * len(ckpts))
        raw.flush()
        feat.stats.save(folder / f"stats-c{c}.npz")
        meta["dims"].append(feat.dim)
        meta["adam_normalised_layers"].append(len(feat.normalised))
        meta["layers"].append([layer.name for layer in feat.layers])
        del model, feat, raw
    return meta


def raw_blocks(shards: list[Path], c: int):
    for shard in shards:
        raw = np.load(shard / f"raw-c{c}.npy", mmap_mode="r")
        for start in range(0, len(raw), store.BLOCK):
            yield np.array(raw[start:start + store.BLOCK])
            store.release(raw)


def copy_shard_rows(out: np.ndarray, shards: list[Path], name: str, row: int) -> None:
    """Each shard's `name` array into `out` from `row` on, as float16, block by block (pages released)."""
    for shard in shards:
        part = np.load(shard / name, mmap_mode="r")
        for start in range(0, len(part), store.BLOCK):
            block = part[start:start + store.BLOCK]
            out[row + start:row + start + len(block)] = block.astype(np.float16)
            store.release(out)
        row += len(part)
    out.flush()


def feature_block(raw: np.ndarray, curv: curvature.Curvature | None, weight: float) -> np.ndarray:
    """Stored features of raw projected gradients (n, D_c): preconditioned, unit norm, × weight."""
    f = curv.apply(raw) if curv else np.array(raw, dtype=np.float32)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-30)
    return (f * weight).astype(np.float16)


def shard_stats(shards: list[Path], c: int) -> Stats:
    stats = Stats()
    for shard in shards:
        stats.add(Stats.load(shard / f"stats-c{c}.npz"))
    return stats


def finalize_gradients(folder: Path, shards: list[Path], ckpts: list[CheckpointInfo], config: BuildConfig,
                       progress: Progress) -> dict:
    """Merge shards into `grad.npy`: EK-FAC fitted on the reduced statistics, unit norm, √lr weights.

    Also writes `curvature-c{c}.npz`, which traces apply to query gradients, and `kfac-c{c}.npz`,
    the reduced sums `indexer.update` refits from when rows are added.
    """
    metas = [json.loads((s / "meta.json").read_text()) for s in shards]
    dims, rows = metas[0]["dims"], sum(m["rows"] for m in metas)
    weights = checkpoint_weights(ckpts, config.checkpoint_weights)
    out = store.create_array(folder, "grad", rows, sum(dims))
    col = 0
    for c, dim in enumerate(dims):
        curv = moments = None
        if config.gradient.curvature == "ekfac":
            stats = shard_stats(shards, c)
            curv = curvature.fit(stats, raw_blocks(shards, c), config.gradient.damping)
            curv.save(folder / f"curvature-c{c}.npz")
            moments = curvature.Moments.zeros(curv.shapes())
        row = 0
        for block in raw_blocks(shards, c):
            out[row:row + len(block), col:col + dim] = feature_block(block, curv, weights[c])
            store.release(out)
            if moments is not None:
                moments.add_block(block)
            row += len(block)
        if curv:
            curvature.save_state(folder / f"kfac-c{c}.npz", stats, moments)
        col += dim
        progress("curvature", 1, len(dims))
    out.flush()
    return {"dims": dims, "weights": weights, "curvature": config.gradient.curvature,
            "adam_normalised_layers": metas[0]["adam_normalised_layers"],
            "layers": metas[0].get("layers", [[]])[-1]}  # tracked module names (of the last checkpoint)


def merge_shards(out: Path, shards: list[Path], texts: list[str], ckpts: list[CheckpointInfo],
                 config: BuildConfig, provenance: dict, progress: Progress) -> dict:
    """Every store of a build, from its shards, into `out`: grad, dense, BM25, FAISS and info.json.

    `shards` in row order; `texts` are all rows' texts (BM25 is fitted over the whole corpus).
    Returns the info written, including the store checksum.
    """
    t = time.perf_counter()
    grad = finalize_gradients(out, shards, ckpts, config, progress)
    dense = store.create_array(out, "dense", len(texts), semantic.DIM)
    copy_shard_rows(dense, shards, "dense.npy", 0)
    lexical.build(texts, out / "bm25")
    grad_rows, dense_rows = store.open_array(out, "grad"), store.open_array(out, "dense")
    factory = config.factory or choose_factory(*grad_rows.shape)
    dense_factory = choose_factory(*dense_rows.shape)  # MiniLM's 384 dims: an override is for gradients
    try:
        build_faiss(grad_rows, out / "grad.faiss", factory)
    except RuntimeError as e:  # only an override gets here: the automatic choice fits any width
        raise InputError(f"FAISS factory {factory!r} does not fit {grad_rows.shape[1]}-dim gradient features "
                         f"({str(e).splitlines()[-1][:120]}): pick another --faiss-factory, or leave it out") from None
    build_faiss(dense_rows, out / "dense.faiss", dense_factory)
    progress("faiss", len(texts), len(texts))
    metas = [json.loads((s / "meta.json").read_text()) for s in shards]
    timings = {k: sum(m["timings_s"][k] for m in metas) for k in ("gradients", "embeddings")}
    timings["merge"] = time.perf_counter() - t
    info = {
        **provenance, "config": asdict(config), "rows": len(texts), "faiss_factory": factory,
        "dense_faiss_factory": dense_factory, "faiss_nprobe": config.nprobe,
        "gradient": grad, "embedder": semantic.NAME, "code_version": store.code_version(),
        "projection_seed": config.gradient.seed, "timings_s": timings, "shards": len(shards),
        "checksum": store.checksum(out),
    }
    store.write_info(out, info)
    return info
