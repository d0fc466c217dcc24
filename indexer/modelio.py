"""Reading what a Hugging Face Trainer run leaves behind: checkpoints, learning rates, Adam moments.

A model folder is either one model (config.json + weights) or a Trainer output folder holding
`checkpoint-N/` sub-folders. Either may be a PEFT LoRA adapter instead (adapter_config.json +
adapter weights) on a base model in another local folder. Checksums let a build refuse a model
whose weights changed since; an adapter's checksum covers its base model's weights too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from db.errors import InputError

if TYPE_CHECKING:  # torch is imported where a checkpoint is read, not at import
    import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model")


@dataclass
class CheckpointInfo:
    """One checkpoint as found on disk."""

    path: Path
    step: int
    weights_sha256: str
    tokenizer_hash: str
    learning_rate: float | None  # from trainer_state.json; None when the folder has none
    optimizer_state_path: Path | None
    base_path: Path | None = None  # a LoRA adapter's local base model folder; None for a whole model

    @classmethod
    def from_row(cls, row) -> CheckpointInfo:
        """The checkpoint a `db.models.Checkpoint` row records."""
        return cls(Path(row.path), row.step, row.weights_sha256, row.tokenizer_hash, row.learning_rate,
                   Path(row.optimizer_state_path) if row.optimizer_state_path else None,
                   Path(row.base_path) if row.base_path else None)


def select_checkpoints(ckpts: list, which: str) -> list:
    """'all', 'last', or a comma list of steps; InputError naming the known steps when one is missing."""
    if which == "all":
        return ckpts
    if which == "last":
        return ckpts[-1:]
    wanted = {int(x) for x in which.split(",")}
    chosen = [c for c in ckpts if c.step in wanted]
    if len(chosen) != len(wanted):
        raise InputError(f"checkpoints {sorted(wanted)} not all found; known steps: {[c.step for c in ckpts]}")
    return chosen


def context_length(folder: Path) -> int:
    """The model's context length from its config.json (2048 when the config names none)."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()


def adapter_base(folder: Path, base: Path | str | None = None) -> Path | None:
    """The local base model folder of a LoRA adapter (None when `folder` is a whole model).

    `base` overrides adapter_config.json's `base_model_name_or_path`, which often names a hub id.
    """
    folder = Path(folder)
    if not is_adapter(folder):
        return None
    named = base or json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    path = Path(named).expanduser()
    if not ((path / "config.json").exists() and own_weights_files(path)):
        if base:
            raise InputError(f"--base {base} holds no model (config.json and weights): give the folder the "
                             "LoRA adapter's base model was saved to with save_pretrained")
        raise InputError(f"the LoRA adapter at {folder} needs its base model, and {str(named)!r} is not a local "
                         "model folder: pass --base PATH to the base model saved with save_pretrained")
    return path.resolve()


def own_weights_files(folder: Path) -> list[Path]:
    """The weight files in `folder` itself (an adapter's, not its base model's)."""
    files = [folder / n for n in WEIGHT_FILES if (folder / n).exists()]
    return files or sorted(folder.glob("model-*.safetensors"))


def weights_files(folder: Path, base: Path | None = None) -> list[Path]:
    """Every file a model's weights come from: its own, and for an adapter its base model's."""
    folder = Path(folder)
    files = own_weights_files(folder)
    base = adapter_base(folder, base) if files else None
    return files + (own_weights_files(base) if base else [])


def weights_digest(folder: Path, base: Path | None = None) -> str:
    """sha256 of a model's weights; an adapter's digest covers its base model's weights as well."""
    folder = Path(folder)
    own = _cached_digest(*_stamp(own_weights_files(folder)))
    base = adapter_base(folder, base)
    if base is None:
        return own
    return hashlib.sha256(f"{own}:{_cached_digest(*_stamp(own_weights_files(base)))}".encode()).hexdigest()


def file_stamp(path: Path) -> list[int]:
    """[size, mtime, ctime, inode] of a file. All four must match to trust an earlier hash: `touch -r`
    puts an old mtime back, but nobody can set ctime, and a file replaced by a rename is a new inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp(paths: list[Path]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    return tuple(map(str, paths)), tuple(tuple(file_stamp(p)) for p in paths)


@lru_cache(maxsize=8)
def _cached_digest(paths: tuple[str, ...], stamps: tuple) -> str:
    """Weights' digest, once per process per (files, stamps): every checkpoint of an adapter run
    shares the base, and re-reading a 14 GB base per checkpoint (or per trace in a worker) would
    dominate registration and tracing."""
    return sha256_files([Path(p) for p in paths])


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_folder(folder: Path, base: Path | None = None) -> Path:
    """Where a model's tokenizer lies: its own folder, or an adapter's base model folder."""
    folder = Path(folder)
    if any((folder / n).exists() for n in TOKENIZER_FILES):
        return folder
    return adapter_base(folder, base) or folder


def tokenizer_hash(folder: Path, base: Path | None = None) -> str:
    folder = tokenizer_folder(folder, base)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not files:
        raise InputError(f"{folder} has no tokenizer files: save the tokenizer with the model "
                         "(tokenizer.save_pretrained) and try again")
    return sha256_files(files)[:16]


def _learning_rate(folder: Path, step: int, after: int | None = None) -> float | None:
    """The mean learning rate logged over the steps this checkpoint closes, (`after`, `step`]; else
    the one logged closest to (and not after) `step`.

    TracInCP sums η·g·g' over every training step; a checkpoint stands for the steps since the one
    before it, so its weight is their mean rate. The rate logged at the step alone is 0 at the end of
    a cosine or linear schedule, which would silence the last checkpoint's quarter of the store.
    """
    state = folder / "trainer_state.json"
    if not state.exists():
        return None
    history = json.loads(state.read_text()).get("log_history", [])
    logged = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    window = [lr for s, lr in logged if after < s <= step] if after is not None else []
    if window:
        return float(sum(window) / len(window))
    before = [lr for s, lr in logged if s <= step] or [lr for _, lr in logged]
    return float(before[-1]) if before else None


def train_batch_size(folder: Path) -> int | None:
    """Examples per optimizer step per device, from trainer_state.json; None when unknown."""
    state = Path(folder) / "trainer_state.json"
    if not state.exists():
        return None
    return json.loads(state.read_text()).get("train_batch_size")


def read_checkpoint(folder: Path, step: int = 0, base: Path | None = None, after: int | None = None) -> CheckpointInfo:
    """One model or adapter folder; `base` overrides an adapter's recorded base model path; `after`:
    the step of the checkpoint before this one (its learning rate is the mean since then)."""
    described = (folder / "config.json").exists() or is_adapter(folder)
    if not described or not own_weights_files(folder):
        raise InputError(f"{folder} holds no model weights (config.json and model.safetensors, or a LoRA "
                         "adapter's adapter_config.json and adapter_model.safetensors): point to a folder "
                         "written by save_pretrained or a Trainer output folder")
    if base is not None and not is_adapter(folder):
        raise InputError(f"--base is for LoRA adapters, and {folder} has no adapter_config.json: leave --base out")
    base = adapter_base(folder, base)
    check_weights_load(weights_files(folder, base))
    opt = folder / "optimizer.pt"
    return CheckpointInfo(
        path=folder.resolve(), step=step, weights_sha256=weights_digest(folder, base),
        tokenizer_hash=tokenizer_hash(folder, base), learning_rate=_learning_rate(folder, step, after),
        optimizer_state_path=opt.resolve() if opt.exists() else None, base_path=base,
    )


def check_weights_load(files: list[Path]) -> None:
    """Refuse a safetensors file whose header does not parse or does not fit the file (corrupt or
    truncated): the model would fail to load at the first trace. Reads the header alone."""
    from safetensors import safe_open

    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(f, framework="np") as weights:
                weights.keys()
        except Exception as e:  # safetensors raises its own SafetensorError, an Exception
            from indexer.store import describe
            raise InputError(f"the weights in {f} do not load ({describe(e)}): restore the file, or save the "
                             "model again with save_pretrained") from None


def discover_checkpoints(path: Path, base: Path | None = None) -> list[CheckpointInfo]:
    """All checkpoints under a Trainer output folder (sorted by step), or the one model at `path`.

    `base`: the local base model folder of LoRA adapters whose adapter_config.json names another.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist: give the folder written by "
                         "save_pretrained or by a Trainer run")
    steps = sorted((int(m.group(1)), sub) for sub in path.iterdir()
                   if (m := re.fullmatch(r"checkpoint-(\d+)", sub.name)) and sub.is_dir())
    if steps:  # the first checkpoint closes the steps from the start of training
        return [read_checkpoint(sub, step, base, steps[i - 1][0] if i else 0) for i, (step, sub) in enumerate(steps)]
    return [read_checkpoint(path, 0, base)]


def adam_second_moments(model, optimizer_path: Path) -> dict[str, "torch.Tensor"]:
    """Map parameter names to Adam's bias-corrected `exp_avg_sq` (`bias_corrected`), following the
    Trainer's parameter grouping.

    `optimizer.pt` keys state by position: the Trainer puts parameters with weight decay first,
    then those without (biases, norms), each in `named_parameters()` order. Entries whose shape
    does not match their parameter are dropped, so a foreign optimizer layout degrades to
    "no normalisation" for that tensor rather than to a wrong one.
    """
    import torch
    from transformers import Trainer

    state = torch.load(optimizer_path, map_location="cpu", weights_only=True)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ordered = [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]
    shapes = dict(named)
    group_of = {i: g for g in state["param_groups"] for i in g["params"]}  # in the optimizer's order
    out = {}
    for name, idx in zip(ordered, group_of):
        v = bias_corrected(state["state"].get(idx, {}), group_of[idx])
        if v is not None and v.shape == shapes[name].shape:
            out[name] = v
    return out


def bias_corrected(entry: dict, group: dict):
    """Adam's v̂ = v / (1 − β2^step) in float32 from one parameter's optimizer state `entry` and its
    param `group`, or None before its first step: what Adam's update divides by. Raw, v is
    (1 − β2^t) v̂, which folded into the projections would weigh a row of step t by 1/√(1 − β2^t):
    31× at step 1, 1.26× at step 1,000. A checkpoint thousands of steps in barely moves; the
    callback, which sums rows of every step, does."""
    v = entry.get("exp_avg_sq")
    return None if v is None else v.float() / bias_correction(entry, group)


def bias_correction(entry: dict, group: dict) -> float:
    """Adam's 1 − β2^step for one parameter's optimizer state (1 before its first step)."""
    step, beta2 = float(entry.get("step", 0)), group.get("betas", (0.9, 0.999))[1]
    return 1.0 - beta2 ** step if step > 0 else 1.0


def check_unchanged(recorded: list[dict]) -> None:
    """Refuse when a checkpoint's weights differ from those a build was made from.

    `recorded` holds {"path", "weights_sha256", "stamp"} per checkpoint (`weights_stat`), and
    "base_path" for an adapter. Files whose every stamp matches are not hashed again, so a trace
    does not read every weight file; any other difference (a copied model, an older build without
    stamps) hashes them.
    """
    from db.errors import StaleBuild

    for rec in recorded:
        base = Path(rec["base_path"]) if rec.get("base_path") else None
        try:
            files = weights_files(Path(rec["path"]), base)
        except InputError:
            files = []
        if not files:
            raise StaleBuild(f"checkpoint {rec['path']} has no weights any more (or its base model moved): "
                             "restore it, or rebuild with `wherefrom index`")
        if [file_stamp(f) for f in files] == rec.get("stamp"):
            continue
        if weights_digest(Path(rec["path"]), base) != rec["weights_sha256"]:
            raise StaleBuild(f"model weights at {rec['path']} changed since this build: register the new "
                             "weights (`wherefrom model add`) and rebuild with `wherefrom index`")


def weights_stat(path: Path, base: Path | None = None) -> dict:
    """What a build records of a checkpoint's weight files to skip hashing them again (`check_unchanged`)."""
    return {"stamp": [file_stamp(f) for f in weights_files(Path(path), base)]}


def check_tokenizer_unchanged(ckpts: list[CheckpointInfo]) -> None:
    """Refuse when a checkpoint's tokenizer files differ from those hashed at registration: token ids
    read with another tokenizer are other words, and the answer would be garbled silently."""
    from db.errors import StaleBuild

    for c in ckpts:
        try:
            now = tokenizer_hash(c.path, c.base_path)
        except InputError:  # the files are gone
            now = None
        if now != c.tokenizer_hash:
            raise StaleBuild(f"the tokenizer files of {c.path} changed since the model was registered: restore "
                             "them, or register the model under a new name (`wherefrom model add PATH --name NEW`) "
                             "and rebuild with `wherefrom index`")
