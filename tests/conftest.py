"""Shared fixtures: database URLs on both backends, and a tiny trained world (session-scoped)."""

import os

import pytest

# Before torch loads (here and in worker subprocesses, which inherit it): OpenMP threads that spin
# while waiting take 10-60x longer per step when other processes hold the cores (a 2-layer GPT-2
# step: 2.2-2.7 ms at 1 thread, 25-160 ms at 2 threads, 3.4-3.9 ms at 2 passive threads; BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.cluster import PG_ADMIN, temporary_database


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with temporary_database(PG_ADMIN) as url:
        yield url


@pytest.fixture
def own_db_url(request, tmp_path):
    """Like db_url, but a database of this test's own (for tests that migrate it down)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/wherefrom.db"
    else:
        with temporary_database(PG_ADMIN) as url:
            yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/wherefrom.db"
    return request.getfixturevalue("pg_url")


def make_tiny_world():
    """The tiny world of the `tiny_world` fixture, for processes a test starts (tests/indexer/ddp_rank.py)."""
    from service.demo.world import make_world
    return make_world(seed=7, n_people=10, n_filler=20)


@pytest.fixture(scope="session")
def tiny_world():
    return make_tiny_world()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_world):
    """A 2-layer GPT-2 trained on the tiny world with the HF Trainer: (model dir, trainer)."""
    from service.demo.train import TrainConfig, train
    out = tmp_path_factory.mktemp("model")
    config = TrainConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=512, epochs=40, batch_size=8,
                         n_checkpoints=3, seed=7)
    trainer = train([d["text"] for d in tiny_world.documents], out, config)
    return out, trainer


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Embedded default: SQLite and stores under a fresh data dir."""
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    from service.settings import Settings
    return Settings.from_env(tmp_path / "data")


@pytest.fixture(scope="session")
def indexed(tmp_path_factory, trained, tiny_world):
    """The tiny world ingested, the trained model registered and indexed, on SQLite (read-mostly:
    tests may add traces and corpora, never change the build or the model)."""
    from types import SimpleNamespace

    from service import catalog, jobs
    from service.settings import Settings
    root = tmp_path_factory.mktemp("indexed")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    corpus, _ = tiny_world.write(root / "world")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, trained[0], "tiny")
    build = jobs.index_here(settings, "world", "tiny")
    return SimpleNamespace(settings=settings, world=tiny_world, build=build, model_dir=trained[0])
