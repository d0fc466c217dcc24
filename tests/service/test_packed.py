"""A packed build end to end: index with --chunking packed, trace, and land on the fact's span."""

import json

from db.engine import transaction
from sqlalchemy import select

from db.models import Document, IndexBuild, IndexEntry


def test_packed_build_traces_to_the_span_that_states_the_fact(run_cli, settings, monkeypatch, trained, tiny_world,
                                                              tmp_path):
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(settings.data_dir))
    corpus, _ = tiny_world.write(tmp_path / "world")
    assert run_cli("ingest", corpus, "--corpus", "w")[0] == 0
    assert run_cli("model", "add", trained[0], "--name", "m")[0] == 0
    for args, message in [(("--chunking", "spiral"), "chunking must be one of sliding, truncate, packed"),
                          (("--chunking", "packed", "--stride", 8), "for --chunking sliding only"),
                          (("--stride", 64), "pass --stride between 1 and 63")]:
        code, _, err = run_cli("index", "--corpus", "w", "--model", "m", *args)
        assert code == 2 and message in err, err
    assert not settings.stores.exists() or not any(settings.stores.iterdir())
    code, out, err = run_cli("index", "--corpus", "w", "--model", "m", "--chunking", "packed")
    assert code == 0, err
    texts = {d["id"]: d["text"] for d in tiny_world.documents}
    with transaction(settings.database_url) as s:
        build = s.scalars(select(IndexBuild)).one()
        assert build.config["chunking"] == "packed"
        spans = s.execute(select(Document.external_id, IndexEntry.char_start, IndexEntry.char_end)
                          .join(Document, Document.id == IndexEntry.document_id)
                          .where(IndexEntry.build_id == build.id)).all()
    assert len(spans) > len(texts)  # documents cut across blocks give several rows
    assert any(b - a < len(texts[d]) for d, a, b in spans)

    def stated(q, doc, a, b):
        return doc in q.source_ids and q.answer in texts[doc][a:b]

    # facts whose document no block boundary cut: a cut one is split from its subject in training too
    whole = {d for d, a, b in spans if (a, b) == (0, len(texts[d]))}
    single = [q for q in tiny_world.questions if q.n_paraphrases == 1 and set(q.source_ids) <= whole]
    assert len(single) >= 3
    found = 0
    for q in single:
        code, out, err = run_cli("trace", q.prompt, "--answer", " " + q.answer, "--k", 3, "--json")
        assert code == 0, err
        top = json.loads(out)["hits"][0]
        found += stated(q, top["external_id"], top["char_start"], top["char_end"])
    assert found == len(single), f"{found}/{len(single)}"
