"""What a build computes (`BuildConfig`, `GradientConfig`), each field with its one line of help in
`metadata={"help": ...}` and its checks in `__post_init__`.

Free of torch and FAISS, so the command line builds its options from these fields at once.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass

from db.errors import InputError
from indexer.corpus import CHUNKINGS

# a row holds k_in × k_out features per layer: at 1024 per side that is 2 MB per layer in float16,
# and a side wider than the layer's own width adds storage and no information
MAX_PROJECTION = 1024
NPROBE = 32  # inverted lists a search visits; recorded per build, set again whenever an index is loaded


def config_help(cls, name: str) -> str:
    """The one-line help of field `name` of the config dataclass `cls` (or of an instance)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{getattr(cls, '__name__', cls)} has no field {name!r}")


def is_binary(factory: str) -> bool:
    """Whether the factory makes binary codes compared by Hamming distance (FAISS's LSH)."""
    return "LSH" in factory.split(",")[-1]


def faiss_metric(factory: str):
    """The metric an index of `factory` is made under: inner product, except binary codes, which FAISS
    makes under L2 only (their distance is Hamming's whatever the metric)."""
    import faiss
    return faiss.METRIC_L2 if is_binary(factory) else faiss.METRIC_INNER_PRODUCT


def check_factory(factory: str) -> None:
    """InputError unless FAISS can parse `factory` (made at a placeholder width of 384: whether it fits
    the gradient features' width is known only when the merge builds it)."""
    import faiss  # only when a factory is given: the CLI imports this module
    try:
        faiss.index_factory(384, factory, faiss_metric(factory))
    except RuntimeError:
        raise InputError(f"FAISS cannot make {factory!r}: pass --faiss-factory a factory string such as 'Flat', "
                         "'SQ8', 'LSHr' or 'IVF4096,SQ8', or leave it out") from None


@dataclass
class GradientConfig:
    """How gradients become features. Defaults keep a 4-layer GPT-2 at 1,024 dims per checkpoint."""

    k_in: int | None = field(default=8, metadata={
        "help": "input-side projection size per layer; None = no projection (exact)"})
    k_out: int | None = field(default=8, metadata={
        "help": "output-side projection size per layer; None = no projection (exact)"})
    seed: int = field(default=0, metadata={
        "help": "projection seed; recorded in info.json so queries use the same matrices"})
    # for a LoRA adapter the default is its lora_A/lora_B layers only (indexer.adapter.default_pattern)
    modules: str | None = field(default=None, metadata={
        "help": "regex over module names to track (re.search); None = every nn.Linear/Conv1D but the output head"})
    optimizer_norm: bool = field(default=True, metadata={
        "help": "divide by √(Adam second moment) when optimizer.pt is present"})
    eps: float = field(default=1e-8, metadata={"help": "added to second moments before the square root"})
    curvature: str = field(default="ekfac", metadata={
        "help": "'ekfac': precondition by EK-FAC fitted in the projected space; 'none': no preconditioning"})
    damping: float = field(default=0.1, metadata={
        "help": "EK-FAC damping, relative to each layer's mean corrected eigenvalue"})

    def __post_init__(self):
        if self.curvature not in ("ekfac", "none"):
            raise InputError(f"curvature must be 'ekfac' or 'none', not {self.curvature!r}")
        if self.damping < 0:
            raise InputError(f"damping must be non-negative, not {self.damping}: give 0 or more")
        for k in (self.k_in, self.k_out):
            if k is not None and not 1 <= k <= MAX_PROJECTION:
                raise InputError(f"a projection side is 1 to {MAX_PROJECTION} (a row holds k×k features per layer), "
                                 f"or None for exact gradients: pass --proj from 1 to {MAX_PROJECTION}, not {k}")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as e:
                raise InputError(f"--modules {self.modules!r} is not a regular expression ({e}): "
                                 "pass a regex over module names such as 'attn|mlp'") from None


@dataclass
class BuildConfig:
    """What a build computes. Stored in info.json and in the build's SQL row."""

    gradient: GradientConfig = field(default_factory=GradientConfig, metadata={
        "help": "how gradients become features (indexer.gradients.GradientConfig)"})
    batch_size: int = field(default=16, metadata={"help": "chunks per forward/backward pass"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "chunk length in tokens; None = the model's context length"})
    checkpoint_weights: str = field(default="lr", metadata={
        "help": "'lr' (TracIn: √lr per checkpoint) or 'uniform'"})
    append_eos: bool = field(default=True, metadata={
        "help": "end each document with eos, as one-document-per-example training does"})
    # see `indexer.corpus`: sliding windows start every `stride` tokens; packed documents are
    # concatenated into full blocks, one row per block and document segment. Overlapping and packed
    # rows count shared tokens once per row in the K-FAC factors.
    chunking: str = field(default="sliding", metadata={
        "help": "how documents became training examples: 'sliding' windows, 'truncate' (first window only) "
                "or 'packed' (documents concatenated into full blocks)"})
    stride: int | None = field(default=None, metadata={
        "help": "tokens between sliding windows' starts; None = the window width, no overlap"})
    factory: str | None = field(default=None, metadata={
        "help": "the gradient index's FAISS factory; None = chosen from rows and width"})
    nprobe: int = field(default=NPROBE, metadata={
        "help": "inverted lists searched per query when the factory has an IVF"})
    # the unit of work of a build job and of length-sorting into batches: results depend on it and
    # never on how many workers share the shards
    shard_size: int = field(default=4096, metadata={"help": "chunks per shard (a range of documents)"})

    def __post_init__(self):
        if isinstance(self.gradient, dict):
            self.gradient = GradientConfig(**self.gradient)
        if self.checkpoint_weights not in ("lr", "uniform"):
            raise InputError(f"checkpoint_weights must be 'lr' or 'uniform', not {self.checkpoint_weights!r}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1: pass --batch-size 1 or more, not {self.batch_size}")
        if self.nprobe < 1:
            raise InputError(f"nprobe must be at least 1: pass --nprobe 1 or more, not {self.nprobe}")
        if self.factory is not None:
            check_factory(self.factory)
        if self.shard_size < 1:
            raise InputError(f"shard_size must be at least 1: pass --shard-size 1 or more, not {self.shard_size}")
        if self.chunking not in CHUNKINGS:
            raise InputError(f"chunking must be one of {', '.join(CHUNKINGS)}: pass --chunking with one of them")
        if self.stride is not None and (self.chunking != "sliding" or self.stride < 1):
            raise InputError("stride is a positive number of tokens, for --chunking sliding only: "
                             "pass --stride 1 or more with --chunking sliding, or leave --stride out")


DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("bfloat16", "float16", "float32")
MAX_TOKENS_PER_BATCH = 1 << 24  # 16M tokens: far above any batch that fits one device


@dataclass
class Runtime:
    """Where and how the model runs: never part of a store's identity (`BuildConfig`), so a build
    made on a GPU and one made on the CPU are the same build; recorded beside the config in
    info.json. Set by `--device`/`--dtype`/… or by the environment (`from_env`), which is how a
    worker's own device reaches the shards it computes."""

    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when available) | cpu | cuda | cuda:N"})
    dtype: str | None = field(default=None, metadata={
        "help": "bfloat16 | float16 | float32; None = the checkpoint's own dtype"})
    max_tokens_per_batch: int | None = field(default=None, metadata={
        "help": "cap on rows × padded length per batch (batches shrink for long chunks); None = --batch-size rows"})
    checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward (less memory, about a third more compute)"})
    memory_limit: int | None = field(default=None, metadata={
        "help": "host bytes a build may use; None = MemAvailable from /proc/meminfo"})

    def __post_init__(self):
        if not DEVICES.fullmatch(self.device):
            raise InputError(f"unknown device {self.device!r}: pass --device auto, cpu, cuda or cuda:N")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}: pass --dtype bfloat16, float16 or float32")
        limit = self.max_tokens_per_batch
        if limit is not None and not 1 <= limit <= MAX_TOKENS_PER_BATCH:
            raise InputError(f"--max-tokens-per-batch is 1 to {MAX_TOKENS_PER_BATCH}, not {limit}")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise InputError(f"WHEREFROM_MEMORY_LIMIT must be a positive size such as 8G, not {self.memory_limit}")

    @classmethod
    def from_env(cls, env=None, **overrides) -> Runtime:
        """WHEREFROM_DEVICE, WHEREFROM_DTYPE, WHEREFROM_MAX_TOKENS_PER_BATCH, WHEREFROM_CHECKPOINTING
        and WHEREFROM_MEMORY_LIMIT (bytes, or with K/M/G), under `overrides` that are not None."""
        import os
        env = os.environ if env is None else env
        values = {"device": env.get("WHEREFROM_DEVICE") or "auto", "dtype": env.get("WHEREFROM_DTYPE") or None,
                  "checkpointing": env.get("WHEREFROM_CHECKPOINTING", "") in ("1", "true", "yes")}
        if env.get("WHEREFROM_MAX_TOKENS_PER_BATCH"):
            values["max_tokens_per_batch"] = _size(env["WHEREFROM_MAX_TOKENS_PER_BATCH"], "WHEREFROM_MAX_TOKENS_PER_BATCH")
        if env.get("WHEREFROM_MEMORY_LIMIT"):
            values["memory_limit"] = _size(env["WHEREFROM_MEMORY_LIMIT"], "WHEREFROM_MEMORY_LIMIT")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def environ(self) -> dict[str, str]:
        """The environment that `from_env` reads back as this runtime (for worker processes)."""
        out = {"WHEREFROM_DEVICE": self.device, "WHEREFROM_CHECKPOINTING": "1" if self.checkpointing else ""}
        for key, value in (("WHEREFROM_DTYPE", self.dtype), ("WHEREFROM_MAX_TOKENS_PER_BATCH", self.max_tokens_per_batch),
                           ("WHEREFROM_MEMORY_LIMIT", self.memory_limit)):
            out[key] = "" if value is None else str(value)
        return out


def _size(text: str, name: str) -> int:
    """An integer with an optional K, M or G (powers of 1024) suffix."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise InputError(f"{name} must be a whole number, optionally with K, M or G (such as 8G), not {text!r}")
    return int(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " ")


@contextmanager
def applied(runtime: Runtime):
    """`runtime` as this process's environment for the block (what `Runtime.from_env` reads in the
    shards and tracers it runs), restored afterwards so one command's options do not outlive it."""
    import os
    saved = {k: os.environ.get(k) for k in runtime.environ()}
    os.environ.update(runtime.environ())
    try:
        yield runtime
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
