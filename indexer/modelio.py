"""Reading what a Hugging Face Trainer run leaves behind: checkpoints, learning rates, Adam moments.

A model folder is either one model (config.json + weights) or a Trainer output folder holding
`checkpoint-N/` sub-folders. Checksums let a build refuse a model whose weights changed since.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from db.errors import InputError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")
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


def weights_files(folder: Path) -> list[Path]:
    files = [folder / n for n in WEIGHT_FILES if (folder / n).exists()]
    return files or sorted(folder.glob("model-*.safetensors"))


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_hash(folder: Path) -> str:
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not files:
        raise InputError(f"{folder} has no tokenizer files: save the tokenizer with the model "
                         "(tokenizer.save_pretrained) and try again")
    return sha256_files(files)[:16]


def _learning_rate(folder: Path, step: int) -> float | None:
    """The learning rate logged closest to (and not after) this checkpoint's step."""
    state = folder / "trainer_state.json"
    if not state.exists():
        return None
    history = json.loads(state.read_text()).get("log_history", [])
    logged = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    before = [lr for s, lr in logged if s <= step] or [lr for _, lr in logged]
    return float(before[-1]) if before else None


def train_batch_size(folder: Path) -> int | None:
    """Examples per optimizer step per device, from trainer_state.json; None when unknown."""
    state = Path(folder) / "trainer_state.json"
    if not state.exists():
        return None
    return json.loads(state.read_text()).get("train_batch_size")


def read_checkpoint(folder: Path, step: int = 0) -> CheckpointInfo:
    weights = weights_files(folder)
    if not (folder / "config.json").exists() or not weights:
        raise InputError(f"{folder} holds no model weights (config.json and model.safetensors): "
                         "point to a folder written by save_pretrained or a Trainer output folder")
    opt = folder / "optimizer.pt"
    return CheckpointInfo(
        path=folder.resolve(), step=step, weights_sha256=sha256_files(weights),
        tokenizer_hash=tokenizer_hash(folder), learning_rate=_learning_rate(folder, step),
        optimizer_state_path=opt.resolve() if opt.exists() else None,
    )


def discover_checkpoints(path: Path) -> list[CheckpointInfo]:
    """All checkpoints under a Trainer output folder (sorted by step), or the one model at `path`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist: give the folder written by "
                         "save_pretrained or by a Trainer run")
    found = []
    for sub in path.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", sub.name)
        if m and sub.is_dir():
            found.append(read_checkpoint(sub, int(m.group(1))))
    if found:
        return sorted(found, key=lambda c: c.step)
    return [read_checkpoint(path, 0)]


def load_model(folder: Path):
    """Load a causal LM and its tokenizer from a local folder, offline, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_tokenizer(folder: Path):
    """The tokenizer alone (chunking a corpus needs no weights)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def adam_second_moments(model, optimizer_path: Path) -> dict[str, "torch.Tensor"]:
    """Map parameter names to Adam's `exp_avg_sq`, following the Trainer's parameter grouping.

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
    index_order = [i for g in state["param_groups"] for i in g["params"]]
    out = {}
    for name, idx in zip(ordered, index_order):
        entry = state["state"].get(idx, {})
        v = entry.get("exp_avg_sq")
        if v is not None and v.shape == shapes[name].shape:
            out[name] = v.float()
    return out


def check_unchanged(recorded: list[dict]) -> None:
    """Refuse when a checkpoint's weights differ from those a build was made from.

    `recorded` holds {"path", "weights_sha256", "size", "mtime_ns"} per checkpoint. The stat
    shortcut skips re-hashing unchanged files, so a trace does not read every weight file.
    """
    from db.errors import StaleBuild

    for rec in recorded:
        files = weights_files(Path(rec["path"]))
        if not files:
            raise StaleBuild(f"checkpoint {rec['path']} has no weights any more: restore it, or rebuild "
                             "with `wherefrom index`")
        size = sum(f.stat().st_size for f in files)
        mtime = max(f.stat().st_mtime_ns for f in files)
        if size == rec.get("size") and mtime == rec.get("mtime_ns"):
            continue
        if sha256_files(files) != rec["weights_sha256"]:
            raise StaleBuild(f"model weights at {rec['path']} changed since this build: register the new "
                             "weights (`wherefrom model add`) and rebuild with `wherefrom index`")


def weights_stat(path: Path) -> dict:
    files = weights_files(Path(path))
    return {"size": sum(f.stat().st_size for f in files), "mtime_ns": max(f.stat().st_mtime_ns for f in files)}
