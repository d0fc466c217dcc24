"""What a build computes (`BuildConfig`, `GradientConfig`), each field with its one line of help in
`metadata={"help": ...}` and its checks in `__post_init__`.

Free of torch and FAISS, so the command line builds its options from these fields at once.
"""

from __future__ import annotations

import re
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


def check_factory(factory: str) -> None:
    """InputError unless FAISS can parse `factory` (made at a placeholder width of 384: whether it fits
    the gradient features' width is known only when the merge builds it)."""
    import faiss  # only when a factory is given: the CLI imports this module
    try:
        faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise InputError(f"FAISS cannot make {factory!r}: pass --faiss-factory a factory string such as 'Flat', "
                         "'IVF4096,SQ8' or 'PCA512,IVF4096,SQ8', or leave it out") from None


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
