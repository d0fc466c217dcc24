"""Corpus readers on every format, their errors, and chunking with character spans."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from db.errors import InputError
from indexer.corpus import chunk_document, read_corpus

DOCS = [{"id": "a", "text": "Alvena was born in 1850.", "lang": "en"}, {"id": "b", "text": "Rain in Porto."}]


def test_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in DOCS) + "\n")
    assert read_corpus(p) == [("a", DOCS[0]["text"], {"lang": "en"}), ("b", DOCS[1]["text"], {})]


def test_parquet_csv_text_folder_and_hf_dataset(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": d["id"], "text": d["text"]} for d in DOCS]), tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text("id,text\na,Alvena was born in 1850.\nb,Rain in Porto.\n")
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0]["text"])
    (folder / "sub" / "b.txt").write_text(DOCS[1]["text"])
    from datasets import Dataset
    Dataset.from_list([{"id": d["id"], "text": d["text"]} for d in DOCS]).save_to_disk(str(tmp_path / "hf"))
    want = [(d["id"], d["text"]) for d in DOCS]
    for path in ("c.parquet", "c.csv", "hf"):
        assert [(i, t) for i, t, _ in read_corpus(tmp_path / path)] == want, path
    assert [(i, t) for i, t, _ in read_corpus(folder)] == [("a.txt", DOCS[0]["text"]), ("sub/b.txt", DOCS[1]["text"])]


def test_missing_ids_become_content_hashes(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "x"}) + "\n")
    (ext_id, _, _), = read_corpus(p)
    assert ext_id == read_corpus(p)[0][0] and len(ext_id) == 16


@pytest.mark.parametrize("content,message", [
    (b"", "holds no documents"),
    (b'{"id": "a", "text": "ok"}\n\xff\xfe bad\n', "line 2 is not UTF-8"),
    (b'{"id": "a", "body": "no text"}\n', "has no 'text' field"),
    (b'{"id": "a", "text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
    (b'{"id": "a", "text": "ok"}\n{"text": "no id"}\n', "some rows have an 'id' field"),
    (b'[1, 2]\n', "not a JSON object"),
])
def test_malformed_jsonl_is_refused_with_a_fix(tmp_path, content, message):
    p = tmp_path / "c.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_corpus(p)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "c.xml").write_text("<x/>")
    with pytest.raises(InputError, match="--format"):
        read_corpus(tmp_path / "c.xml")


def test_chunks_cover_the_document_and_fit_the_context(trained):
    from indexer.loading import load_model
    from indexer.modelio import discover_checkpoints
    _, tok = load_model(discover_checkpoints(trained[0])[-1].path)
    text = " ".join(f"Alvena Ashgrove was born in {1800 + i}." for i in range(30))
    chunks = chunk_document(tok, 7, text, max_tokens=16)
    assert len(chunks) > 5
    assert all(len(c.token_ids) <= 16 and c.document_id == 7 for c in chunks)
    assert chunks[-1].token_ids[-1] == tok.eos_token_id
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
    assert all(a.char_end <= b.char_start for a, b in zip(chunks, chunks[1:]))
    body = [t for c in chunks for t in c.token_ids][:-1]
    assert body == tok(text, add_special_tokens=False)["input_ids"]
    assert chunk_document(tok, 1, "", 16) == []
