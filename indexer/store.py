"""Stores on disk: (N × D) float16 memmaps and a self-describing info.json (FAISS indexes: `indexer.ann`).

A build is written into `<name>.partial/` and published by one rename, so a reader never sees
half a store. Every file is a pure function of its content (no timestamps inside), so two builds
of the same plan have the same `checksum`, however many workers computed their shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import uuid
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

INFO = "info.json"
BLOCK = 8192  # rows per streamed block (FAISS adds, EK-FAC passes): 128 MB of float32 at 4096 dims


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("wherefrom")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+{sha}" if sha else version


def create_array(folder: Path, name: str, rows: int, dim: int) -> np.memmap:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, dim))


def open_array(folder: Path, name: str) -> np.memmap:
    return np.load(folder / f"{name}.npy", mmap_mode="r")


def release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's resident pages from this process (written ones are flushed
    first; the data stays in the file and the page cache). Streaming through a store otherwise
    leaves every page it touched mapped, and the process's resident memory grows with the corpus."""
    mm = getattr(array, "_mmap", None)
    if mm is None:
        return
    if isinstance(array, np.memmap) and array.mode in ("r+", "w+"):
        array.flush()
    mm.madvise(mmap.MADV_DONTNEED)


def write_info(folder: Path, info: dict) -> None:
    (folder / INFO).write_text(json.dumps(info, indent=2, sort_keys=True))


def read_info(folder: Path) -> dict:
    info = json.loads((Path(folder) / INFO).read_text())
    if not isinstance(info, dict):
        raise ValueError(f"{INFO} holds no JSON object")
    return info


FILES = ("grad.npy", "dense.npy", "grad.faiss", "dense.faiss", "bm25")  # besides info.json


def missing(folder: Path) -> list[str]:
    """The store files `folder` lacks."""
    return [n for n in FILES if not (Path(folder) / n).exists()]


# what json, numpy, FAISS and bm25s raise on a store file that is missing, truncated or garbage
UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, zipfile.BadZipFile)


def describe(error: BaseException) -> str:
    """One line naming a failure, for messages: its type and the first line of what it says."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` without the zip entries' timestamps: the same arrays always give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def checksum(folder: Path) -> str:
    """sha256 over the relative path and bytes of every file but info.json (timings live there)."""
    folder, h = Path(folder), hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INFO):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(final: Path):
    """Yield a fresh sibling temp directory; rename it to `final` when the block succeeds.

    When `final` already exists another run of the same idempotent work got there first: ours is
    dropped. The parent must exist, so work for a build that was removed stops here.
    """
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


REMOVED = "removed.npy"  # sorted store rows of deleted documents: absent from FAISS and BM25


def removed_rows(folder: Path) -> np.ndarray:
    """Rows whose documents were deleted (`wherefrom delete`); they stay in the arrays, ids are stable."""
    path = Path(folder) / REMOVED
    return np.load(path) if path.exists() else np.zeros(0, dtype=np.int64)


def partial_dir(final: Path) -> tuple[Path, int]:
    """A fresh `<final>.partial` directory and a descriptor holding a shared lock on it until closed:
    `wherefrom doctor --fix` removes no locked folder. Made under a hidden name, locked, then
    renamed, so no one sees it unlocked. A leftover from a crashed run is removed first."""
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    tmp = final.with_name(f".{partial.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_SH)
    tmp.rename(partial)
    return partial, lock


@contextmanager
def unlocked(folder: Path):
    """Yield whether no live process holds `folder`'s lock (`partial_dir`): then this process holds
    it, exclusively, until the block ends, so no one can take the folder meanwhile."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:  # its owner finished meanwhile
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> None:
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    partial.rename(final)
