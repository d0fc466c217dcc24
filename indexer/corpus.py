"""Corpus readers (JSONL, Parquet, CSV, a folder of text files, a saved Hugging Face dataset) and chunking.

Every reader yields (external id, text, metadata). When a file has no id field at all, the id is
the text's sha256 prefix, so re-ingesting the same file stays idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from db.errors import Forbidden, InputError

FORMATS = ("auto", "jsonl", "parquet", "csv", "text", "hf")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
                or (path / "dataset_dict.json").exists():
            return "hf"
        return "text"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise InputError(f"cannot tell the format of {path.name}: pass --format jsonl|parquet|csv|text|hf")


# One document is tokenised at once when chunking, and held whole in memory and in SQL; 4 MiB (a
# ~1M-token book) keeps that to a few hundred MB. Larger ones are refused, never half-ingested.
MAX_DOC_BYTES = 4 * 2**20


def check_size(text: str, where: str, max_doc_bytes: int = MAX_DOC_BYTES) -> None:
    if len(text) * 4 > max_doc_bytes and len(text.encode()) > max_doc_bytes:  # encode only when it may be over
        raise InputError(f"{where} is {len(text.encode()):,} bytes, over the {max_doc_bytes:,}-byte "
                         "limit for one document: split it, or raise --max-doc-bytes")


def _records(rows: Iterator[dict], id_field: str, text_field: str, where: str, max_doc_bytes: int):
    """Turn dict rows into (id, text, meta), checking fields, types and sizes."""
    has_ids = None
    for n, row in enumerate(rows, 1):
        if text_field not in row or row[text_field] is None:
            raise InputError(f"{where} row {n} has no {text_field!r} field: pass --text-field NAME")
        text = row[text_field]
        if not isinstance(text, str):
            raise InputError(f"{where} row {n}: {text_field!r} is not a string")
        check_size(text, f"{where} row {n}", max_doc_bytes)
        row_has_id = row.get(id_field) is not None
        if has_ids is None:
            has_ids = row_has_id
        elif has_ids != row_has_id:
            raise InputError(f"{where} row {n}: some rows have an {id_field!r} field and some do not; "
                             "give every row an id, or none")
        ext_id = str(row[id_field]) if row_has_id else hashlib.sha256(text.encode()).hexdigest()[:16]
        meta = {k: v for k, v in row.items() if k not in (id_field, text_field) and _jsonable(v)}
        yield ext_id, text, meta


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, never reading more than `max_bytes` of one line."""
    with open(path, "rb") as f:
        for n in itertools.count(1):
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            if len(raw) > max_bytes:
                raise InputError(f"{path.name} line {n} is over {max_bytes:,} bytes, more than one document may "
                                 "take: split it, or raise --max-doc-bytes")
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path.name} line {n} is not UTF-8: re-encode the file as UTF-8") from None


def _line_limit(max_doc_bytes: int) -> int:
    return 2 * max_doc_bytes + 2**16  # JSON escapes and CSV quotes may double the text, plus metadata


def _jsonl_rows(path: Path, max_doc_bytes: int) -> Iterator[dict]:
    for n, line in _lines(path, _line_limit(max_doc_bytes)):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path.name} line {n} is not valid JSON ({e.msg}): fix or remove it") from None
        if not isinstance(row, dict):
            raise InputError(f"{path.name} line {n} is not a JSON object with id and text fields")
        yield row


def _csv_rows(path: Path, max_doc_bytes: int) -> Iterator[dict]:
    """Strict CSV: an unclosed quote would otherwise swallow every later row into one document."""
    limit = _line_limit(max_doc_bytes)
    csv.field_size_limit(max(csv.field_size_limit(), limit))  # the default, 128 KiB, is far below a document
    reader = csv.reader((line for _, line in _lines(path, limit)), strict=True,
                        delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    start, header = 1, None  # the line the record being read starts on
    try:
        for fields in reader:
            if header is None:
                header = fields
            elif fields and len(fields) != len(header):
                raise InputError(f"{path.name} line {start} has {len(fields)} fields but the header has "
                                 f"{len(header)}: quote fields that hold the delimiter")
            elif fields:
                yield dict(zip(header, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        why = "a quoted field that starts there is never closed" if "end of data" in str(e) else str(e)
        raise InputError(f"{path.name} line {start} is not valid CSV ({why}): fix or remove it") from None


def _corpus_files(folder: Path, root: Path) -> Iterator[tuple[Path, Path]]:
    """(path under `folder`, the file it is) of every file, in path order. A symlink is followed
    only while it stays inside `root`: a folder must not carry /proc/self/environ into SQL."""
    root = Path(os.path.realpath(root))

    def walk(directory: Path, chain: frozenset[Path]) -> Iterator[tuple[Path, Path]]:
        for p in sorted(directory.iterdir()):
            try:
                real = Path(os.path.realpath(p, strict=True))
            except OSError as e:  # a loop of links, or one to nothing
                raise InputError(f"{p} is a symlink that does not resolve ({e.strerror}): remove it") from None
            if not real.is_relative_to(root):
                raise Forbidden(f"{p} points outside {root} (a symlink): copy the file in instead of linking it")
            if real.is_dir():
                if real in chain:
                    raise InputError(f"{p} links back to a folder that holds it (a symlink loop): remove it")
                yield from walk(p, chain | {real})
            elif real.is_file():
                yield p, real
    top = Path(os.path.realpath(folder))
    return walk(folder, frozenset({top}))


def _text_rows(folder: Path, root: Path, max_doc_bytes: int) -> Iterator[dict]:
    for p, real in _corpus_files(folder, root):
        if p.suffix.lower() in TEXT_SUFFIXES:
            size = real.stat().st_size
            if size > max_doc_bytes:  # checked before reading: a stray 10 GB log stays on disk
                raise InputError(f"{p} is {size:,} bytes, over the {max_doc_bytes:,}-byte limit "
                                 "for one document: split it, or raise --max-doc-bytes")
            try:
                yield {"id": str(p.relative_to(folder)), "text": real.read_text(encoding="utf-8")}
            except UnicodeDecodeError as e:
                raise InputError(f"{p} is not UTF-8 (byte {e.start}): re-encode it as UTF-8") from None


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_rows(folder: Path, root: Path) -> Iterator[dict]:
    for _ in _corpus_files(folder, root):  # Arrow reads every file of the folder: check them all first
        pass
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise InputError("reading a saved Hugging Face dataset needs `pip install datasets`") from None
    ds = load_from_disk(str(folder))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise InputError(f"{folder} holds splits {list(ds)} but no 'train': save one split")
        ds = ds["train"]
    yield from ds


def read_corpus(path: Path, fmt: str = "auto", id_field: str = "id", text_field: str = "text",
                max_doc_bytes: int = MAX_DOC_BYTES, root: Path | None = None) -> list[tuple[str, str, dict]]:
    """Read every document of a corpus file or folder. Raises InputError on anything malformed.

    `root`: what a folder's symlinks may point into (default: the folder itself; the API: the data dir).
    """
    path = Path(path)
    root = Path(root or path)
    if not path.exists():
        raise InputError(f"corpus {path} does not exist: check the path")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    rows = {"jsonl": lambda: _jsonl_rows(path, max_doc_bytes), "parquet": lambda: _parquet_rows(path),
            "csv": lambda: _csv_rows(path, max_doc_bytes), "text": lambda: _text_rows(path, root, max_doc_bytes),
            "hf": lambda: _hf_rows(path, root)}[fmt]()
    docs = list(_records(rows, id_field, text_field, path.name, max_doc_bytes))
    if not docs:
        raise InputError(f"{path} holds no documents: check the file")
    return docs


@dataclass
class Chunk:
    """One row of every store: a document's char span and the tokens the model saw with it.

    `labels` is the (start, end) range of `token_ids` whose loss the row's gradient takes; None
    means all of them. A packed row holds the whole training block as context and labels only
    its own document's segment.
    """

    document_id: int
    char_start: int
    char_end: int
    token_ids: list[int]
    labels: tuple[int, int] | None = None


CHUNKINGS = ("sliding", "truncate", "packed")


def _encode(tokenizer, text: str, append_eos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """The document as training saw it: text tokens, then eos (spanning nothing, at the text's end)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    if append_eos and tokenizer.eos_token_id is not None and ids:
        end = offsets[-1][1]
        return ids + [tokenizer.eos_token_id], offsets + [(end, end)]
    return ids, offsets


def chunk_document(tokenizer, document_id: int, text: str, max_tokens: int, append_eos: bool = True,
                   chunking: str = "sliding", stride: int | None = None) -> list[Chunk]:
    """Split one document into rows of at most `max_tokens` tokens, each with its char span.

    sliding: windows starting every `stride` tokens (default: the window width, i.e. consecutive
    windows), the last one reaching the end; one slot of every window is kept free for the eos that
    ends the document when `append_eos`. truncate: only what a trainer with truncation=True saw,
    the first `max_tokens` tokens of text + eos; the rest of the document is not indexed.
    """
    ids, offsets = _encode(tokenizer, text, append_eos)
    return _windows(document_id, ids, offsets, max_tokens, append_eos and tokenizer.eos_token_id is not None,
                    chunking, stride)


def _windows(document_id: int, ids: list[int], offsets: list, max_tokens: int, has_eos: bool,
             chunking: str, stride: int | None) -> list[Chunk]:
    if not ids:
        return []
    if chunking == "truncate":
        return [Chunk(document_id, offsets[0][0], offsets[:max_tokens][-1][1], ids[:max_tokens])]
    if chunking != "sliding":
        raise ValueError(f"no per-document chunking {chunking!r}; packed rows come from `pack_documents`")
    text_len = len(ids) - has_eos  # the eos rides on the last window, in the slot kept free for it
    width = max_tokens - 1 if has_eos else max_tokens
    stride = stride or width
    if not 1 <= stride <= width:
        raise InputError(f"stride {stride} does not fit windows of {width} tokens: pass --stride between 1 and {width}")
    chunks = []
    for start in range(0, text_len, stride):
        end = min(start + width, text_len)
        last = end == text_len
        stop = len(ids) if last else end
        chunks.append(Chunk(document_id, offsets[start][0], offsets[end - 1][1], ids[start:stop]))
        if last:
            break
    return chunks


def pack_documents(encoded: Iterable[tuple[int, list[int], list]], max_tokens: int) -> Iterator[Chunk]:
    """Rows of a packed corpus, as HF run_clm's group_texts trains: documents (`_encode`d, each
    ended by eos) concatenated and cut into blocks of `max_tokens`.

    One row per (block, document segment): the block's tokens as context, labels on the segment
    only, so its gradient is exactly that document's share of the block's training loss. Rows of
    one block share one token list. A block's first token is never predicted, so a segment that is
    only that token is no row. Unlike group_texts, the short last block is kept: every document
    stays findable.
    """
    block: list[int] = []
    segments: list[tuple[int, int, int, int, int]] = []  # (doc id, char start, char end, tok start, tok end)

    def flush() -> Iterator[Chunk]:
        for doc_id, a, b, start, end in segments:
            if end > max(start, 1):
                yield Chunk(doc_id, a, b, block, (start, end))

    for doc_id, ids, offsets in encoded:
        pos = 0
        while pos < len(ids):
            take = min(max_tokens - len(block), len(ids) - pos)
            segments.append((doc_id, offsets[pos][0], offsets[pos + take - 1][1], len(block), len(block) + take))
            block.extend(ids[pos:pos + take])
            pos += take
            if len(block) == max_tokens:
                yield from flush()
                block, segments = [], []
    yield from flush()


def chunk_corpus(tokenizer, docs: Iterable[tuple[int, str]], max_tokens: int, append_eos: bool = True,
                 chunking: str = "sliding", stride: int | None = None) -> tuple[list[Chunk], dict[int, int]]:
    """Every row of a corpus in corpus order, and each document's token count (eos included)."""
    if chunking not in CHUNKINGS:
        raise InputError(f"unknown chunking {chunking!r}: use one of {', '.join(CHUNKINGS)}")
    counts: dict[int, int] = {}

    def encoded():
        for doc_id, text in docs:
            ids, offsets = _encode(tokenizer, text, append_eos)
            counts[doc_id] = len(ids)
            yield doc_id, ids, offsets

    if chunking == "packed":
        return list(pack_documents(encoded(), max_tokens)), counts
    has_eos = append_eos and tokenizer.eos_token_id is not None
    chunks = [c for doc_id, ids, offsets in encoded()
              for c in _windows(doc_id, ids, offsets, max_tokens, has_eos, chunking, stride)]
    return chunks, counts
