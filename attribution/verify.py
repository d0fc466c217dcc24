"""Counterfactual and lexical checks of a traced document.

Tail-patch: take one training step on the document alone and measure the change in the answer's
log-probability. The step is the document's share of an Adam step at that checkpoint — its gradient
divided by √(second moment) from `optimizer.pt`, times the checkpoint's learning rate over the
training batch size — so it moves the weights as training on that document did. A document that
taught the answer raises its probability; an unrelated one leaves it flat.

It runs at the build's earliest checkpoint: at the last one a memorised answer has probability ≈ 1
and no step can raise it (measured on the demo: the true source scored −0.5 nats there).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from indexer.build import collate
from indexer.gradients import per_example_loss
from indexer.modelio import CheckpointInfo, adam_second_moments, load_model


def lexical_match(document: str, answer: str) -> bool:
    """Does the document contain the answer span (case- and whitespace-insensitive, whole words)?"""
    span = " ".join(answer.split()).strip(" .,;:!?").lower()
    if not span:
        return False
    text = " ".join(document.split()).lower()
    return re.search(r"(?<!\w)" + re.escape(span) + r"(?!\w)", text) is not None


def step_size(ckpt: CheckpointInfo) -> float:
    """The checkpoint's learning rate over the training batch size (1e-3 / 1 when unknown)."""
    state = Path(ckpt.path) / "trainer_state.json"
    batch = json.loads(state.read_text()).get("train_batch_size") if state.exists() else None
    return (ckpt.learning_rate or 1e-3) / (batch or 1)


@dataclass
class TailPatcher:
    """One checkpoint's model and optimizer state, ready to tail-patch many documents."""

    model: torch.nn.Module
    tokenizer: object
    moments: dict[str, torch.Tensor]
    lr: float
    eps: float = 1e-8

    @classmethod
    def from_checkpoint(cls, ckpt: CheckpointInfo) -> TailPatcher:
        model, tokenizer = load_model(ckpt.path)
        moments = adam_second_moments(model, ckpt.optimizer_state_path) if ckpt.optimizer_state_path else {}
        return cls(model, tokenizer, moments, step_size(ckpt))

    def _answer_batch(self, question: str, answer: str):
        enc = self.tokenizer(question + answer, add_special_tokens=False, return_offsets_mapping=True)
        first = next(i for i, (_, b) in enumerate(enc["offset_mapping"]) if b > len(question))
        return collate([enc["input_ids"]], self.tokenizer.pad_token_id, label_from=[first])

    def _answer_logprob(self, params: dict, batch) -> float:
        ids, mask, labels = batch
        with torch.no_grad():
            logits = functional_call(self.model, params, (ids,), {"attention_mask": mask}).logits
        n = (labels[:, 1:] != -100).sum()
        return float(-per_example_loss(logits, labels)[0] * n)  # summed log-prob of the answer tokens

    def deltas(self, question: str, answer: str, documents: list[list[int]]) -> list[float]:
        """Change in log p(answer | question) after one step on each document (token ids)."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        batch = self._answer_batch(question, answer)
        base = self._answer_logprob(params, batch)
        names = [n for n in params]
        out = []
        for doc in documents:
            ids, mask, labels = collate([doc], self.tokenizer.pad_token_id)
            live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            logits = functional_call(self.model, live, (ids,), {"attention_mask": mask}).logits
            grads = torch.autograd.grad(per_example_loss(logits, labels).sum(), [live[n] for n in names],
                                        allow_unused=True)
            stepped = {}
            for n, g in zip(names, grads):
                if g is None:
                    stepped[n] = params[n]
                    continue
                v = self.moments.get(n)
                step = g / (v.sqrt() + self.eps) if v is not None else g
                stepped[n] = params[n] - self.lr * step
            out.append(self._answer_logprob(stepped, batch) - base)
        return out


SUPPORT_DELTA = 0.01  # nats: a tail-patch gain above this counts as support even without the span


def verify_hits(tracer, question: str, answer: str, hits, texts: list[str]) -> bool:
    """Add `tail_patch` and `lexical` to each hit's scores; return whether any document supports
    the answer (states its span, or raises its log-probability by more than SUPPORT_DELTA)."""
    patcher = tracer.cached("tail_patcher", lambda: TailPatcher.from_checkpoint(tracer.ckpts[0]))
    tok = patcher.tokenizer
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    for h, text, delta in zip(hits, texts, patcher.deltas(question, answer, docs)):
        h.scores["tail_patch"] = delta
        h.scores["lexical"] = lexical_match(text, answer)
    return any(h.scores["lexical"] or h.scores["tail_patch"] > SUPPORT_DELTA for h in hits)
