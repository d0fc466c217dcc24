"""A build's plan on disk: every chunk (tokens, labels, text, document span) and how they split into shards.

The plan is written once, by the first stage of a build, into the build's partial directory on
the shared filesystem. Shard tasks on any machine memory-map it and read only their own rows;
the merge reads the texts (BM25) and the entries (index_entries rows). Flat arrays plus offsets
keep a 1M-chunk plan at a few GB of mapped files and a few MB of each shard's memory.

Shards are ranges of chunk positions, i.e. ranges of documents in corpus order. Their size is part
of the build config, so the shard boundaries, and with them every batch and every float, are the
same however many workers take the shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.corpus import Chunk
from indexer.store import atomic_dir

PLAN = "plan"


def shard_ranges(rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


def write_plan(folder: Path, chunks: list[Chunk], texts: list[str], doc_tokens: dict[int, int],
               shard_size: int, extra: dict) -> None:
    """Write `folder/plan/` atomically (a concurrent duplicate run keeps the first one)."""
    with atomic_dir(folder / PLAN) as tmp:
        # rows of one packed block share its token list: stored once, named by a (start, end) per row
        stored, spans, total = [], [], 0
        for i, c in enumerate(chunks):
            if not (i and c.token_ids is chunks[i - 1].token_ids):
                stored.append(c.token_ids)
                total += len(c.token_ids)
            spans.append((total - len(c.token_ids), total))
        np.save(tmp / "tokens.npy", np.fromiter((t for ids in stored for t in ids), dtype=np.int32, count=total))
        np.save(tmp / "token_spans.npy", np.array(spans, dtype=np.int64).reshape(-1, 2))
        np.save(tmp / "labels.npy", np.array([c.labels or (-1, -1) for c in chunks], dtype=np.int64).reshape(-1, 2))
        blobs = [t.encode("utf-8") for t in texts]
        (tmp / "texts.bin").write_bytes(b"".join(blobs))
        np.save(tmp / "text_offsets.npy", np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64))
        np.save(tmp / "entries.npy", np.array([(c.document_id, c.char_start, c.char_end) for c in chunks],
                                               dtype=np.int64).reshape(-1, 3))
        np.save(tmp / "doc_tokens.npy", np.array(sorted(doc_tokens.items()), dtype=np.int64).reshape(-1, 2))
        meta = {"rows": len(chunks), "shard_size": shard_size, "shards": shard_ranges(len(chunks), shard_size),
                "tokens": total, **extra}
        (tmp / "plan.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


@dataclass
class Plan:
    folder: Path
    meta: dict

    @classmethod
    def load(cls, build_dir: Path) -> Plan:
        folder = Path(build_dir) / PLAN
        return cls(folder, json.loads((folder / "plan.json").read_text()))

    @classmethod
    def exists(cls, build_dir: Path) -> bool:
        return (Path(build_dir) / PLAN / "plan.json").exists()

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    @property
    def shards(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.meta["shards"]]

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def chunks(self, start: int, end: int) -> list[Chunk]:
        tokens, spans, entries = self._array("tokens"), self._array("token_spans"), self._array("entries")
        labels = self._array("labels")
        return [Chunk(int(entries[i, 0]), int(entries[i, 1]), int(entries[i, 2]),
                      tokens[spans[i, 0]:spans[i, 1]].tolist(),
                      None if labels[i, 0] < 0 else (int(labels[i, 0]), int(labels[i, 1])))
                for i in range(start, end)]

    def texts(self, start: int, end: int) -> list[str]:
        offsets = self._array("text_offsets")
        with open(self.folder / "texts.bin", "rb") as f:
            f.seek(int(offsets[start]))
            blob = f.read(int(offsets[end] - offsets[start]))
        base = int(offsets[start])
        return [blob[int(a) - base:int(b) - base].decode("utf-8") for a, b in zip(offsets[start:end], offsets[start + 1:end + 1])]

    def entries(self) -> list[tuple[int, int, int]]:
        """(document id, char start, char end) of every row, in row order."""
        return [tuple(map(int, row)) for row in self._array("entries")]

    def doc_tokens(self) -> dict[int, int]:
        """Token count of every document of the corpus (0 for empty ones), by document id."""
        return {int(d): int(n) for d, n in self._array("doc_tokens")}
