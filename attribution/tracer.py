"""Trace one answer against a build's stores: answer, query gradient, candidates, ranking.

The gradient query is the loss on the answer tokens after the exact prompt, its gradient summed over
the question's names and the answer's positions (`query_positions`); the text query (dense,
BM25) is the question's content and the answer, the prompt's template removed (`text_query`).
The hybrid rule (the default): candidates are the union of the gradient, dense and BM25 top-K;
each method gives every candidate its z-score over the candidates and the log of its reciprocal
rank among them, and `FUSION`'s coefficients sum the six. Dense and BM25 say "which document
states this", gradients say "which document moves the answer"; z-scores put cosines and BM25
units on one scale, and the rank terms let a method's top places count where its scores are flat.
The candidates the fusion believes are sources come first in its order; the rest follow in the
gradient's (`hybrid_order`). A hit's score is its fused score; every method's raw score is kept
beside the rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attribution.methods import METHODS, check_positions
from attribution.query_positions import subject_and_answer
from attribution.text_query import derive as derive_text_query, learn_markers
from db.errors import InputError
from indexer import lexical, semantic, store
from indexer.ann import AnnIndex, rescored, top_k
from indexer.config import NPROBE, BuildConfig, Runtime
from indexer.curvature import Curvature
from indexer.gradients import collate, featurizer_for
from indexer.loading import resolve_device
from indexer.modelio import CheckpointInfo

# A conditional logit (listwise logistic regression: P(source | pool) = softmax of the sum), chosen by
# 5-fold CV on the realistic world's dev seed against z-sums, RRF and calibrated scores (0.954 vs
# 0.912 for the z-sum it replaces), fitted on the dev seeds of both benchmark worlds, realistic 200
# and trap 100 (`python -m bench.fusion_pooled`; docs/ranking.md). BM25's two terms have opposite
# signs: together one nonlinear function of its score in the pool, fitted rather than designed.
# On the test seeds: MRR 0.961 realistic / 0.967 trap, against 0.906 / 0.962 for the z-sum it
# replaces (grad 0.25, dense 1) and 0.950 / 0.949 for dense alone; refitted without grad, 0.949 / 0.964.
FUSION = {"z": {"grad": 0.4235, "dense": 1.9361, "bm25": 1.6494},
          "log_rr": {"grad": 0.1925, "dense": 1.1683, "bm25": -1.8652}}
# The fusion is a conditional logit, so softmax(fused) over the pool is its P(the fact's source).
# Past the candidates it gives at least SOURCE_P, the hybrid's list follows the gradient: the
# fusion's later places are dense's neighbours, which a training step on them barely moves, and
# the gradient's are the documents that move the answer most (`hybrid_order`; chosen on the dev
# seeds of both worlds with bench/fusion_tail.py, docs/ranking.md).
SOURCE_P = 0.02


@dataclass
class Hit:
    position: int  # row of the build's stores
    score: float  # the ranking score of the chosen method
    scores: dict[str, float]  # every method's raw score


@dataclass
class Pool:
    """A trace's candidate rows and every method's raw score on them, before fusion."""

    positions: np.ndarray  # (P,) rows of the build's stores, ascending
    raw: dict[str, np.ndarray]  # method → (P,) raw scores
    answer: str
    answer_generated: bool
    text_query: str  # what dense and BM25 searched with
    gradient_query: dict  # what the gradient query summed over (`Tracer._query`)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Ranking:
    answer: str
    answer_generated: bool
    hits: list[Hit]
    text_query: str
    gradient_query: dict
    timings: dict[str, float] = field(default_factory=dict)


def answer_span(text: str) -> str:
    """The first line and sentence of a generation, without the closing full stop."""
    text = text.split("\n")[0]
    for stop in (". ", "? ", "! "):
        text = text.split(stop)[0]
    return text.rstrip(".?! ") if text.strip() else text


def as_written(question: str, answer: str) -> str:
    """A given answer as the model writes it after the question: a word typed without its leading
    space ("1979" after "was born in") gets one. Byte-level BPE splits "in1979" into "in" + "1979",
    and "1979" is another token than the " 1979" the model generates, so the query gradient would be
    of an answer the model never gives (grad MRR fell to ~0.1 on the demo that way). A question that
    ends in whitespace (a chat template's "<|assistant|>\n") or an answer that starts with it, or
    with punctuation, is traced as given."""
    if question and not question[-1].isspace() and answer[:1].isalnum():
        return " " + answer
    return answer


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of question + answer, and the index of the first answer token."""
    return encode_qa_offsets(tokenizer, question, answer)[:2]


def encode_qa_offsets(tokenizer, question: str, answer: str) -> tuple[list[int], int, list[tuple[int, int]]]:
    """`encode_qa`, and each token's character span in question + answer."""
    enc = tokenizer(question + answer, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    first = next((i for i, (a, b) in enumerate(offsets) if b > len(question)), None)
    if first is None or first == 0:
        raise InputError("the answer has no tokens of its own after the question: "
                         "give a non-empty --answer and a non-empty question")
    _check_producible(tokenizer, ids[first:], (question + answer)[offsets[first][0]:], answer)
    return ids, first, offsets


def _check_producible(tokenizer, ids: list[int], text: str, answer: str) -> None:
    """Refuse an answer the model could not have written: one that encodes to unknown or special
    tokens, or reads back as other text (the loss would be on tokens that mean something else)."""
    special = set(tokenizer.all_special_ids)
    bad = next((t for t in ids if t in special), None)
    if bad is not None:
        raise InputError(f"the answer {answer!r} holds {tokenizer.convert_ids_to_tokens(bad)!r}, a token the "
                         "model does not write as text: pass the answer as the plain text the model would generate")
    back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if back.split() != text.split():
        raise InputError(f"the tokenizer cannot produce the answer {answer!r}: it reads back as {back!r}; "
                         "pass the answer as the model's tokenizer writes it")


class Tracer:
    """A build's stores and checkpoints, loaded once and reused across traces."""

    def __init__(self, folder: Path, ckpts: list[CheckpointInfo], runtime: Runtime | None = None):
        self.folder = Path(folder)
        self.info = store.read_info(self.folder)
        self.config = BuildConfig(**self.info["config"])
        self.ckpts = ckpts
        self.runtime = runtime or Runtime.from_env()  # device and dtype: WHEREFROM_DEVICE, `trace --device`
        resolve_device(self.runtime.device)  # a device that does not exist: refused before it is cached
        self.weights = self.info["gradient"]["weights"]
        self.grad = store.open_array(self.folder, "grad")
        self.dense = store.open_array(self.folder, "dense")
        nprobe = self.info.get("faiss_nprobe", NPROBE)
        self.grad_index = AnnIndex.load(self.folder / "grad.faiss", self.info.get("faiss_factory", "Flat"), nprobe)
        self.dense_index = AnnIndex.load(self.folder / "dense.faiss", self.info.get("dense_faiss_factory", "Flat"),
                                         nprobe)
        self.lexical = lexical.Lexical(self.folder / "bm25")
        self.removed = store.removed_rows(self.folder)  # deleted documents' rows: never candidates
        self._featurizers: dict[int, tuple] = {}
        self._cache: dict[str, object] = {}
        self.curvatures = [Curvature.load(p) if (p := self.folder / f"curvature-c{c}.npz").exists() else None
                           for c in range(len(ckpts))]

    def cached(self, key: str, make):
        """Per-build objects that are costly to make (a tail-patcher, …), made once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def featurizer(self, c: int):
        """(model, tokenizer, featurizer) of checkpoint `c`, loaded once."""
        if c not in self._featurizers:
            self._featurizers[c] = featurizer_for(self.ckpts[c], self.config.gradient, self.runtime)
        return self._featurizers[c]

    def generate(self, question: str, max_new_tokens: int = 16) -> str:
        """Greedy answer of the last checkpoint."""
        model, tokenizer, _ = self.featurizer(len(self.ckpts) - 1)
        ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        self._check_length(ids.shape[1] + 1, model)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return answer_span(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    @staticmethod
    def _check_length(n: int, model) -> None:
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit and n > limit:
            raise InputError(f"question and answer take {n} tokens but the model's context is {limit}: "
                             "shorten the question")

    def query_gradient(self, question: str, answer: str, positions: str = "subject") -> np.ndarray:
        """Concatenated per-checkpoint query features, loss on the answer tokens only. (D,)

        `positions` (`QUERY_POSITIONS`) "subject" sums each layer's gradient over the question's
        names and the positions that emit the answer (`attribution.query_positions`); "all" over
        every position, the loss's full gradient."""
        return self._query(question, answer, positions)[0]

    def _query(self, question: str, answer: str, positions: str) -> tuple[np.ndarray, dict]:
        """`query_gradient`, and what it summed over as a trace records it: {"positions": "subject",
        "tokens": the kept tokens' text (the last checkpoint's tokenizer)} or {"positions": "all"}."""
        check_positions(positions)
        parts, record, keep = [], {"positions": positions}, None
        for c in range(len(self.ckpts)):
            model, tokenizer, feat = self.featurizer(c)
            ids, first, offsets = encode_qa_offsets(tokenizer, question, answer)
            self._check_length(len(ids), model)
            keep = subject_and_answer(offsets, question, first, self.text_markers()) if positions == "subject" else None
            f = feat.features(*collate([ids], tokenizer.pad_token_id, label_from=[first]),
                              position_weights=None if keep is None else torch.from_numpy(keep)[None]).numpy()
            if self.curvatures[c] is not None:
                f = self.curvatures[c].apply(f)
            parts.append(f[0] / max(np.linalg.norm(f[0]), 1e-30) * self.weights[c])
        if keep is not None:  # the kept tokens' text, by the last checkpoint's tokenizer and mask
            record["tokens"] = [(question + answer)[a:b] for (a, b), k in zip(offsets, keep) if k]
        return np.concatenate(parts).astype(np.float32), record

    def text_markers(self):
        """The user-turn markers of the model's chat template (`attribution.text_query`), learned once."""
        return self.cached("text_markers", lambda: learn_markers(self.featurizer(len(self.ckpts) - 1)[1]))

    def candidates(self, question: str, answer: str | None = None, k: int = 10, method: str = "hybrid",
                   candidates: int = 100, text_query: str | None = None,
                   gradient_positions: str = "subject") -> Pool:
        """The candidate rows and every method's raw score on them (one pass; `rank` orders them).

        The gradient query is the loss on the answer tokens of the exact prompt, summed over
        `gradient_positions` (`query_gradient`, checked before any answer is generated); the text query (dense, BM25) is `text_query` as
        given, else derived from the question's content.
        """
        if not question.strip():
            raise InputError("the question is empty: ask something")
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if text_query is not None and not text_query.strip():
            raise InputError("the text query is empty: pass --text-query with the words to search for, or leave it out")
        check_positions(gradient_positions)
        timings, t = {}, time.perf_counter()
        generated = answer is None
        if generated:
            answer = self.generate(question)
            timings["answer"] = time.perf_counter() - t
            t = time.perf_counter()
        if not answer.strip():
            raise InputError("the answer is empty: pass --answer with the text to trace")
        if not generated:
            answer = as_written(question, answer)  # the trace records the answer it traced
        q_grad, q_record = self._query(question, answer, gradient_positions)
        timings["query_gradient"] = time.perf_counter() - t
        t = time.perf_counter()
        q_text = text_query if text_query is not None else derive_text_query(question, answer, self.text_markers())
        q_dense = semantic.embed([q_text])[0]
        bm25 = self.lexical.scores(q_text)
        timings["query_embed"] = time.perf_counter() - t
        t = time.perf_counter()
        k_cand = min(max(candidates, k), len(bm25) - len(self.removed))
        live_bm25 = bm25.copy()
        live_bm25[self.removed] = -np.inf
        pools = {
            "grad": self.grad_index.search(q_grad, k_cand, self.grad),
            "dense": self.dense_index.search(q_dense, k_cand, self.dense),
            "bm25": top_k(live_bm25, k_cand),
        }
        # candidates in row order, so equal scores rank by row whichever index found them
        pool = np.unique(pools[method] if method != "hybrid" else np.concatenate(list(pools.values())))
        pool = pool[(pool >= 0) & ~np.isin(pool, self.removed)]
        raw = {
            "grad": rescored(self.grad, pool, q_grad),
            "dense": rescored(self.dense, pool, q_dense),
            "bm25": bm25[pool],
        }
        timings["candidates"] = time.perf_counter() - t
        return Pool(pool, raw, answer, generated, q_text, q_record, timings)

    def rank(self, question: str, answer: str | None = None, k: int = 10, method: str = "hybrid",
             candidates: int = 100, text_query: str | None = None, gradient_positions: str = "subject") -> Ranking:
        pool = self.candidates(question, answer, k, method, candidates, text_query, gradient_positions)
        t = time.perf_counter()
        if method == "hybrid":
            score = fuse(pool.raw)
            top = hybrid_order(score, pool.raw["grad"])[:k]
        else:
            score = pool.raw[method]
            top = np.argsort(-score, kind="stable")[:k]
        hits = [Hit(int(pool.positions[i]), float(score[i]), {m: float(v[i]) for m, v in pool.raw.items()})
                for i in top]
        timings = pool.timings
        timings["rank"] = time.perf_counter() - t + timings.pop("candidates")
        return Ranking(pool.answer, pool.answer_generated, hits, pool.text_query, pool.gradient_query, timings)


def fuse(raw: dict[str, np.ndarray], coefficients: dict[str, dict[str, float]] = FUSION) -> np.ndarray:
    """The hybrid's score of every candidate: per method, z-score and log reciprocal rank, weighted
    by `coefficients` (the product's `FUSION`; bench/fusion.py scores others in the same shape)."""
    return combine(raw, coefficients["z"]) + rank_terms(raw, coefficients["log_rr"])


def hybrid_order(fused: np.ndarray, grad: np.ndarray, source_p: float = SOURCE_P) -> np.ndarray:
    """The hybrid's order of the pool: the likely sources (softmax(fused) ≥ `source_p`, and the top
    candidate always) by fused score, then every other candidate by its gradient score."""
    p = np.exp(fused - fused.max())
    head = p / p.sum() >= source_p
    head[np.argmax(fused)] = True
    first = np.flatnonzero(head)[np.argsort(-fused[head], kind="stable")]
    rest = np.flatnonzero(~head)
    return np.concatenate([first, rest[np.argsort(-grad[rest], kind="stable")]])


def pool_ranks(v: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate by score `v`, ties by position (the pool is in row order)."""
    ranks = np.empty(len(v), dtype=np.int64)
    ranks[np.argsort(-v, kind="stable")] = np.arange(1, len(v) + 1)
    return ranks


def zscores(v: np.ndarray) -> np.ndarray:
    """`v` standardised over the candidate pool; zeros when every candidate scores the same."""
    v = v.astype(np.float64)
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def rank_terms(raw: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of each method's log reciprocal rank over the candidate pool."""
    total = np.zeros_like(next(iter(raw.values())), dtype=np.float64)
    for m, w in weights.items():
        total -= w * np.log(pool_ranks(raw[m]))
    return total


def combine(raw: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of per-method z-scores over the candidate pool."""
    total = np.zeros_like(next(iter(raw.values())), dtype=np.float64)
    for m, w in weights.items():
        total += w * zscores(raw[m])
    return total
