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
from indexer import memory
from indexer.config import BuildConfig, Runtime
from indexer.memory import is_out_of_memory
from indexer.loading import enable_checkpointing, resolve_device
from indexer.modelio import CheckpointInfo

Progress = Callable[[str, int, int], None]  # (stage, rows done now, stage total)


def checkpoint_weights(ckpts: list[CheckpointInfo], mode: str) -> list[float]:
    lrs = [c.learning_rate for c in ckpts]
    if mode == "uniform" or any(lr is None for lr in lrs) or sum(lrs) <= 0:
        return [1 / math.sqrt(len(ckpts))] * len(ckpts)
    total = sum(lrs)
    return [math.sqrt(lr / total) for lr in lrs]


def compute_shard(folder: Path, chunks: list[Chunk], texts: list[str], ckpts: list[CheckpointInfo],
                  config: BuildConfig, progress: Progress, runtime: Runtime | None = None) -> dict:
    """Raw projected gradients, K-FAC factor sums and sentence embeddings of one shard's chunks.

    Writes `raw-c{c}.npy` (n × D_c, float32), `stats-c{c}.npz`, `dense.npy` (n × 384, float32) and
    `meta.json` into `folder`, rows in list order. Batches are formed inside the shard only
    (sorted by length, for less padding), so a row's floats depend on the shard it belongs to and
    the batch rows `meta["runtime"]` records, never on which process computed it; `merge_shards`
    reduces the statistics instead of recomputing them.
    """
    timings, t = {}, time.perf_counter()
    meta = {"rows": len(chunks), **shard_gradients(folder, chunks, ckpts, config, progress, runtime)}
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


def next_batch(order: list[int], lengths: list[int], start: int, rows: int, tokens: int | None) -> list[int]:
    """Positions `order[start:]` that fit one batch: at most `rows`, and rows × the widest length
    at most `tokens` (always one row, however long). `order` is sorted by length, so the last row
    taken is the widest."""
    end = start + 1
    while end < len(order) and end - start < rows and (tokens is None or (end - start + 1) * lengths[order[end]] <= tokens):
        end += 1
    return order[start:end]


def too_large(rows: int, width: int, runtime: Runtime) -> InputError:
    return InputError(f"out of memory on {rows} chunk(s) of {width} tokens even after halving the batch to one "
                      f"chunk on {runtime.device}: pass --dtype bfloat16, --checkpointing, fewer --modules, a "
                      "shorter --max-tokens (chunk length) or a device with more memory")


class BatchRunner:
    """Feature batches with back-off: on out-of-memory, halve the batch, retry, and keep the half."""

    def __init__(self, config: BuildConfig, runtime: Runtime):
        self.rows, self.tokens, self.runtime = config.batch_size, runtime.max_tokens_per_batch, runtime
        self.backoffs = 0

    def run(self, feat, order: list[int], chunks: list[Chunk], tokenizer, out: np.ndarray, progress) -> None:
        lengths = [len(c.token_ids) for c in chunks]
        start = 0
        while start < len(order):
            rows = next_batch(order, lengths, start, self.rows, self.tokens)
            batch = collate([chunks[i].token_ids for i in rows], tokenizer.pad_token_id,
                            label_spans=[chunks[i].labels for i in rows])
            saved = Stats().add(feat.stats)  # a batch cut off mid-backward has added to the sums
            try:
                out[rows] = feat.features(*batch).numpy()
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                feat.stats = saved
                memory.release(feat.device)
                if len(rows) == 1:
                    raise too_large(1, lengths[rows[0]], self.runtime) from None
                self.rows, self.backoffs = len(rows) // 2, self.backoffs + 1
                continue
            progress(len(rows))
            start += len(rows)


def shard_gradients(folder: Path, chunks: list[Chunk], ckpts: list[CheckpointInfo], config: BuildConfig,
                    progress: Progress, runtime: Runtime | None = None) -> dict:
    """`raw-c{c}.npy` and `stats-c{c}.npz` of one shard: the forward+backward passes of a build, on
    `runtime` (default: this process's, `Runtime.from_env`: a command's --device/--dtype/… as
    `applied` sets them, or a worker's own device), so no caller can forget to pass it."""
    runtime = runtime or Runtime.from_env()
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids))
    meta = {"dims": [], "adam_normalised_layers": [], "layers": []}
    runner, device, dtype = BatchRunner(config, runtime), None, None
    memory.reset_peak(resolve_device(runtime.device))
    for c, ckpt in enumerate(ckpts):
        model, tokenizer, feat = featurizer_for(ckpt, config.gradient, runtime)
        if runtime.checkpointing:
            enable_checkpointing(model)
        feat.stats, device, dtype = Stats(), feat.device, feat.dtype
        raw = np.lib.format.open_memmap(folder / f"raw-c{c}.npy", mode="w+", dtype=np.float32,
                                        shape=(len(chunks), feat.dim))
        runner.run(feat, order, chunks, tokenizer, raw,
                   lambda n: progress("gradients", n, len(chunks) * len(ckpts)))
        raw.flush()
        feat.stats.save(folder / f"stats-c{c}.npz")
        meta["dims"].append(feat.dim)
        meta["adam_normalised_layers"].append(len(feat.normalised))
        meta["layers"].append([layer.name for layer in feat.layers])
        del model, feat, raw
    meta["runtime"] = {**asdict(runtime), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                       "batch_rows": runner.rows,
                       "backoffs": runner.backoffs, "peak_rss_bytes": memory.peak_rss(),
                       "peak_device_bytes": memory.peak_device(device)}
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


def merged_runtime(metas: list[dict]) -> dict:
    """How the shards ran: every device and dtype used, the smallest batch a back-off left, the
    back-offs and the highest peaks (shards from builds before runtimes were recorded: {})."""
    runs = [m["runtime"] for m in metas if "runtime" in m]
    if not runs:
        return {}
    peaks = [r["peak_device_bytes"] for r in runs if r["peak_device_bytes"] is not None]
    return {**runs[0], "device": sorted({r["device"] for r in runs}), "dtype": sorted({r["dtype"] for r in runs}),
            "batch_rows": min(r["batch_rows"] for r in runs),
            "backoffs": sum(r["backoffs"] for r in runs), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "peak_device_bytes": max(peaks) if peaks else None}


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
        "runtime": merged_runtime(metas),
        "checksum": store.checksum(out),
    }
    store.write_info(out, info)
    return info
