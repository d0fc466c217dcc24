"""Verification of a candidate document: does it state the answer, and does training on it move it?

- Lexical: the answer span occurs in the document (case- and whitespace-insensitive).
- Tail-patch: one optimizer step on the document from a checkpoint, then the change in the
  answer's log-probability (TrackStar's check). A document that taught the answer raises it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch

from indexer.build import collate
from indexer.gradients import per_example_loss

BETA2 = 0.999  # Adam's default β2, as in the Trainer runs wherefrom reads
EPS = 1e-8


def lexical_spans(text: str, answer: str) -> list[tuple[int, int]]:
    """Character spans of the answer in `text`; words may be separated by any whitespace."""
    words = answer.split()
    if not words:
        return []
    pattern = r"\s+".join(re.escape(w) for w in words)
    # word boundaries only where the answer itself starts/ends with a word character, so that
    # " 1873" does not match inside "18731" but "U.S." still matches
    if re.match(r"\w", words[0]):
        pattern = r"(?<!\w)" + pattern
    if re.search(r"\w$", words[-1]):
        pattern += r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


class TailPatcher:
    """Takes one optimizer step on a document from a checkpoint and measures the answer's change.

    The step is Adam's with the momentum zeroed, so that it is the document's alone:
    Δθ = −lr · g / (√(β2 v + (1 − β2) g²) + ε), v being the checkpoint's second moments; where
    none are known, v = g², which makes the step lr · sign(g), as Adam's very first step.
    `measure(model)` is the quantity watched (log p of the answer). The model is copied once and
    its weights restored after every document, so the caller's model never changes.
    """

    def __init__(self, model, tokenizer, second_moments: dict[str, torch.Tensor], lr: float,
                 measure: Callable[[torch.nn.Module], float], step: int | None = None):
        self.source, self.tokenizer, self.moments = model, tokenizer, second_moments
        self.lr, self.measure, self.step = lr, measure, step
        self.model = copy.deepcopy(model).eval()
        self.before = measure(model)

    def _restore(self) -> None:
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), self.source.parameters()):
                p.copy_(q)

    def _step(self, doc_ids: list[int]) -> None:
        named = list(self.model.named_parameters())
        ids, mask, labels = collate([doc_ids], self.tokenizer.pad_token_id)
        with torch.enable_grad():
            for _, p in named:
                p.requires_grad_(True)
            loss = per_example_loss(self.model(input_ids=ids, attention_mask=mask).logits, labels).sum()
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(named, grads):
                if g is None:
                    continue
                v = self.moments.get(name)
                v = g * g if v is None else BETA2 * v + (1 - BETA2) * g * g
                p -= self.lr * g / (v.sqrt() + EPS)

    def delta(self, doc_ids: list[int]) -> float:
        """`measure` after one step on the document, minus `measure` before it."""
        try:
            self._step(doc_ids)
            return self.measure(self.model) - self.before
        finally:
            self._restore()
