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

import re
from dataclasses import dataclass

import torch
from torch.func import functional_call

from attribution.tracer import encode_qa
from indexer.gradients import collate, per_example_loss
from indexer.loading import load_model
from indexer.modelio import CheckpointInfo, adam_second_moments, train_batch_size


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


def lexical_match(document: str, answer: str) -> bool:
    """Does the document contain the answer span (case- and whitespace-insensitive, whole words)?"""
    return bool(lexical_spans(document, answer.strip().rstrip(".,;:!?")))


def step_size(ckpt: CheckpointInfo) -> float:
    """The checkpoint's learning rate over the training batch size (1e-3 / 1 when unknown)."""
    return (ckpt.learning_rate or 1e-3) / (train_batch_size(ckpt.path) or 1)


@dataclass
class TailPatcher:
    """One checkpoint's model and optimizer state, ready to tail-patch many documents."""

    model: torch.nn.Module
    tokenizer: object
    moments: dict[str, torch.Tensor]
    lr: float
    step: int | None = None  # the checkpoint's training step, for display
    eps: float = 1e-8

    @classmethod
    def from_checkpoint(cls, ckpt: CheckpointInfo, loaded: tuple | None = None) -> TailPatcher:
        """`loaded`: (model, tokenizer) already in memory for this checkpoint; weights are never changed."""
        model, tokenizer = loaded or load_model(ckpt.path, ckpt.base_path)
        moments = adam_second_moments(model, ckpt.optimizer_state_path) if ckpt.optimizer_state_path else {}
        moments = {n: v.to(model.device) for n, v in moments.items()}  # v is float32: the step divides in it
        return cls(model, tokenizer, moments, step_size(ckpt), ckpt.step)

    def _answer_batch(self, question: str, answer: str):
        ids, first = encode_qa(self.tokenizer, question, answer)
        return [t.to(self.model.device) for t in collate([ids], self.tokenizer.pad_token_id, label_from=[first])]

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
        # the weights training updated: all of a whole model's, only the adapter's of a LoRA model
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        out = []
        for doc in documents:
            ids, mask, labels = (t.to(self.model.device) for t in collate([doc], self.tokenizer.pad_token_id))
            live = {n: p.clone().requires_grad_(n in names) for n, p in params.items()}
            logits = functional_call(self.model, live, (ids,), {"attention_mask": mask}).logits
            grads = torch.autograd.grad(per_example_loss(logits, labels).sum(), [live[n] for n in names],
                                        allow_unused=True)
            stepped = {}
            for n, g in zip(names, grads):
                if g is None:
                    stepped[n] = params[n]
                    continue
                v = self.moments.get(n)
                step = g.float() / (v.sqrt() + self.eps) if v is not None else g.float()
                stepped[n] = (params[n] - self.lr * step).to(params[n].dtype)  # the step in float32
            out.append(self._answer_logprob(stepped, batch) - base)
        return out


def tail_patcher(tracer) -> TailPatcher:
    """The build's tail-patcher: its earliest checkpoint, sharing the tracer's loaded model."""
    return tracer.cached("tail_patcher", lambda: TailPatcher.from_checkpoint(tracer.ckpts[0], tracer.featurizer(0)[:2]))


def supported(scores: list[dict]) -> bool | None:
    """Whether any verified document states the answer span. None when nothing was verified.

    Tail-patch is reported beside it but does not decide: on a small model one step on an unrelated
    document moves an unlikely answer by more than a nat (measured: +1.7 nats for " zebra crossing"
    from a "was born in" document), so a tail-patch threshold would call nonsense supported.
    """
    if not scores or "lexical" not in scores[0]:
        return None
    return any(s["lexical"] for s in scores)


def verify_hits(tracer, question: str, answer: str, hits, texts: list[str]) -> bool:
    """Add `tail_patch` and `lexical` to each hit's scores; return `supported` of them."""
    patcher = tail_patcher(tracer)
    tok = patcher.tokenizer
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    for h, text, delta in zip(hits, texts, patcher.deltas(question, answer, docs)):
        h.scores["tail_patch"] = delta
        h.scores["lexical"] = lexical_match(text, answer)
    return supported([h.scores for h in hits])
