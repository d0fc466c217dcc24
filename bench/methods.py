"""Every attribution method of the quality benchmark, scoring all rows of one build for one answer.

The product's stores hold one feature kind (Adam + EK-FAC + unit norm, over checkpoints); the
baselines need the raw projected gradients too, which `compute_shard` produces for the same rows.
All methods see the same model, rows and query text (question + the model's answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attribution.tracer import Tracer, encode_qa
from indexer import curvature, semantic
from indexer.build import checkpoint_weights, compute_shard
from indexer.config import BuildConfig
from indexer.curvature import Stats
from indexer.gradients import collate, featurizer_for
from indexer.config import GradientConfig

METHODS = ("bm25 (q)", "bm25 (q+a)", "dense (q+a)", "repsim", "grad dot", "grad cosine", "tracin",
           "tracin cosine", "ekfac influence", "trackstar", "hybrid", "hybrid + exact rerank")


@dataclass
class RawGradients:
    """Per-checkpoint raw projected gradients of every row, and their query-side featurizers."""

    rows: list[np.ndarray]  # per checkpoint (N, D_c) float32
    config: GradientConfig
    curvatures: list = field(default_factory=list)

    @classmethod
    def compute(cls, folder: Path, tracer: Tracer, token_ids: list[list[int]], adam: bool, ekfac: bool):
        from indexer.corpus import Chunk
        config = GradientConfig(k_in=tracer.config.gradient.k_in, k_out=tracer.config.gradient.k_out,
                                seed=tracer.config.gradient.seed, optimizer_norm=adam, curvature="none")
        if not (folder / "meta.json").exists():
            chunks = [Chunk(0, 0, 0, ids) for ids in token_ids]
            compute_shard(folder, chunks, tracer.ckpts, BuildConfig(gradient=config), lambda *a: None)
        rows = [np.load(folder / f"raw-c{c}.npy") for c in range(len(tracer.ckpts))]
        curvs = [curvature.fit(Stats.load(folder / f"stats-c{c}.npz"), [r], tracer.config.gradient.damping)
                 for c, r in enumerate(rows)] if ekfac else []
        return cls(rows, config, curvs)


class Scorer:
    """Scores of every method for one (question, answer) over all rows."""

    def __init__(self, folder: Path, tracer: Tracer, token_ids: list[list[int]]):
        self.tracer = tracer
        self.plain = RawGradients.compute(folder / "raw-plain", tracer, token_ids, adam=False, ekfac=False)
        self.adam = RawGradients.compute(folder / "raw-adam", tracer, token_ids, adam=True, ekfac=True)
        self.lr = checkpoint_weights(tracer.ckpts, "lr")
        self.lr = [w * w for w in self.lr]  # lr_c / Σ lr
        self.ekfac_rows = [c.apply(r) for c, r in zip(self.adam.curvatures, self.adam.rows)]
        self._featurizers = {}
        self.reps = self._representations(token_ids)

    def _featurizer(self, c: int, kind: str):
        if (c, kind) not in self._featurizers:
            config = (self.plain if kind == "plain" else self.adam).config
            self._featurizers[(c, kind)] = featurizer_for(self.tracer.ckpts[c], config)
        return self._featurizers[(c, kind)]

    def _query(self, question: str, answer: str, c: int, kind: str) -> np.ndarray:
        _, tokenizer, feat = self._featurizer(c, kind)
        ids, first = encode_qa(tokenizer, question, answer)
        return feat.features(*collate([ids], tokenizer.pad_token_id, label_from=[first]))[0].numpy()

    def _representations(self, token_ids: list[list[int]]) -> np.ndarray:
        """Mean last hidden state of the last checkpoint, unit norm. (N, d)"""
        model, tokenizer, _ = self._featurizer(len(self.tracer.ckpts) - 1, "plain")
        out = []
        with torch.inference_mode():
            for start in range(0, len(token_ids), 32):
                ids, mask, _ = collate(token_ids[start:start + 32], tokenizer.pad_token_id)
                h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                m = mask[..., None].float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy())
        return np.concatenate(out)

    def _query_rep(self, text: str) -> np.ndarray:
        model, tokenizer, _ = self._featurizer(len(self.tracer.ckpts) - 1, "plain")
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        return torch.nn.functional.normalize(h, dim=0).numpy()

    def scores(self, question: str, answer: str) -> dict[str, np.ndarray]:
        t, text = self.tracer, question + answer
        n_ckpt = len(t.ckpts)
        plain_q = [self._query(question, answer, c, "plain") for c in range(n_ckpt)]
        adam_q = [self._query(question, answer, c, "adam") for c in range(n_ckpt)]
        last = n_ckpt - 1
        cos = lambda rows, q: rows @ q / (np.linalg.norm(rows, axis=1) * np.linalg.norm(q) + 1e-30)
        s = {
            "bm25 (q)": t.lexical.scores(question),
            "bm25 (q+a)": t.lexical.scores(text),
            "dense (q+a)": t.dense.astype(np.float32) @ semantic.embed([text])[0],
            "repsim": self.reps @ self._query_rep(text),
            "grad dot": self.plain.rows[last] @ plain_q[last],
            "grad cosine": cos(self.plain.rows[last], plain_q[last]),
            "tracin": sum(lr * (r @ q) for lr, r, q in zip(self.lr, self.plain.rows, plain_q)),
            "tracin cosine": sum(lr * cos(r, q) for lr, r, q in zip(self.lr, self.plain.rows, plain_q)),
            "ekfac influence": sum(lr * (r @ c.apply(q[None])[0]) for lr, r, c, q in
                                   zip(self.lr, self.ekfac_rows, self.adam.curvatures, adam_q)),
            "trackstar": t.grad.astype(np.float32) @ t.query_gradient(question, answer),
        }
        return s
