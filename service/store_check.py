"""Does a build's store agree with SQL? The build checks of `wherefrom doctor`.

SQL says which rows exist (`index_entries`, positions 0..N-1) and which are dead (their documents
are tombstoned). The store must hold N rows in every array, list exactly the dead rows in
`removed.npy`, hold exactly the live rows in each FAISS index and in BM25, and hash to the checksum
that info.json and the build row recorded when it was published.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from db.update_repo import EntryFacts


def build_problem(folder: Path, build, facts: EntryFacts) -> str | None:
    """The first disagreement of the store in `folder` with SQL, or None. Dead rows still
    searchable are reported by `dead_rows`."""
    from indexer import store
    if not (folder / store.INFO).exists():
        return f"{folder} has no info.json"
    info = store.read_info(folder)
    rows = info.get("rows")
    if not rows == build.row_count == facts.count:
        return f"row counts disagree: info.json {rows}, build {build.row_count}, index_entries {facts.count}"
    if facts.count and (facts.first, facts.last) != (0, rows - 1):
        return f"index_entries positions run {facts.first}..{facts.last}, not 0..{rows - 1}"
    missing = store.missing(folder)
    if missing:
        return f"{folder} lacks {', '.join(missing)}"
    for name in ("grad", "dense"):
        try:
            n = store.open_array(folder, name).shape[0]
        except ValueError as e:  # a truncated file no longer maps
            return f"{name}.npy cannot be read ({e})"
        if n != rows:
            return f"{name}.npy has {n} rows, index_entries {rows}"
    removed = store.removed_rows(folder)
    extra = np.setdiff1d(removed, facts.dead)
    if len(extra):
        return f"{len(extra)} removed row(s) (e.g. {extra[0]}) belong to documents that are not deleted"
    live = np.setdiff1d(np.arange(rows), removed)
    return (_index_problem(folder, live) or _bm25_problem(folder, live, rows)
            or _checksum_problem(folder, info, build.checksum))


def dead_rows(folder: Path, facts: EntryFacts) -> list[int]:
    """Rows of deleted documents that the store in `folder` has not removed (still searchable)."""
    from indexer import store
    return sorted(set(facts.dead) - set(store.removed_rows(folder).tolist()))


def _index_problem(folder: Path, live: np.ndarray) -> str | None:
    import faiss

    from indexer import ann
    for name in ("grad.faiss", "dense.faiss"):
        index = ann.read_faiss(folder / name)
        ids = np.sort(faiss.vector_to_array(index.id_map)) if hasattr(index, "id_map") else None
        if ids is None or index.ntotal != len(live) or not np.array_equal(ids, live):
            have = set() if ids is None else set(ids.tolist())
            lost, stray = sorted(set(live.tolist()) - have), sorted(have - set(live.tolist()))
            return (f"{name} holds {index.ntotal} vectors for {len(live)} live rows"
                    + (f"; missing ids e.g. {lost[:3]}" if lost else "") + (f"; ids not live e.g. {stray[:3]}" if stray else ""))
    return None


def _bm25_problem(folder: Path, live: np.ndarray, rows: int) -> str | None:
    from indexer.lexical import Lexical
    scored, total = Lexical(folder / "bm25").rows()
    if total != rows or not np.array_equal(np.sort(scored), live):
        return f"BM25 scores {len(scored)} rows of {total}, the store has {len(live)} live rows of {rows}"
    return None


def _checksum_problem(folder: Path, info: dict, recorded: str | None) -> str | None:
    from indexer import store
    actual = store.checksum(folder)
    if actual != info.get("checksum") or (recorded and recorded != actual):
        return (f"files changed since publication: checksum {actual[:12]}, info.json {str(info.get('checksum'))[:12]}, "
                f"build row {str(recorded)[:12]}")
    return None
