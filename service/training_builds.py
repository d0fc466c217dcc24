"""`wherefrom index --from-training`: publish the store a `WherefromCallback` recorded while the model
trained, as a build like any other — with no forward or backward pass over the corpus.

The recorded rows become one build shard (`indexer.callback.write_training_shard`): one row per
corpus document the training saw, one gradient block per saved checkpoint that is registered.
Dense embeddings, BM25, the EK-FAC fit (from the recorded K-FAC sums and rows) and FAISS are the
offline merge's own (`indexer.build.merge_shards`). Documents the training never saw are no rows:
they cannot have taught the model anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from db import repo
from db.engine import transaction
from db.errors import InputError
from indexer import semantic, store
from indexer.build import merge_shards
from indexer.config import BuildConfig, GradientConfig
from indexer.modelio import CheckpointInfo, check_unchanged
from service.builds import checkpoint_record, stored_path
from service.catalog import training_store
from service.settings import Settings
from service.views import BuildOutcome


def _blocks(info: dict, ckpts: list[CheckpointInfo], model: str) -> list[CheckpointInfo]:
    """The registered checkpoints the callback saw saved with the same weights, by step."""
    saved = {s["step"]: s["weights_sha256"] for s in info["saves"]}
    blocks = [c for c in ckpts if saved.get(c.step) == c.weights_sha256]
    if not blocks:
        raise InputError(f"none of model {model!r}'s registered checkpoints is one the training store saw saved: "
                         "register the Trainer output folder the callback wrote into with `wherefrom model add`")
    return blocks


def index_from_training(settings: Settings, corpus: str, model: str, config: BuildConfig | None = None,
                        progress=None) -> BuildOutcome:
    """Publish model `model`'s training store over corpus `corpus`; `config` gives FAISS options only
    (the gradient config is the one recorded)."""
    with transaction(settings.database_url) as s:
        c_row, m_row = repo.corpus_by_name(s, corpus), repo.model_by_name(s, model)
        docs = [(d.id, d.external_id, d.text) for d in repo.corpus_documents(s, c_row.id)]
        ckpts = [CheckpointInfo.from_row(c) for c in m_row.checkpoints]
        corpus_id, model_id, model_path = c_row.id, m_row.id, Path(m_row.path)
    found = training_store(model_path)
    if found is None:
        raise InputError(f"model {model!r} has no training store ({model_path}/wherefrom): train it with "
                         "indexer.callback.WherefromCallback, or build offline with `wherefrom index`")
    root, info = found["path"], store.read_info(found["path"])
    blocks = _blocks(info, ckpts, model)
    check_unchanged([{"path": str(c.path), "weights_sha256": c.weights_sha256, "base_path": c.base_path}
                     for c in blocks])
    seen = found["ids"]
    rows = [(d, text) for d, ext, text in docs if ext in seen]
    by_ext = {ext: i for i, ext in enumerate(e for _, e, _ in docs if e in seen)}
    unknown = sorted(seen - by_ext.keys())
    if unknown:
        raise InputError(f"{len(unknown)} recorded document id(s) are not in corpus {corpus!r} (first: {unknown[0]!r}): "
                         f"ingest the training documents under the ids of the {info['id_column']!r} column")
    base = config or BuildConfig()
    config = BuildConfig(gradient=GradientConfig(**info["config"]), factory=base.factory, nprobe=base.nprobe)
    name = f"{corpus}-{model}-training-{uuid.uuid4().hex[:8]}"
    work, lock = store.partial_dir(settings.stores / name)  # locked: `wherefrom doctor --fix` leaves it alone
    try:
        out = _merge(root, work, by_ext, rows, blocks, config, info, corpus, model, progress)
        return _publish(settings, out, settings.stores / name, corpus_id, model_id, rows, blocks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)


def _merge(root: Path, work: Path, row_of: dict, rows: list, blocks: list[CheckpointInfo], config: BuildConfig,
           info: dict, corpus: str, model: str, progress) -> tuple[Path, dict]:
    from indexer.callback import write_training_shard

    bars = progress or (lambda *_: None)
    shard = work / "shard"
    shard.mkdir()
    grad = write_training_shard(root, shard, row_of, [c.step for c in blocks])
    t = time.perf_counter()
    texts = [text for _, text in rows]
    dense = semantic.embed(texts, progress=lambda n: bars("embeddings", n, len(texts)))
    np.save(shard / "dense.npy", np.asarray(dense, dtype=np.float32))
    meta = {"rows": len(rows), **{k: grad[k] for k in ("dims", "adam_normalised_layers", "layers")},
            "timings_s": {"gradients": 0.0, "embeddings": time.perf_counter() - t}}
    (shard / "meta.json").write_text(json.dumps(meta))
    weighted = [replace(c, learning_rate=m) for c, m in zip(blocks, grad["learning_rate_mass"])]
    provenance = {"corpus": corpus, "model": model, "tokenizer_hash": blocks[0].tokenizer_hash,
                  "checkpoints": [checkpoint_record(c) for c in weighted],
                  "from_training": {"store": str(root), "exposures": grad["exposures"],
                                    "learning_rate_mass": grad["learning_rate_mass"]}}
    out = work / "out"
    out.mkdir()
    return out, merge_shards(out, [shard], texts, weighted, config, provenance, bars)


def _publish(settings: Settings, merged: tuple[Path, dict], final: Path, corpus_id: int, model_id: int,
             rows: list, blocks: list[CheckpointInfo]) -> BuildOutcome:
    out, info = merged
    renamed = False
    try:
        with transaction(settings.database_url) as s:
            build = repo.create_build(
                s, corpus_id=corpus_id, model_id=model_id, kind="hybrid",
                config={**info["config"], "checkpoint_steps": [c.step for c in blocks], "from_training": True},
                store_path=stored_path(settings, final), entries=[(d, 0, len(text)) for d, text in rows], checksum=info["checksum"])
            store.publish(out, final)
            renamed = True
            build_id = build.id
    except BaseException:
        if renamed:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return BuildOutcome(build_id, len(rows), 0, info)
