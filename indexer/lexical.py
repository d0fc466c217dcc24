"""BM25 over the same rows as the other stores (bm25s, English stopwords, no stemming).

After documents are deleted, BM25 is refitted over the live rows only (its IDF then equals a fresh
build's) and `positions.npy` maps its rows back to store rows; deleted rows score 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIONS = "positions.npy"


def _tokenize(texts: list[str], return_ids: bool):
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)


def build(texts: list[str], folder: Path, positions: np.ndarray | None = None, rows: int | None = None) -> None:
    """BM25 of `texts`; with `positions`, text i is store row positions[i] of `rows` in all."""
    import bm25s
    retriever = bm25s.BM25()
    retriever.index(_tokenize(texts, True), show_progress=False)
    retriever.save(str(folder))
    if positions is not None:
        np.save(Path(folder) / POSITIONS, np.append(np.asarray(positions, dtype=np.int64), rows))


class Lexical:
    def __init__(self, folder: Path):
        import bm25s
        self.retriever = bm25s.BM25.load(str(folder))
        mapped = Path(folder) / POSITIONS
        self.positions = np.load(mapped) if mapped.exists() else None  # rows' positions, then the row count

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every store row for `query`, (N,) float32; zeros when no query word is known."""
        tokens = _tokenize([query], False)[0]
        scores = np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)
        if self.positions is None:
            return scores
        out = np.zeros(int(self.positions[-1]), dtype=np.float32)
        out[self.positions[:-1]] = scores
        return out

    def rows(self) -> tuple[np.ndarray, int]:
        """(the store rows it scores, in its own row order; the store's row count), for `wherefrom doctor`."""
        n = int(self.retriever.scores["num_docs"])
        if self.positions is None:
            return np.arange(n), n
        return self.positions[:-1], int(self.positions[-1])
