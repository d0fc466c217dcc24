"""Putting a registered checkpoint into memory: the device, the dtype it computes in, the model and
its tokenizer, and activation checkpointing. `indexer.modelio` reads what the folders hold."""

from __future__ import annotations

from pathlib import Path

from db.errors import InputError
from indexer.modelio import adapter_base, tokenizer_folder


def resolve_device(name: str = "auto"):
    """The torch device `name` means: auto = the current CUDA device when there is one, else the CPU."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s) torch can use; "
                             "pass --device cpu, or a cuda:N that exists")
    return device


def cpu_has_native(dtype) -> bool:
    """Whether this CPU computes in `dtype` (a torch dtype) with its own instructions. An x86 CPU
    without AVX-512 BF16 or AMX emulates bfloat16 matmuls: 57x float32's time on an AVX2 AMD EPYC
    (64 × 1024 × 1024): six documents and one trace of a 350M bfloat16 Llama ran over ten minutes
    there, 23 s in float32."""
    import platform

    import torch
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype)
    if probes is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # float32, or a CPU whose half-precision support torch cannot probe: as saved
    return any(getattr(torch.cpu, p, lambda: True)() for p in probes)


def load_model(folder: Path, base: Path | None = None, device: str = "cpu", dtype: str | None = None):
    """Load a causal LM and its tokenizer from a local folder, offline, in eval mode.

    `device`: as `resolve_device` reads it; `dtype`: bfloat16 | float16 | float32, or None for the
    dtype the checkpoint was saved in, except on a CPU that has no instructions for it
    (`cpu_has_native`), where it is float32 (twice the memory, tens of times faster; `--dtype`
    keeps the saved one). A LoRA adapter folder loads onto its base model (`base`,
    else adapter_config.json's) as a PEFT model whose adapter weights alone require gradients, as
    they did in training.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    target = resolve_device(device)
    tokenizer = load_tokenizer(folder, base)
    base = adapter_base(folder, base)
    model = AutoModelForCausalLM.from_pretrained(base or folder, local_files_only=True,
                                                 dtype=getattr(torch, dtype) if dtype else "auto")
    if base is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise InputError(f"{folder} is a LoRA adapter, which needs peft: pip install 'wherefrom[lora]'") from None
        model = PeftModel.from_pretrained(model, folder, is_trainable=True)
        if dtype:  # PEFT makes adapter weights float32 whatever the base's dtype
            model = model.to(getattr(torch, dtype))
    if dtype is None and target.type == "cpu" and not cpu_has_native(model.dtype):
        model = model.to(torch.float32)
    if tokenizer.pad_token_id is None:
        # padding is masked out of attention and loss, so any id serves when eos is missing too
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return model.to(target).eval(), tokenizer


def load_tokenizer(folder: Path, base: Path | None = None):
    """The tokenizer alone (chunking a corpus needs no weights): the folder's, or an adapter's base's."""
    from transformers import AutoTokenizer
    folder = tokenizer_folder(folder, base)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # tokenizers and transformers raise bare Exception, KeyError, TypeError… on a bad file
        from indexer.store import describe
        raise InputError(f"the tokenizer in {folder} does not load ({describe(e)}): save the model's "
                         "tokenizer into it again (tokenizer.save_pretrained)") from None


def enable_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    Reentrant checkpointing runs the first forward without gradients, so hooks that act only when
    an output requires gradients (`indexer.gradients`) see each block once, in its recomputation.
    Only the checkpointed blocks go to training mode (transformers checkpoints only then); their
    dropout modules stay in eval mode, so the features equal those of an unchanged model.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": True})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True  # this module only: .train() would switch its dropout on too
