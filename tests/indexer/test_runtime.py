"""Device, dtype, token budgets, out-of-memory back-off and activation checkpointing, on the CPU.

The float32 CPU path must give today's store byte for byte; bfloat16 must rank like float32; a
batch that runs out of memory is halved and retried; checkpointing changes no feature.
"""

import json

import numpy as np
import pytest
import torch

from attribution.tracer import Tracer
from db.errors import InputError
from indexer import build, store
from indexer.config import BuildConfig, GradientConfig, Runtime, applied
from indexer.corpus import chunk_corpus
from indexer.curvature import Stats
from indexer.gradients import Featurizer, collate, featurizer_for
from indexer.loading import enable_checkpointing, load_model, resolve_device
from indexer.modelio import discover_checkpoints
from service import catalog, jobs
from service.settings import Settings


def build_with(root, world, model_dir, runtime: Runtime):
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    corpus, _ = world.write(root / "world")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, model_dir, "tiny")
    with applied(runtime):
        out = jobs.index_here(settings, "world", "tiny")
    return out, next(settings.stores.iterdir())


def store_of(indexed):
    return next(p for p in indexed.settings.stores.iterdir() if p.is_dir())


def test_an_explicit_cpu_float32_build_is_todays_store(indexed, tmp_path):
    """Same checksum as the default build (95577bba… on main before devices existed, BENCHMARKS.md),
    with every runtime option spelled out and a token budget too large to change any batch."""
    runtime = Runtime(device="cpu", dtype="float32", max_tokens_per_batch=1 << 20)
    out, folder = build_with(tmp_path, indexed.world, indexed.model_dir, runtime)
    assert out.info["checksum"] == indexed.build.info["checksum"] == store.checksum(folder)
    assert out.info["runtime"]["device"] == ["cpu"] and out.info["runtime"]["dtype"] == ["float32"]
    assert out.info["runtime"]["backoffs"] == 0 and out.info["runtime"]["peak_rss_bytes"] > 0
    # the runtime is beside the config: the SQL row and info.json's config know nothing of it
    assert out.info["config"] == indexed.build.info["config"]


def test_a_bfloat16_build_ranks_the_planted_facts_like_float32(indexed, tmp_path):
    out, folder = build_with(tmp_path, indexed.world, indexed.model_dir, Runtime(device="cpu", dtype="bfloat16"))
    assert out.info["runtime"]["dtype"] == ["bfloat16"]
    ckpts = discover_checkpoints(indexed.model_dir)
    f32 = Tracer(store_of(indexed), ckpts)
    with applied(Runtime(device="cpu", dtype="bfloat16")):
        b16 = Tracer(folder, ckpts)
        assert b16.featurizer(0)[2].dtype == torch.bfloat16
    single = [q for q in indexed.world.questions if q.n_paraphrases == 1]
    agree = sum(f32.rank(q.prompt, q.answer, k=1, method="grad").hits[0].position
                == b16.rank(q.prompt, q.answer, k=1, method="grad").hits[0].position for q in single)
    assert agree >= 0.9 * len(single), (agree, len(single))


@pytest.fixture(scope="module")
def tiny(trained, tiny_world):
    """(checkpoint, chunks) of the tiny world's last checkpoint."""
    ckpt = discover_checkpoints(trained[0])[-1]
    _, tok = load_model(ckpt.path)
    docs = [(i, d["text"]) for i, d in enumerate(tiny_world.documents)]
    chunks, _ = chunk_corpus(tok, docs, 64)
    return ckpt, chunks


def shard(folder, chunks, ckpt, config=None, runtime=None):
    folder.mkdir()
    meta = build.shard_gradients(folder, chunks, [ckpt], config or BuildConfig(), lambda *a: None, runtime)
    return meta, np.load(folder / "raw-c0.npy"), Stats.load(folder / "stats-c0.npz")


def test_out_of_memory_halves_the_batch_and_retries(tiny, tmp_path, monkeypatch):
    ckpt, chunks = tiny
    _, plain, plain_stats = shard(tmp_path / "plain", chunks, ckpt)
    features, calls = Featurizer.features, []

    def tight(self, ids, *rest, **kw):  # more than 4 rows "do not fit"; the first call fails mid-pass
        calls.append(len(ids))
        if len(ids) > 4:
            features(self, ids[:1], *(t[:1] for t in rest), **kw)  # adds to K-FAC sums, then fails
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return features(self, ids, *rest, **kw)
    monkeypatch.setattr(Featurizer, "features", tight)
    meta, raw, stats = shard(tmp_path / "tight", chunks, ckpt)
    assert calls[:3] == [16, 8, 4] and max(calls[3:]) == 4
    assert meta["runtime"]["batch_rows"] == 4 and meta["runtime"]["backoffs"] == 2
    # padding widths differ, so float32 sums round differently: 1e-5 of the largest entry
    np.testing.assert_allclose(raw, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
    for name, s in plain_stats.layers.items():  # the cut-off batches added nothing
        # one chunk adds ~1e-3 of the largest entry; entries near zero by cancellation round apart
        # by ~1e-8 of it in float32 batches of other widths (AVX2 and AVX-512 kernels differ)
        np.testing.assert_allclose(stats.layers[name].a_sum, s.a_sum, rtol=1e-5, atol=1e-6 * np.abs(s.a_sum).max())
        assert stats.layers[name].tokens == s.tokens


def test_a_single_chunk_that_does_not_fit_is_one_line(tiny, tmp_path, monkeypatch):
    ckpt, chunks = tiny

    def never(self, *a, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(Featurizer, "features", never)
    with pytest.raises(InputError, match="out of memory on 1 chunk") as e:
        shard(tmp_path / "s", chunks, ckpt)
    assert "\n" not in str(e.value) and "--dtype bfloat16" in str(e.value)


def test_a_token_budget_shrinks_batches_of_long_chunks(tiny, tmp_path):
    ckpt, chunks = tiny
    lengths = [len(c.token_ids) for c in chunks]
    order = sorted(range(len(chunks)), key=lengths.__getitem__)
    budget = 4 * max(lengths)
    start, seen = 0, []
    while start < len(order):
        rows = build.next_batch(order, lengths, start, 16, budget)
        assert len(rows) * lengths[rows[-1]] <= budget and len(rows) <= 16
        seen += rows
        start += len(rows)
    assert seen == order
    _, plain, _ = shard(tmp_path / "plain", chunks, ckpt)
    meta, raw, _ = shard(tmp_path / "budget", chunks, ckpt, runtime=Runtime(device="cpu", max_tokens_per_batch=budget))
    assert meta["runtime"]["max_tokens_per_batch"] == budget
    np.testing.assert_allclose(raw, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())


def test_activation_checkpointing_changes_no_feature(tiny):
    """The recomputed forward calls the layers' hooks again: only the pass with gradients counts."""
    ckpt, chunks = tiny
    batch = collate([c.token_ids for c in chunks[:6]], 0, label_spans=[c.labels for c in chunks[:6]])
    out = []
    for checkpointing in (False, True):
        model, _, feat = featurizer_for(ckpt, GradientConfig())
        if checkpointing:
            enable_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())
        feat.stats = Stats()
        out.append((feat.features(*batch), feat.stats))
    (plain, s0), (ckpted, s1) = out
    torch.testing.assert_close(ckpted, plain, rtol=1e-5, atol=1e-7)
    for name, s in s0.layers.items():
        np.testing.assert_allclose(s1.layers[name].a_sum, s.a_sum, rtol=1e-6)
        np.testing.assert_allclose(s1.layers[name].s_sum, s.s_sum, rtol=1e-5)
        assert s1.layers[name].tokens == s.tokens


def test_runtime_options_are_checked_in_one_line():
    for kwargs, message in [({"device": "tpu"}, "unknown device"), ({"dtype": "int8"}, "unknown dtype"),
                            ({"max_tokens_per_batch": 0}, "--max-tokens-per-batch is 1 to")]:
        with pytest.raises(InputError, match=message):
            Runtime(**kwargs)
    with pytest.raises(InputError, match="CUDA device"):
        resolve_device("cuda:7")
    env = {"WHEREFROM_DEVICE": "cpu", "WHEREFROM_MEMORY_LIMIT": "2G", "WHEREFROM_MAX_TOKENS_PER_BATCH": "4096"}
    assert Runtime.from_env(env) == Runtime(device="cpu", memory_limit=2 << 30, max_tokens_per_batch=4096)
    assert Runtime.from_env(Runtime.from_env(env, dtype="bfloat16").environ()).dtype == "bfloat16"
    with pytest.raises(InputError, match="WHEREFROM_MEMORY_LIMIT must be"):
        Runtime.from_env({"WHEREFROM_MEMORY_LIMIT": "lots"})
    assert json.dumps(Runtime().environ())  # strings only: it goes into os.environ


@pytest.mark.parametrize("native", [False, True])
def test_a_half_precision_checkpoint_loads_in_float32_on_a_cpu_without_its_instructions(tiny, tmp_path, monkeypatch,
                                                                                          native):
    """bfloat16 on an x86 CPU without AVX-512 BF16 or AMX is emulated (57x float32's matmul time on
    an AVX2 EPYC): by default such a checkpoint computes in float32 there; `--dtype` keeps it."""
    import platform
    ckpt, _ = tiny
    model, tok = load_model(ckpt.path)
    folder = tmp_path / "b16"
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert load_model(folder)[0].dtype == (torch.bfloat16 if native else torch.float32)
    assert load_model(folder, dtype="bfloat16")[0].dtype == torch.bfloat16
    assert load_model(ckpt.path)[0].dtype == torch.float32  # a float32 checkpoint is never touched
