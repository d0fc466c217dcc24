"""Will a build fit, and how long will it take? One probe batch, measured, before any work.

The probe is the build's own heaviest batch: the most tokens (rows × padded width) that
`indexer.build.next_batch` forms from the chunks' lengths, run through the same featurizer at the
first checkpoint, device, dtype and checkpointing. A build holds one checkpoint's model at a time
and its batches never exceed that one, so the peak it measures (plus the shard's raw-gradient
memmap, whose written pages stay resident) is the build's gradient-pass peak. The second run of
the batch gives tokens/s; the first pays one-time allocations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from db.errors import InputError
from indexer import memory, semantic
from indexer.build import next_batch
from indexer.config import BuildConfig, Runtime
from indexer.corpus import Chunk
from indexer.curvature import Stats
from indexer.gradients import collate, featurizer_for
from indexer.loading import enable_checkpointing, resolve_device
from indexer.modelio import CheckpointInfo, weights_files

# a row's bytes per feature on disk: float16 in the store's array, float32 in a FAISS Flat index
# (the largest factory; an IVF with SQ8 takes 1)
FEATURE_BYTES = 2 + 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Prediction:
    """What the probe measured and what it predicts for the whole build."""

    device: str
    dtype: str
    batch: tuple[int, int]  # (rows, padded width) of the probe, the build's heaviest batch
    peak_host_bytes: int  # resident set size of this process at its highest during the gradient pass
    peak_device_bytes: int | None  # torch's peak allocation on a CUDA device; None on the CPU
    host_budget_bytes: int  # WHEREFROM_MEMORY_LIMIT, else MemAvailable plus what this process holds
    device_budget_bytes: int | None
    tokens_per_s: float
    seconds_per_checkpoint: float
    store_bytes: int  # the published store on disk, at most (FAISS Flat)

    def describe(self) -> str:
        """The plan as `wherefrom index --plan` prints it."""
        rows, width = self.batch
        device = "" if self.peak_device_bytes is None else (
            f"\npeak {self.device} memory {gib(self.peak_device_bytes)} of {gib(self.device_budget_bytes)} free")
        return (f"probe: {rows} × {width} tokens on {self.device} in {self.dtype} (the heaviest batch)\n"
                f"peak host memory {gib(self.peak_host_bytes)} of {gib(self.host_budget_bytes)} usable{device}\n"
                f"{self.tokens_per_s:,.0f} tokens/s: {self.seconds_per_checkpoint:,.0f} s per checkpoint\n"
                f"store on disk: at most {gib(self.store_bytes)}\n" + (self.refusal() or "fits: build with the same options"))

    def refusal(self) -> str | None:
        """The one line that refuses this build, or None when it fits."""
        fixes = ("pass a smaller --max-tokens-per-batch or --batch-size, a smaller --proj, --dtype bfloat16, "
                 "fewer --modules or --checkpointing")
        if self.peak_host_bytes > self.host_budget_bytes:
            return (f"this build needs about {gib(self.peak_host_bytes)} of host memory and may use "
                    f"{gib(self.host_budget_bytes)} (WHEREFROM_MEMORY_LIMIT, else MemAvailable): {fixes}, "
                    "or --device cuda")
        if self.device_budget_bytes is not None and self.peak_device_bytes > self.device_budget_bytes:
            return (f"this build needs about {gib(self.peak_device_bytes)} on {self.device} and "
                    f"{gib(self.device_budget_bytes)} is free: {fixes}, or --device cpu")
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def weights_refusal(ckpt: CheckpointInfo, runtime: Runtime) -> str | None:
    """The refusal of a build whose weights alone exceed the host budget, read from the weight
    files' sizes before anything loads (a model too large for the machine is refused in seconds)."""
    import json
    saved = json.loads((ckpt.path / "config.json").read_text()) if (ckpt.path / "config.json").exists() else {}
    saved_bytes = DTYPE_BYTES.get(saved.get("dtype") or saved.get("torch_dtype") or "float32", 4)
    size = sum(f.stat().st_size for f in weights_files(ckpt.path, ckpt.base_path))
    needed = size * DTYPE_BYTES.get(runtime.dtype, saved_bytes) // saved_bytes
    budget = runtime.memory_limit or memory.available() + memory.rss()
    if needed <= budget:
        return None
    return (f"the model's weights alone take {gib(needed)} and this build may use {gib(budget)} of host memory "
            "(WHEREFROM_MEMORY_LIMIT, else MemAvailable): pass --dtype bfloat16, or --device cuda, or use a "
            "machine with more memory")


def heaviest_batch(lengths: list[int], config: BuildConfig, runtime: Runtime) -> tuple[int, int]:
    """(rows, width) of the batch with the most padded tokens that the build forms from `lengths`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, start = (0, 0), 0
    while start < len(order):
        rows = next_batch(order, lengths, start, config.batch_size, runtime.max_tokens_per_batch)
        shape = (len(rows), lengths[rows[-1]])
        best = max(best, shape, key=lambda s: s[0] * s[1])
        start += len(rows)
    return best


def probe_chunks(chunks: list[Chunk], rows: int, width: int) -> list[Chunk]:
    """`rows` chunks of `width` tokens: the longest chunk of that width, repeated (the probe's
    cost depends on the shape only)."""
    widest = next(c for c in sorted(chunks, key=lambda c: -len(c.token_ids)) if len(c.token_ids) == width)
    return [widest] * rows


def predict(chunks: list[Chunk], ckpts: list[CheckpointInfo], config: BuildConfig, runtime: Runtime,
            total_rows: int, total_tokens: int) -> Prediction:
    """Run the probe on `chunks` (all of a build's rows, or a sample holding its longest ones)
    and predict the build of `total_rows` rows and `total_tokens` tokens per checkpoint."""
    refusal = weights_refusal(ckpts[0], runtime) if resolve_device(runtime.device).type == "cpu" else None
    if refusal:
        raise InputError(refusal)
    rows, width = heaviest_batch([len(c.token_ids) for c in chunks], config, runtime)
    host_budget = runtime.memory_limit or memory.available() + memory.rss()
    device = resolve_device(runtime.device)
    free = memory.free_device(device)  # before our model: the weights count in the peak
    memory.reset_peak(device)
    model, tokenizer, feat = featurizer_for(ckpts[0], config.gradient, runtime)
    if runtime.checkpointing:
        enable_checkpointing(model)
    sample = probe_chunks(chunks, rows, width)
    batch = collate([c.token_ids for c in sample], tokenizer.pad_token_id, label_spans=[c.labels for c in sample])
    feat.stats = Stats()
    seconds = []
    try:
        for _ in range(2):
            t = time.perf_counter()
            feat.features(*batch)
            seconds.append(time.perf_counter() - t)
    except (RuntimeError, MemoryError) as e:
        if not memory.is_out_of_memory(e):
            raise
        raise InputError(f"one batch of {rows} × {width} tokens does not fit on {device}: pass a smaller "
                         "--max-tokens-per-batch or --batch-size, --dtype bfloat16, --checkpointing, or another "
                         "--device") from None
    raw_bytes = min(total_rows, config.shard_size) * feat.dim * 4  # the shard's float32 raw-gradient memmap, written in full
    allocated = memory.peak_device(device)
    tokens_per_s = int(batch[1].sum()) / max(seconds[-1], 1e-9)
    return Prediction(
        device=str(device), dtype=str(feat.dtype).removeprefix("torch."), batch=(rows, width),
        peak_host_bytes=memory.peak_rss() + raw_bytes, peak_device_bytes=allocated,
        host_budget_bytes=host_budget, device_budget_bytes=free,
        tokens_per_s=tokens_per_s, seconds_per_checkpoint=total_tokens / tokens_per_s,
        store_bytes=total_rows * (len(ckpts) * feat.dim + semantic.DIM) * FEATURE_BYTES)
