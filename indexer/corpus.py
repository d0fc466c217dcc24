"""Corpus readers (JSONL, Parquet, CSV, a folder of text files, a saved Hugging Face dataset) and chunking.

Every reader yields (external id, text, metadata). When a file has no id field at all, the id is
the text's sha256 prefix, so re-ingesting the same file stays idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from db.errors import InputError

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


def _records(rows: Iterator[dict], id_field: str, text_field: str, where: str):
    """Turn dict rows into (id, text, meta), checking fields and types."""
    has_ids = None
    for n, row in enumerate(rows, 1):
        if text_field not in row or row[text_field] is None:
            raise InputError(f"{where} row {n} has no {text_field!r} field: pass --text-field NAME")
        text = row[text_field]
        if not isinstance(text, str):
            raise InputError(f"{where} row {n}: {text_field!r} is not a string")
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


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"{path.name} line {n} is not UTF-8: re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path.name} line {n} is not valid JSON ({e.msg}): fix or remove it") from None
            if not isinstance(row, dict):
                raise InputError(f"{path.name} line {n} is not a JSON object with id and text fields")
            yield row


def _text_rows(folder: Path) -> Iterator[dict]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
            try:
                yield {"id": str(p.relative_to(folder)), "text": p.read_text(encoding="utf-8")}
            except UnicodeDecodeError:
                raise InputError(f"{p} is not UTF-8: re-encode it as UTF-8") from None


def _hf_rows(folder: Path) -> Iterator[dict]:
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


def read_corpus(path: Path, fmt: str = "auto", id_field: str = "id",
                text_field: str = "text") -> list[tuple[str, str, dict]]:
    """Read every document of a corpus file or folder. Raises InputError on anything malformed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"corpus {path} does not exist: check the path")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        rows = _jsonl_rows(path)
    elif fmt == "parquet":
        import pyarrow.parquet as pq
        rows = iter(pq.read_table(path).to_pylist())
    elif fmt == "csv":
        rows = csv.DictReader(open(path, newline="", encoding="utf-8"),
                              delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    elif fmt == "text":
        rows = _text_rows(path)
    else:
        rows = _hf_rows(path)
    docs = list(_records(rows, id_field, text_field, path.name))
    if not docs:
        raise InputError(f"{path} holds no documents: check the file")
    return docs


@dataclass
class Chunk:
    """A span of a document that fits the model's context: one row of every store."""

    document_id: int
    char_start: int
    char_end: int
    token_ids: list[int]


def chunk_document(tokenizer, document_id: int, text: str, max_tokens: int,
                   append_eos: bool = True) -> list[Chunk]:
    """Split a document into consecutive windows of at most `max_tokens` tokens.

    The eos token ends the last window when `append_eos`, as when the model was trained on one
    document per example; one slot is kept free for it in every window.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return []
    width = max_tokens - 1 if append_eos else max_tokens
    chunks = []
    for start in range(0, len(ids), width):
        part = ids[start:start + width]
        span = offsets[start:start + width]
        chunks.append(Chunk(document_id, span[0][0], span[-1][1], list(part)))
    if append_eos and tokenizer.eos_token_id is not None:
        chunks[-1].token_ids.append(tokenizer.eos_token_id)
    return chunks
