"""Chunking modes: every row's char span maps back to its document, and the rows cover what training saw."""

import numpy as np
import pytest

from db.errors import InputError
from indexer.corpus import chunk_corpus, chunk_document
from indexer.gradients import collate
from indexer.plan import Plan, write_plan

DOCS = [(1, " ".join(f"Alvena Ashgrove was born in {1800 + i} in Porto." for i in range(12))),
        (2, "Rain in Porto."),
        (3, ""),
        (4, " ".join(f"Bram Kettle moved to Ghent in {1900 + i}." for i in range(7)))]
TEXT = dict(DOCS)


@pytest.fixture(scope="module")
def tok():
    from service.demo.train import train_tokenizer
    return train_tokenizer([t for _, t in DOCS] * 3, vocab_size=300)


def labelled(c):
    return c.labels or (0, len(c.token_ids))


def words(tok, ids) -> list[str]:
    return tok.decode([i for i in ids if i != tok.eos_token_id]).split()


def assert_spans_map_back(tok, chunks):
    for c in chunks:
        a, b = labelled(c)
        assert words(tok, c.token_ids[a:b]) == TEXT[c.document_id][c.char_start:c.char_end].split(), c


def text_tokens(tok, doc_id):
    return tok(TEXT[doc_id], add_special_tokens=False)["input_ids"]


def test_truncate_keeps_the_first_window_only(tok):
    chunks, counts = chunk_corpus(tok, DOCS, 16, chunking="truncate")
    assert [c.document_id for c in chunks] == [1, 2, 4]  # the empty document has no row
    assert_spans_map_back(tok, chunks)
    long, short = chunks[0], chunks[1]
    assert len(long.token_ids) == 16 and long.token_ids == text_tokens(tok, 1)[:16]
    assert long.char_start == 0 and long.char_end < len(TEXT[1]) / 4  # the tail is not indexed
    assert short.token_ids == text_tokens(tok, 2) + [tok.eos_token_id] and short.char_end == len(TEXT[2])
    assert counts == {d: len(text_tokens(tok, d)) + (d != 3) for d, _ in DOCS}


def test_sliding_windows_overlap_and_cover_every_token(tok):
    width = 15  # 16 minus the slot kept for eos
    chunks = chunk_document(tok, 1, TEXT[1], 16, chunking="sliding", stride=7)
    ids = text_tokens(tok, 1)
    assert_spans_map_back(tok, chunks)
    assert all(len(c.token_ids) <= 16 for c in chunks)
    starts = list(range(0, len(ids), 7))[:len(chunks)]
    for c, start in zip(chunks[:-1], starts):
        assert c.token_ids == ids[start:start + width]
    assert chunks[-1].token_ids == ids[starts[-1]:] + [tok.eos_token_id] and chunks[-1].char_end == len(TEXT[1])
    assert all(b.char_start < a.char_end for a, b in zip(chunks, chunks[1:]))  # overlapping
    covered = {i for start in starts for i in range(start, min(start + width, len(ids)))}
    assert covered == set(range(len(ids)))
    # the default stride is the window width: consecutive windows, as before chunking had modes
    plain = chunk_document(tok, 1, TEXT[1], 16)
    assert [t for c in plain for t in c.token_ids] == ids + [tok.eos_token_id]
    with pytest.raises(InputError, match="--stride between 1 and 15"):
        chunk_document(tok, 1, TEXT[1], 16, stride=16)


def test_packed_rows_cover_each_token_once_with_labels_on_their_segment(tok, tmp_path):
    chunks, _ = chunk_corpus(tok, DOCS, 16, chunking="packed")
    stream = [t for d, _ in DOCS if TEXT[d] for t in text_tokens(tok, d) + [tok.eos_token_id]]
    blocks = []  # distinct token lists, in order: the training blocks
    for c in chunks:
        if not blocks or c.token_ids is not blocks[-1]:
            blocks.append(c.token_ids)
    assert [t for b in blocks for t in b] == stream
    assert all(len(b) == 16 for b in blocks[:-1])
    assert_spans_map_back(tok, chunks)
    # every position of every block is one row's label, except a block's first (never predicted)
    for b in blocks:
        rows = [labelled(c) for c in chunks if c.token_ids is b]
        owned = sorted(i for a, e in rows for i in range(a, e))
        assert owned in (list(range(len(b))), list(range(1, len(b))))
    assert {c.document_id for c in chunks} == {1, 2, 4}
    assert any(len({c.document_id for c in chunks if c.token_ids is b}) > 1 for b in blocks)
    # the loss of a row is confined to its segment
    rows = chunks[:4]
    _, mask, labels = collate([c.token_ids for c in rows], tok.pad_token_id, label_spans=[c.labels for c in rows])
    for r, c in enumerate(rows):
        a, e = c.labels
        assert (labels[r, a:e] == mask.new_tensor(c.token_ids[a:e])).all()
        assert (labels[r, :a] == -100).all() and (labels[r, e:] == -100).all()
    # the plan stores each block once and gives every row its block and labels back
    texts = [TEXT[c.document_id][c.char_start:c.char_end] for c in chunks]
    write_plan(tmp_path, chunks, texts, {}, shard_size=5, extra={})
    plan = Plan.load(tmp_path)
    assert plan.chunks(0, len(chunks)) == chunks
    assert len(np.load(tmp_path / "plan" / "tokens.npy")) == len(stream)
