"""What a study records about each traced question, computed cheaply beside its trace.

- correct / wrong / unknown: the demo's rule, against the expected answer when there is one;
- supported: some returned document contains the answer span (`attribution.verify`'s lexical
  rule, without the tail-patch: a study traces hundreds of answers);
- exposure: documents of the corpus that contain the fact's value and every capitalised name of
  the question (explain's names rule, over the whole corpus instead of dense neighbours): a
  LIKE prefilter in SQL, then whole words here. The value is the expected answer when given
  (how often was the fact stated?), else the traced one;
- learned at: the first checkpoint from which the answer's first token stays the greedy next
  token after the question, up to the last checkpoint (one batched forward per checkpoint);
- misled: a wrong answer that a returned document states (the wrong value was in the data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from attribution.query_positions import named_words
from attribution.tracer import encode_qa
from attribution.verify import lexical_match, lexical_spans
from db import study_repo
from indexer.gradients import collate

BATCH = 32  # questions per forward pass of the learned-at check


def is_correct(answer: str, truth: str) -> bool:
    """The answer starts with the expected one, in any case (the demo's rule)."""
    return answer.strip().lower().startswith(truth.strip().lower())


@dataclass
class Outcome:
    correct: bool | None
    supported: bool
    exposure: int
    learned_step: int | None
    misled: bool | None
    stating_ranks: list[int]  # ranks of the returned documents that state the answer

    def columns(self) -> dict:
        return {"correct": self.correct, "supported": self.supported, "exposure": self.exposure,
                "learned_step": self.learned_step, "misled": self.misled, "stating_ranks": self.stating_ranks}


def learned_steps(tracer, pairs: list[tuple[str, str]]) -> list[int | None]:
    """For each (question, answer): the first checkpoint step from which the answer's first token
    is the top next-token choice at every later checkpoint; None when it is not top at the last."""
    top = []  # per checkpoint: is the answer's first token the argmax, per question
    for c in range(len(tracer.ckpts)):
        model, tokenizer, _ = tracer.featurizer(c)
        row = []
        for start in range(0, len(pairs), BATCH):
            encoded = [encode_qa(tokenizer, q, a) for q, a in pairs[start:start + BATCH]]
            ids, mask, _ = collate([i[:first] for i, first in encoded], tokenizer.pad_token_id or 0)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            last = logits[torch.arange(len(encoded)), mask.sum(1) - 1].argmax(-1)  # (B,)
            row += [int(t) == i[first] for t, (i, first) in zip(last, encoded)]
        top.append(row)
    steps = []
    for i in range(len(pairs)):
        step = None
        for c in reversed(range(len(tracer.ckpts))):
            if not top[c][i]:
                break
            step = tracer.ckpts[c].step
        steps.append(step)
    return steps


def exposure(s, corpus_id: int, question: str, value: str) -> int:
    """Documents of the corpus that contain `value` and name every name of `question`."""
    value = value.strip().rstrip(".,;:!?")
    names = named_words(question)
    if not value:
        return 0
    texts = study_repo.texts_containing(s, corpus_id, value.split() + sorted(names))
    return sum(1 for t in texts if lexical_spans(t, value) and names <= {w.lower() for w in re.findall(r"\w+", t)})


def outcome(s, corpus_id: int, question: str, answer: str, expected: str | None, texts: list[str],
            learned_step: int | None) -> Outcome:
    """One traced question's outcome; `texts`: its returned chunks, best first (rank 1, 2, …)."""
    correct = is_correct(answer, expected) if expected is not None else None
    stating = [rank for rank, t in enumerate(texts, 1) if lexical_match(t, answer)]
    return Outcome(correct, bool(stating), exposure(s, corpus_id, question, expected if expected is not None else answer),
                   learned_step, bool(stating) if correct is False else None, stating)
