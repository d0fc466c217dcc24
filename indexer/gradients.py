"""Per-example projected gradients from one batched backward pass (LoGra).

For a linear layer y = W x, one example's weight gradient is Σ_t δ_t x_tᵀ. Projecting both sides,
P_out (Σ_t δ_t x_tᵀ) P_inᵀ = Σ_t (P_out δ_t)(P_in x_t)ᵀ, so hooks project x_t on the forward pass
and δ_t on the backward pass and only a (k_out × k_in) matrix per example and layer is ever formed.
Weight gradients themselves are never computed: parameters are frozen and the backward pass runs
from the input embeddings, which saves the weight-gradient matmuls (about a third of backward).

Adam normalisation: dividing the gradient elementwise by √v, with v ≈ r cᵀ / mean(v) (a factored
row × column estimate of Adam's second moment), equals scaling P_out's columns by r^-½ and P_in's
columns by c^-½ — folded into the projections at no cost per example.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from db.errors import InputError
from indexer.adapter import tracked_layers
from indexer.config import GradientConfig, Runtime
from indexer.curvature import LayerStats, Stats
from indexer.loading import load_model
from indexer.modelio import CheckpointInfo, adam_second_moments


def _gaussian(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(rows, cols, generator=g) / rows**0.5


class Factored(NamedTuple):
    """Adam's second moment v of one weight as all the fold reads of it: its mean over the inputs
    (out_features,) and over the outputs (in_features,)."""
    row: torch.Tensor
    col: torch.Tensor


def factored(v: torch.Tensor, transposed: bool = False, divisor: float = 1.0) -> Factored:
    """`v` (the weight's shape; (in, out) where `transposed`, as GPT-2's Conv1D) as `Factored`, in
    float32 and divided by `divisor`. The callback passes Adam's raw moment with its bias correction:
    a refold then reads each v once and copies none (a float32 copy of every v, stacked by shape,
    was several GB on the device every few steps at 7B parameters)."""
    v = v.float()
    n_out, n_in = (v.shape[1], v.shape[0]) if transposed else v.shape
    row, col = (v.sum(0), v.sum(1)) if transposed else (v.sum(1), v.sum(0))
    return Factored(row / (n_in * divisor), col / (n_out * divisor))


class Featurizer:
    """Hooks a causal LM so that `features(batch)` returns per-example projected gradients (B, D)."""

    def __init__(self, model: nn.Module, config: GradientConfig, second_moments: dict | None = None):
        self.model, self.config = model, config
        self.layers = tracked_layers(model, config.modules)
        self._gaussians: dict[tuple, torch.Tensor] = {}
        if not self.layers:
            raise InputError(f"no linear layer matches --modules {config.modules!r}: "
                             "pass a regex that matches module names such as 'attn|mlp'")
        # projections run in each layer's compute dtype on its device; the Adam fold is done in
        # float32 first, and everything summed over tokens (features, K-FAC) in float32
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        # layers that read one input tensor (a Llama block's q/k/v, gate/up) are projected by one
        # stacked product: 3 products of 8 rows cost 2.3x one of 24. Found on the first batch
        self._leads: dict[str, list[str]] | None = None  # first layer of such a set -> the set
        self._lead_of: dict[str, str] = {}  # the other layers of a set -> its first
        self._seen: list[tuple[str, torch.Tensor]] = []  # (layer, input) of the first batch
        self._lead_input: dict[str, torch.Tensor] = {}  # the input each set's first layer projected
        self.fold(second_moments)
        self.dim = sum(self.p_out[l.name].shape[0] * self.p_in[l.name].shape[0] for l in self.layers)
        self._x: dict[str, torch.Tensor] = {}  # projected inputs of the batch, until `collect`
        self._d: dict[str, torch.Tensor] = {}  # projected output gradients, until `collect`
        self._mask: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # (B,) or (B, T) factor on δ (training: undoes the batch mean)
        # padding-free packing (indexer.callback): the lengths of the runs of B·T positions that
        # are one example each, in order; a row per run, not per batch row
        self._runs: list[int] | None = None
        self._per_token = False
        # hooks registered for a whole training run (indexer.callback) record only batches it marks
        self.recording = True
        self.stats: Stats | None = None  # set to a Stats() to accumulate K-FAC factor sums
        # or to a float64 zeros(sums_width()) tensor: the same sums kept flat on the device (indexer.callback)
        self.sums: torch.Tensor | None = None

    def fold(self, second_moments: dict | None = None) -> None:
        """(Re)build the projections, Adam's √v folded in where `second_moments` has a layer's weight.

        The offline build folds a checkpoint's optimizer.pt; `indexer.callback` refolds every
        `refold_every` steps with the live optimizer's moments. The fold runs in float32 on the device the layer's weight
        lives on; the result is cast to that weight's dtype (a LoRA layer may keep float32 beside a
        bfloat16 base).
        """
        config = self.config
        moments = (second_moments or {}) if config.optimizer_norm else {}
        self.p_in, self.p_out, normalised = {}, {}, set()
        # layers of one shape are folded as one stack: a refold every few training steps ran ~12
        # small ops per layer (0.5 ms a step of the callback's ~8 on the realistic Llama)
        groups: dict[tuple, list] = {}
        for layer in self.layers:
            v = moments.get(layer.name + ".weight")
            if v is not None and not isinstance(v, Factored):
                v = factored(v, layer.transposed)
            weight = layer.module.weight
            key = (layer.out_features, layer.in_features, weight.device, weight.dtype, v is not None)
            groups.setdefault(key, []).append((layer, v))
        for (n_out, n_in, device, dtype, has_v), members in groups.items():
            names = tuple(layer.name for layer, _ in members)
            p_out = self._stacked(config.k_out, n_out, names, "out", device)  # (L, k_out, out)
            p_in = self._stacked(config.k_in, n_in, names, "in", device)  # (L, k_in, in)
            if has_v:
                row = torch.stack([v.row.to(device, torch.float32) for _, v in members])  # (L, out)
                col = torch.stack([v.col.to(device, torch.float32) for _, v in members])  # (L, in)
                scale = row.mean(1).clamp_min(config.eps).sqrt()
                p_out = p_out * (row + config.eps).rsqrt()[:, None, :] * scale[:, None, None]
                p_in = p_in * (col + config.eps).rsqrt()[:, None, :]
                normalised.update(names)
            self.p_out.update(zip(names, p_out.to(dtype).unbind(0)))
            self.p_in.update(zip(names, p_in.to(dtype).unbind(0)))
        self.normalised = [layer.name for layer in self.layers if layer.name in normalised]
        self._groups = _groups(self.layers, self.p_out, self.p_in)
        self._stack_leads()

    def shapes(self) -> list[tuple[int, int]]:
        """(k_out, k_in) of each layer's block, in feature order."""
        return [(self.p_out[l.name].shape[0], self.p_in[l.name].shape[0]) for l in self.layers]

    def _stacked(self, k: int | None, n: int, names: tuple, side: str, device) -> torch.Tensor:
        """The layers' Gaussian projections of one side stacked (L, k, n) on `device`: drawn and
        stacked once, then reused by every refold during training."""
        if k is None:  # the identity, unprojected: one n × n matrix seen L times, not cached
            return torch.eye(n, device=device).expand(len(names), n, n)
        key = (names, side, k, n, device)
        if key not in self._gaussians:
            self._gaussians[key] = torch.stack([_gaussian(k, n, self.config.seed, f"{name}:{side}")
                                                for name in names]).to(device)
        return self._gaussians[key]

    def _forward_hook(self, name: str):
        backward = self._backward_hook(name)

        def hook(module, inputs, output):
            if not (output.requires_grad and self.recording):
                # the no-grad first pass of activation checkpointing: its recomputation in backward
                # runs this hook again with gradients, and only that pass may count
                return
            # one projection per hook and nothing else: masking, K-FAC sums and the per-example
            # products run once per batch in `collect`, stacked over layers (BENCHMARKS.md: 32
            # hooks of ~16 small ops each were most of the callback's overhead)
            x, lead = inputs[0], self._lead_of.get(name)
            if name in self._p_lead:  # its set's rows, in one tensor: `collect` concatenates, or splits them
                self._x[name] = _project(self._p_lead[name][0], x)
                self._lead_input[name] = x
            elif lead is None or self._lead_input.get(lead) is not x:  # else: projected with its set
                self._x[name] = _project(self.p_in[name], x)
                if self._leads is None:
                    self._seen.append((name, x))
            # a pre-hook on the node that made `output` sees the same gradient as a tensor hook,
            # for a third of register_hook's cost (a Python handle dict per call)
            nr = output.output_nr
            output.grad_fn.register_prehook(lambda grads: backward(grads[nr]))
        return hook

    def _backward_hook(self, name: str):
        def hook(grad):
            self._d[name] = _project(self.p_out[name], grad)
        return hook

    def _layer_stats(self, name: str) -> LayerStats:
        if name not in self.stats.layers:
            k_out, k_in = self.p_out[name].shape[0], self.p_in[name].shape[0]
            self.stats.layers[name] = LayerStats(np.zeros((k_in, k_in)), np.zeros((k_out, k_out)))
        return self.stats.layers[name]

    @staticmethod
    def _embedding_requires_grad(module, inputs, output):
        return output.detach().requires_grad_(True)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, per_token: bool = False,
                 position_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example gradients of each example's mean token loss over `labels` != -100.

        Returns (B, D) float32 on the CPU in layer order, not normalised; with `per_token`,
        (B, T, D): each position's term of the sum over positions, which sums to the (B, D) feature.
        `position_weights` (B, T) weighs each position's term of that sum (a trace's query keeps the
        subject's and the answer's positions: attribution.query_positions).
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        labels = labels.to(self.device)
        self._mask = attention_mask.to(torch.float32)  # a float32 mask makes each projection float32
        self._per_token = per_token
        self._scale = None if position_weights is None else position_weights.to(self.device, torch.float32)
        self._runs = None  # one example a row: packed runs are the training callback's (indexer.callback)
        self._x.clear(); self._d.clear(); self._lead_input.clear()
        if self._leads is None:
            self._seen = []  # a batch cut off by running out of memory
        handles = [self.model.get_input_embeddings().register_forward_hook(self._embedding_requires_grad)]
        handles += self.register()
        flags = [p.requires_grad for p in self.model.parameters()]
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = per_example_loss(logits, labels).sum()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)
        return self.collect().cpu()

    def register(self) -> list:
        """Forward hooks on the tracked layers (their backward hooks follow); the caller removes them."""
        return [l.module.register_forward_hook(self._forward_hook(l.name)) for l in self.layers]

    def collect(self) -> torch.Tensor:
        """The features of the batch whose backward pass just ran: (B, D), or (B, T, D) per token,
        float32 on the device of the layers (`features` moves them to the CPU). Adds the batch's
        K-FAC sums to `stats` and to `sums` where they are set."""
        missing = [l.name for l in self.layers if l.name not in self._d]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[0]}: is it used by the forward pass?")
        if self._leads is None:
            self._find_shared_inputs()
        self._lead_input.clear()  # nothing of the batch's activations outlives it
        B, T = self._mask.shape
        mask = self._mask.reshape(1, 1, B * T)  # padding zeroed on k rows, not on in_features
        if self._scale is None:
            scaled = mask
        else:
            scale = self._scale if self._scale.dim() == 2 else self._scale[:, None]
            scaled = (self._mask * scale).reshape(1, 1, B * T)
        blocks, rows = [], []
        for names in self._groups:
            device = self.p_in[names[0]].device
            # the float32 mask makes x and δ float32 whatever the layers' dtype
            x = self._inputs_of(names) * mask.to(device)  # (L, k_in, B·T)
            d = torch.stack([self._d.pop(n) for n in names]) * scaled.to(device)  # (L, k_out, B·T)
            if self.stats is not None or self.sums is not None:
                rows.append(_factor_sums(x, d, mask.to(device)))
            if self._runs is not None:  # one product per packed example, over its own positions
                blocks.append(torch.stack([dr @ xr.transpose(1, 2) for dr, xr in
                                           zip(d.split(self._runs, 2), x.split(self._runs, 2))], 1).flatten(2))
                continue
            x, d = x.unflatten(2, (B, T)), d.unflatten(2, (B, T))  # (L, k, B, T)
            # per token, the report keeps each (P_out δ_t)(P_in x_t)ᵀ term; their sum is the feature.
            # matmul, not einsum, for the sum: einsum's parsing costs more than the product here
            blocks.append(torch.einsum("lkbt,ljbt->lbtkj", d, x).flatten(3) if self._per_token
                          else (d.transpose(1, 2) @ x.permute(0, 2, 3, 1)).flatten(2))  # (L, B, [T,] k_out·k_in)
        if rows:
            self._add_sums(self._in_layer_order(rows, dim=0).flatten())
        if len(blocks) == 1:  # the default: one stack of all layers, in layer order
            return torch.movedim(blocks[0], 0, -2).flatten(-2)
        return self._in_layer_order(blocks, dim=-1)

    def _inputs_of(self, names: list[str]) -> torch.Tensor:
        """The projected inputs of a group's layers, stacked (L, k_in, B·T). A shared-input set's
        product is taken whole where its layers follow each other in the group (a Llama block's
        q/k/v and gate/up), else cut into its layers' rows first."""
        whole, here = {}, set(names)
        for lead, (_, members, sizes) in self._p_lead.items():
            t = self._x.get(lead)
            if t is None or t.shape[0] != sum(sizes) or here.isdisjoint(members):
                continue  # projected layer by layer (the first batch), or a set of other groups only
            at = names.index(lead) if lead in here else None
            if at is not None and names[at:at + len(members)] == members:
                whole[lead] = len(members)
            else:
                self._x.update(zip(members, t.split(sizes)))
        pieces, i = [], 0
        while i < len(names):
            pieces.append(self._x.pop(names[i]))
            i += whole.get(names[i], 1)
        return torch.cat(pieces).view(len(names), self.p_in[names[0]].shape[0], -1)

    def _find_shared_inputs(self) -> None:
        """Sets of layers that read the same input tensor in the batch just run (same device and
        dtype), each projected from then on by its first layer's hook."""
        by_input: dict[int, list[str]] = {}
        for name, x in self._seen:  # every input is alive in `_seen`: its id is unique
            by_input.setdefault(id(x), []).append(name)
        self._seen = []
        self._leads = {names[0]: names for names in by_input.values()
                       if len(names) > 1 and len({(self.p_in[n].device, self.p_in[n].dtype) for n in names}) == 1}
        self._lead_of = {m: lead for lead, names in self._leads.items() for m in names[1:]}
        self._stack_leads()

    def _stack_leads(self) -> None:
        """Each shared-input set's input projections stacked: (Σ k_in, in_features), its layers, their k_in."""
        self._p_lead = {lead: (torch.cat([self.p_in[m] for m in names]), names, [self.p_in[m].shape[0] for m in names])
                        for lead, names in (self._leads or {}).items()}

    def _in_layer_order(self, stacks: list[torch.Tensor], dim: int) -> torch.Tensor:
        """One tensor from per-group stacks (L_g, …), its layers in layer order along `dim`."""
        if len(stacks) == 1:
            return stacks[0]
        first = stacks[0].device
        by_name = {n: t for names, s in zip(self._groups, stacks) for n, t in zip(names, s.unbind(0))}
        return torch.cat([by_name[l.name].to(first) for l in self.layers], dim=dim)

    def _add_sums(self, flat: torch.Tensor) -> None:
        """`flat`: the batch's K-FAC sums, per layer a_sum, s_sum and tokens in turn (float32)."""
        if self.sums is not None:  # stays on the device: no host sync per batch
            self.sums += flat.to(self.sums.device, torch.float64)
        if self.stats is None:
            return
        row, col = flat.double().cpu().numpy(), 0  # one copy to the host per batch
        for layer in self.layers:
            s = self._layer_stats(layer.name)
            k_in, k_out = s.a_sum.shape[0], s.s_sum.shape[0]
            s.a_sum += row[col:col + k_in * k_in].reshape(k_in, k_in)
            col += k_in * k_in
            s.s_sum += row[col:col + k_out * k_out].reshape(k_out, k_out)
            s.tokens += float(row[col + k_out * k_out])
            col += k_out * k_out + 1

    def sums_width(self) -> int:
        """Length of `sums`: per layer k_in² + k_out² + 1."""
        return sum(a * a + b * b + 1 for a, b in self.shapes())


def _project(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(k, B·T): `p` (k, n) applied to every position of `t` (B, T, n), in `p`'s dtype. P tᵀ, not
    t Pᵀ: with k = 8 rows the wide product runs 1.7-2× faster on the CPU (AMD EPYC, torch 2.13)."""
    t = t.detach().reshape(-1, t.shape[-1])
    return p @ (t if t.dtype == p.dtype else t.to(p.dtype)).T


def _factor_sums(x: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per layer, Σ over batch and positions of x xᵀ and of δ δᵀ, and the token count, as one
    float32 row (L, k_in² + k_out² + 1): the K-FAC factors' share of one batch. x: (L, k_in, B·T)."""
    tokens = mask.sum().expand(x.shape[0], 1)  # float32 counts are exact below 2^24
    return torch.cat([(x @ x.transpose(1, 2)).flatten(1), (d @ d.transpose(1, 2)).flatten(1), tokens], dim=1)


def _groups(layers, p_out: dict, p_in: dict) -> list[list[str]]:
    """Layer names grouped by projection shape, device and dtype, in layer order: `collect` stacks
    each group (with the default projection, one group of all layers)."""
    groups: dict[tuple, list[str]] = {}
    for l in layers:
        p, q = p_out[l.name], p_in[l.name]
        groups.setdefault((p.shape[0], q.shape[0], p.device, p.dtype), []).append(l.name)
    return list(groups.values())


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per example over positions whose label is not -100. (B,)"""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    tok = nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                      ignore_index=-100, reduction="none")  # (B, T-1)
    counts = (shift_labels != -100).sum(1).clamp_min(1)
    return tok.sum(1) / counts


def collate(seqs: list[list[int]], pad_id: int, label_from: list[int] | None = None,
            label_spans: list[tuple[int, int] | None] | None = None):
    """Right-padded (ids, mask, labels); labels are -100 on padding, before `label_from[i]` and
    outside `label_spans[i]` (start, end) where that is not None."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, start in enumerate(label_from or []):
        labels[i, :start] = -100
    for i, span in enumerate(label_spans or []):
        if span is not None:
            labels[i, :span[0]] = -100
            labels[i, span[1]:] = -100
    return ids, mask, labels


def featurizer_for(ckpt: CheckpointInfo, config: GradientConfig, runtime: Runtime | None = None):
    """(model, tokenizer, featurizer) for one checkpoint, Adam-normalised when its state is there,
    on `runtime`'s device and dtype (default: the CPU, the checkpoint's dtype)."""
    runtime = runtime or Runtime(device="cpu")
    model, tokenizer = load_model(ckpt.path, ckpt.base_path, runtime.device, runtime.dtype)
    moments = {}
    if config.optimizer_norm and ckpt.optimizer_state_path:
        moments = adam_second_moments(model, ckpt.optimizer_state_path)
    return model, tokenizer, Featurizer(model, config, moments)
