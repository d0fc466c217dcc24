"""`wherefrom model add` finds a training store and `wherefrom index --from-training` publishes it:
a build whose rows are the documents training saw, one gradient block per saved checkpoint,
traceable like any other; refusals are one line, exit code 2, nothing changed."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from indexer import store
from indexer.callback import WherefromCallback
from service import catalog
from service.settings import Settings
from tests.service.test_hostile_input import state


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_world):
    """The tiny world trained with the callback (3 saves) and ingested as corpus `w`."""
    from service.demo.train import TrainConfig, train
    root = tmp_path_factory.mktemp("from-training")
    config = TrainConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=512, epochs=12, batch_size=8,
                         n_checkpoints=3, seed=7)
    docs = tiny_world.documents
    train([d["text"] for d in docs], root / "model", config, callback=WherefromCallback(row_ids=[d["id"] for d in docs]))
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    corpus, _ = tiny_world.write(root / "world")
    catalog.ingest(settings, corpus, "w")
    return SimpleNamespace(settings=settings, model=root / "model", world=tiny_world, root=root)


@pytest.fixture
def cli(recorded, run_cli, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    return lambda *args: run_cli(*args, env={"WHEREFROM_DATA_DIR": str(recorded.settings.data_dir)})


def test_model_add_finds_the_store_and_index_publishes_it_without_a_corpus_pass(recorded, cli, monkeypatch):
    code, out, _ = cli("model", "add", recorded.model, "--name", "t")
    assert code == 0 and "training store: " in out and f"{len(recorded.world.documents)} documents" in out
    import indexer.build
    monkeypatch.setattr(indexer.build, "featurizer_for", None)  # a gradient pass over the corpus would fail
    code, out, err = cli("index", "--from-training", "-c", "w", "-m", "t")
    assert code == 0, err
    assert "(from training)" in out and "3 checkpoint(s)" in out
    build_id = int(out.split()[1])
    from db import repo
    from db.engine import transaction
    with transaction(recorded.settings.database_url) as s:
        build = repo.get_build(s, build_id)
        folder, entries = recorded.settings.resolve_store(build.store_path), repo.entries_at(s, build_id, range(build.row_count))
        texts = {d.external_id: d.text for d in repo.corpus_documents(s, build.corpus_id)}
    info = store.read_info(folder)
    assert not Path(build.store_path).is_absolute()  # relative to the data directory, as every build
    assert info["rows"] == len(recorded.world.documents) == len(entries)
    assert len(info["checkpoints"]) == len(info["gradient"]["weights"]) == 3
    # each row is its document's whole text; the store's rows are unit norm over the three blocks
    assert sorted(texts[d.external_id] for _, (e, d) in entries.items()) == sorted(texts.values())
    grad = store.open_array(folder, "grad").astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(grad, axis=1), 1.0, atol=2e-3)
    assert info["from_training"]["exposures"] == 12 * len(recorded.world.documents)
    # every recorded step's K-FAC sums land in exactly one checkpoint's block
    from indexer.curvature import load_state
    units = sorted((recorded.model / "wherefrom" / "rank-00000").glob("unit-*"))
    recorded_a = sum(np.load(u / "stats.npz")["1.a"].sum(0) for u in units)
    published = [load_state(folder / f"kfac-c{c}.npz")[0] for c in range(3)]
    name = list(published[0].layers)[1]
    np.testing.assert_allclose(sum(p.layers[name].a_sum for p in published), recorded_a, rtol=1e-9)
    assert all(p.layers[name].tokens > 0 for p in published)
    # tracing it: the query gradient per checkpoint against its block; the source is found
    q = recorded.world.questions[0]
    code, out, err = cli("trace", q.prompt, "--answer", q.answer, "-c", "w", "-m", "t", "--json")
    assert code == 0, err
    hits = [h["external_id"] for h in json.loads(out)["hits"]]
    assert set(q.source_ids) & set(hits)


def test_refusals_change_nothing(recorded, cli, tmp_path):
    cli("model", "add", recorded.model, "--name", "t")
    shutil.copytree(recorded.model, tmp_path / "plain", ignore=shutil.ignore_patterns("wherefrom"))
    assert cli("model", "add", tmp_path / "plain", "--name", "plain")[0] == 0
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(d) + "\n" for d in recorded.world.documents[::2]))
    assert cli("ingest", tmp_path / "half.jsonl", "-c", "half")[0] == 0
    for args, message in [
        (("index", "--from-training", "-c", "w", "-m", "plain"), "has no training store"),
        (("index", "--from-training", "-c", "half", "-m", "t"), "are not in corpus 'half'"),
        (("index", "--from-training", "--update", "-c", "w", "-m", "t"), "leave --update out"),
    ]:
        before = state(recorded.settings)
        code, _, err = cli(*args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert state(recorded.settings) == before
