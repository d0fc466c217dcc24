"""The CLI's error paths: one clear line, exit code 2, nothing half-written in SQL or on disk.

Broken corpora, models and questions are in test_hostile_input.py."""

import json
import shutil
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from db.engine import transaction
from db.models import Corpus, Document, IndexBuild, Trace


@pytest.fixture
def cli(monkeypatch, settings, run_cli):
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(settings.data_dir))
    return run_cli


def counts(settings):
    with transaction(settings.database_url) as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (Corpus, Document, IndexBuild, Trace)}


def stores(settings):
    return sorted(p.name for p in settings.stores.iterdir()) if settings.stores.exists() else []


def test_help_answers_without_heavy_imports():
    code = "import sys; from service.cli import app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_model_folder_without_weights(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, _, err = cli("model", "add", tmp_path / "m", "--name", "m")
    assert code == 2 and "holds no model weights" in err


def test_unknown_names_and_missing_builds(cli, tmp_path):
    assert "ingest it first" in cli("index", "--corpus", "nope", "--model", "m")[2]
    code, _, err = cli("trace", "Who?")
    assert code == 2 and "no index build matches" in err


@pytest.fixture
def built(cli, settings, trained, tiny_world, tmp_path):
    """A private copy of the trained model, ingested and indexed through the CLI."""
    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    corpus, _ = tiny_world.write(tmp_path / "world")
    assert cli("ingest", corpus, "--corpus", "w")[0] == 0
    assert cli("model", "add", model, "--name", "m")[0] == 0
    code, out, err = cli("index", "--corpus", "w", "--model", "m")
    assert code == 0, err
    return model


def test_ingest_twice_changes_nothing(cli, settings, built, tiny_world, tmp_path):
    before = counts(settings)
    code, out, _ = cli("ingest", tmp_path / "world" / "corpus.jsonl", "--corpus", "w")
    assert code == 0 and f"0 added, {len(tiny_world.documents)} already there" in out
    assert counts(settings) == before


def test_trace_json_and_bad_questions(cli, settings, built, tiny_world):
    q = next(q for q in tiny_world.questions if q.n_paraphrases == 1)
    code, out, err = cli("trace", q.prompt, "--answer", " " + q.answer, "--k", 3, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["hits"]) == 3 and data["answer"] == " " + q.answer and not data["answer_generated"]
    assert set(data["hits"][0]["scores"]) == {"grad", "dense", "bm25"}
    before = counts(settings)
    # empty and over-long questions, and other hostile input: test_hostile_input.py
    for args, message in [((q.prompt, "--k", 0), "k must be between"),
                          ((q.prompt, "--method", "magic"), "unknown method")]:
        code, _, err = cli("trace", *args)
        assert code == 2 and message in err, (args, err)
    assert counts(settings) == before


def test_failed_build_leaves_nothing(cli, settings, built):
    before, on_disk = counts(settings), stores(settings)
    code, _, err = cli("index", "--corpus", "w", "--model", "m", "--modules", "no_such_layer")
    assert code == 2 and "no linear layer matches" in err
    assert counts(settings) == before and stores(settings) == on_disk


def test_the_index_options_are_the_config_fields():
    """Every BuildConfig/GradientConfig field is an option of `wherefrom index` (help and default from
    the field) or is named here as set by the build itself; and the options make the config they say."""
    import inspect
    from dataclasses import fields

    from indexer.config import BuildConfig, GradientConfig
    from service.cli_index import INDEX_OPTIONS, NEGATED, build_config, index

    not_options = {(BuildConfig, "gradient"), (BuildConfig, "max_tokens"), (BuildConfig, "checkpoint_weights"),
                   (BuildConfig, "append_eos"), (GradientConfig, "k_out"),  # k_out: --proj sets both sides
                   (GradientConfig, "eps"), (GradientConfig, "curvature"), (GradientConfig, "damping")}
    every = {(cls, f.name) for cls in (BuildConfig, GradientConfig) for f in fields(cls)}
    assert set(INDEX_OPTIONS.values()) | not_options == every and not set(INDEX_OPTIONS.values()) & not_options
    params = inspect.signature(index).parameters
    for param, (cls, name) in INDEX_OPTIONS.items():
        option, field = params[param].default, next(f for f in fields(cls) if f.name == name)
        assert option.default == ((not field.default) if param in NEGATED else field.default), param
        assert field.metadata["help"][1:] in option.help, param
    defaults = {p: params[p].default.default for p in INDEX_OPTIONS}
    assert build_config(**defaults) == BuildConfig()
    made = build_config(**{**defaults, "proj": 16, "no_adam": True, "faiss_factory": "Flat"})
    assert (made.gradient.k_in, made.gradient.k_out, made.gradient.optimizer_norm, made.factory) == (16, 16, False, "Flat")
