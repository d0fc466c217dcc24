"""Which prompt positions the gradient query sums over: the question's names and the answer's.

The query block of a layer is Σ_t (P_out δ_t)(P_in x_t)ᵀ over every position of prompt + answer,
with the loss on the answer tokens: every position's δ is nonzero, because later positions attend
to it. The terms of a prompt's template ("Question: … Answer:", a chat template's tags and system
prompt, a few-shot prompt's solved examples) are alike in every document of that template, so they
pull other people's question–answer documents above the fact's statements. The terms at the names
of the question (where a subject's facts are read, Meng et al. 2022) and at the positions that emit
the answer carry the fact. Kept alone, they lifted `--method grad` on the dev seeds of both worlds
(realistic 200: 0.735 → 0.747, QA prompts 0.277 → 0.313; trap 100: 0.874 → 0.901, question
prompts 0.756 → 0.812), where every other cut of the positions did less (bench/grad_positions.py,
BENCHMARKS.md). The loss is unchanged: on the answer tokens of the exact prompt.
"""

from __future__ import annotations

import re

import numpy as np

from attribution.text_query import Markers, question_content


def named_words(question: str) -> set[str]:
    """Capitalised words of the question (its names), lowercased. The first word counts only when
    the next is capitalised too: "Mirela Stoven was…" names Mirela, "Where was…" names nothing."""
    words = re.findall(r"\w+", question)
    return {w.lower() for i, w in enumerate(words)
            if w[:1].isupper() and (i > 0 or (len(words) > 1 and words[1][:1].isupper()))}


def content_span(prompt: str, markers: Markers) -> tuple[int, int]:
    """Character span of the question's content in `prompt` (its last occurrence); the whole prompt
    when the content cannot be found as written."""
    words = question_content(prompt, markers).split()
    if not words:
        return 0, len(prompt)
    found = list(re.finditer(r"\s+".join(map(re.escape, words)), prompt))
    return (found[-1].start(), found[-1].end()) if found else (0, len(prompt))


def name_spans(prompt: str, markers: Markers) -> list[tuple[int, int]]:
    """Character spans of the named words of the question's content (`named_words`)."""
    lo, hi = content_span(prompt, markers)
    names = named_words(prompt[lo:hi])
    return [(m.start() + lo, m.end() + lo) for m in re.finditer(r"\w+", prompt[lo:hi]) if m.group().lower() in names]


def touching(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """(T,) bool: the tokens (character `offsets`) that overlap any of the character `spans`."""
    return np.array([any(a < e and b > s for s, e in spans) for a, b in offsets], dtype=bool)


def answer_positions(n: int, first: int) -> np.ndarray:
    """(n,) bool: the positions whose next token is an answer token (`first` is the first one)."""
    keep = np.zeros(n, dtype=bool)
    keep[first - 1:n - 1] = True
    return keep


def subject_and_answer(offsets: list[tuple[int, int]], prompt: str, first: int, markers: Markers) -> np.ndarray:
    """(T,) float weights over the tokens of prompt + answer (their character `offsets`): 1 at the
    tokens of the question's names and at the positions whose next token is an answer token
    (`first` is the first answer token), 0 elsewhere."""
    keep = touching(offsets, name_spans(prompt, markers)) | answer_positions(len(offsets), first)
    return keep.astype(np.float32)
