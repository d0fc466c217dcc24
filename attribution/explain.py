"""Why the model knows: explanations of one traced answer, for the report.

- which tokens of a training document carry its alignment with the answer's gradient,
- how each top document's influence changes across checkpoints, and how likely each checkpoint
  finds the answer (when was the fact learned?),
- which words of the question the answer depends on (captum, feature ablation over words),
- how many documents state the fact (exposure: dense neighbours above a similarity threshold).

All of them read a `Tracer` (a build's stores and checkpoint models) and never write anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attribution.query_positions import named_words
from attribution.tracer import Tracer, encode_qa
from attribution.verify import lexical_spans
from indexer.gradients import collate, per_example_loss

# Exposure: on the demo world (seed 0, 160 facts stated in 1-8 documents) the count is exact for
# every fact at any threshold from 0.4 to 0.7 once neighbours must name the question's names; 0.6
# sits in the middle. Without the names rule, documents about a namesake with the same value crept in.
EXPOSURE_THRESHOLD = 0.6
MAX_ABLATED_WORDS = 48  # one forward pass per word; longer questions skip word attribution


@dataclass
class DocumentTokens:
    """A chunk's tokens as the build saw them: ids and their char spans in the document."""

    ids: list[int]
    spans: list[tuple[int, int]]  # (start, end) in the document text; (end, end) for eos


def document_tokens(tokenizer, text: str, char_start: int, char_end: int, append_eos: bool) -> DocumentTokens:
    """Re-tokenise the document and keep the chunk's tokens, exactly as `chunk_document` cut them."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = [(i, o) for i, o in zip(enc["input_ids"], enc["offset_mapping"])
             if o[0] >= char_start and o[1] <= char_end]
    ids, spans = [i for i, _ in pairs], [tuple(o) for _, o in pairs]
    last = enc["offset_mapping"][-1][1] if enc["input_ids"] else 0
    if append_eos and tokenizer.eos_token_id is not None and char_end >= last:
        ids.append(tokenizer.eos_token_id)
        spans.append((char_end, char_end))
    return DocumentTokens(ids, spans)


def split_blocks(vector: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    """Per-checkpoint blocks of a concatenated gradient feature."""
    return np.split(vector, np.cumsum(dims)[:-1], axis=-1)


def token_contributions(tracer: Tracer, q_grad: np.ndarray, ids: list[int]) -> np.ndarray:
    """Each token's share of the document's gradient score; the shares sum to that score. (T,)

    For checkpoint c, the stored row is w_c f_c / ‖f_c‖ with f_c = Σ_t term_t (EK-FAC-preconditioned,
    a linear map applied to each term), so the score
    ⟨row, q⟩ splits exactly into Σ_t w_c ⟨term_t, q_c⟩ / ‖f_c‖. Position t's term comes from
    predicting token t+1, so it is credited to token t+1: the answer's own tokens light up, not
    the word before them. Nothing predicts the first token; the last position predicts nothing
    (its term is exactly zero), so the shift keeps the sum.
    """
    by_position = np.zeros(len(ids), dtype=np.float64)
    q_blocks = split_blocks(q_grad, tracer.info["gradient"]["dims"])
    for c, q_c in enumerate(q_blocks):
        model, tokenizer, feat = tracer.featurizer(c)
        terms = feat.features(*collate([ids], tokenizer.pad_token_id), per_token=True)[0].numpy()  # (T, D_c)
        if tracer.curvatures[c] is not None:
            terms = tracer.curvatures[c].apply(terms)  # linear, so the terms still sum to the feature
        norm = max(float(np.linalg.norm(terms.sum(0))), 1e-12)
        by_position += (terms @ q_c).astype(np.float64) * tracer.weights[c] / norm
    return np.concatenate([[0.0], by_position[:-1]])


def checkpoint_cosines(tracer: Tracer, q_grad: np.ndarray, positions: list[int]) -> np.ndarray:
    """Cosine between each document's and the query's gradient, per checkpoint. (N, C)

    Read from the stored features: each block is w_c × a unit vector, so dividing by w_c² recovers
    the cosine (float16 storage: about 3 decimals).
    """
    dims, weights = tracer.info["gradient"]["dims"], tracer.weights
    rows = np.asarray(tracer.grad[positions], dtype=np.float32)  # (N, Σ D_c)
    out = [r @ q / (w * w) for r, q, w in zip(split_blocks(rows, dims), split_blocks(q_grad, dims), weights)]
    return np.stack(out, axis=1)


def answer_logprob(model, tokenizer, question: str, answer: str) -> float:
    """log p(answer | question), summed over the answer's tokens."""
    ids, first = encode_qa(tokenizer, question, answer)
    batch = [t.to(model.device) for t in collate([ids], tokenizer.pad_token_id, label_from=[first])]
    with torch.inference_mode():
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
    n_answer = len(ids) - first
    return -float(per_example_loss(logits, batch[2])[0]) * n_answer


def answer_logprobs(tracer: Tracer, question: str, answer: str) -> list[float]:
    """log p(answer | question) at every checkpoint of the build, in step order."""
    out = []
    for c in range(len(tracer.ckpts)):
        model, tokenizer, _ = tracer.featurizer(c)
        out.append(answer_logprob(model, tokenizer, question, answer))
    return out


def question_words(question: str) -> list[str]:
    """Words with their leading whitespace, so that concatenating them gives the question back."""
    return re.findall(r"\s*\S+", question) or [question]


def word_attribution(tracer: Tracer, question: str, answer: str) -> list[tuple[str, float]] | None:
    """How much the answer's log-probability drops when each question word is removed.

    captum's `LLMAttribution` with `FeatureAblation`: one feature per word, removed (baseline
    empty string). Positive: the answer depends on the word. None when the question is too long.
    """
    from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput

    words = question_words(question)
    if len(words) > MAX_ABLATED_WORDS:
        return None
    model, tokenizer, _ = tracer.featurizer(len(tracer.ckpts) - 1)
    ids, first = encode_qa(tokenizer, question, answer)
    inp = TextTemplateInput(template="{}" * len(words), values=words, baselines=[""] * len(words))
    attr = LLMAttribution(FeatureAblation(model), tokenizer)
    with torch.no_grad():
        # the target is the answer's tokens as they follow the question, the ids the trace used
        result = attr.attribute(inp, target=torch.tensor(ids[first:], device=model.device), forward_in_tokens=False)
    return [(w, float(s)) for w, s in zip(words, result.seq_attr.tolist())]


@dataclass
class Exposure:
    count: int  # documents that state the fact
    threshold: float
    positions: list[int]  # their store rows, most similar first
    similarities: list[float]


def exposure(tracer: Tracer, statement_row: int, question: str, answer: str,
             text_of: Callable[[list[int]], dict[int, str]], threshold: float = EXPOSURE_THRESHOLD,
             neighbours: int = 64) -> Exposure:
    """How many documents state the fact that store row `statement_row` states.

    Its neighbours in the dense FAISS index with cosine ≥ `threshold` that contain the answer and
    name every name of the question: a paraphrase counts, the same sentence about a namesake
    does not. `text_of(rows)` returns the text of store rows.
    """
    query = np.asarray(tracer.dense[statement_row], dtype=np.float32)[None]
    sims, rows = tracer.dense_index.index.search(query, min(neighbours, tracer.dense.shape[0]))
    close = [(int(r), float(s)) for r, s in zip(rows[0], sims[0]) if r >= 0 and s >= threshold]
    texts, names = text_of([r for r, _ in close]), named_words(question)
    keep = [(r, s) for r, s in close
            if lexical_spans(texts.get(r, ""), answer) and names <= {w.lower() for w in re.findall(r"\w+", texts.get(r, ""))}]
    return Exposure(len(keep), threshold, [r for r, _ in keep], [s for _, s in keep])
