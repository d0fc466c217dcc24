"""BM25 over the same rows as the other stores (bm25s, English stopwords, no stemming)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _tokenize(texts: list[str], return_ids: bool):
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)


def build(texts: list[str], folder: Path) -> None:
    import bm25s
    retriever = bm25s.BM25()
    retriever.index(_tokenize(texts, True), show_progress=False)
    retriever.save(str(folder))


class Lexical:
    def __init__(self, folder: Path):
        import bm25s
        self.retriever = bm25s.BM25.load(str(folder))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for `query`, (N,) float32; zeros when no query word is known."""
        tokens = _tokenize([query], False)[0]
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)
