"""Architecture quirks in one place: which modules are linear layers, and how their weights lie.

`nn.Linear` stores W as (out, in); transformers' GPT-2 `Conv1D` stores it as (in, out). Everything
else in the indexer sees a `Layer` with `in_features`, `out_features` and a `transposed` flag.
Fused projections (GPT-NeoX's `query_key_value`, GPT-2's `c_attn`) are one layer like any other;
rotary embeddings and grouped-query attention hold no weights, so nothing here needs to know them.
A PEFT LoRA model wraps each adapted `nn.Linear` as `base_layer` (frozen) beside `lora_A.<name>`
and `lora_B.<name>` (both `nn.Linear`, trained): by default only those two are tracked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass
class Layer:
    name: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool  # True when weight is (in, out), as in Conv1D


def _as_layer(name: str, module: nn.Module) -> Layer | None:
    if isinstance(module, nn.Linear):
        return Layer(name, module, module.in_features, module.out_features, False)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        n_in, n_out = module.weight.shape
        return Layer(name, module, n_in, n_out, True)
    return None


LORA_LAYERS = r"\.lora_[AB]\.[^.]+$"  # the trained halves of each LoRA-adapted layer


def default_pattern(model: nn.Module) -> str | None:
    """None (every linear layer but the head) for a whole model; the LoRA layers for an adapter."""
    return LORA_LAYERS if hasattr(model, "peft_config") else None


def tracked_layers(model: nn.Module, pattern: str | None = None) -> list[Layer]:
    """Linear layers to track, in module order; by default `default_pattern`, never the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pattern = pattern or default_pattern(model)
    regex = re.compile(pattern) if pattern else None
    layers = []
    for name, module in model.named_modules():
        layer = _as_layer(name, module)
        if layer is None or module is head:
            continue
        if regex is not None and not regex.search(name):
            continue
        layers.append(layer)
    return layers
