"""Published model shapes on the CPU, through the whole build: an 86M GPT-2 (12 × 768) in float32
and a ~350M Llama (24 × 1024, grouped-query attention) saved in bfloat16, which loads in its
checkpoint dtype where the CPU has bfloat16 instructions, else in float32. Random weights: what
is checked is the path, not what the model knows."""

import numpy as np
import pytest
import torch

from attribution.tracer import Tracer
from bench.large import documents, save_model
from indexer import store
from indexer.loading import cpu_has_native
from indexer.modelio import discover_checkpoints
from service import catalog, jobs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("shape,dtype,layers", [("gpt2-86m", "float32", 12 * 4), ("llama-350m", "bfloat16", 24 * 7)])
def test_a_large_model_indexes_and_traces_on_the_cpu(settings, tmp_path, shape, dtype, layers):
    texts = documents(6)
    folder = save_model(shape, tmp_path / "model", texts, dtype)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(f'{{"id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(texts)))
    catalog.ingest(settings, corpus, "c")
    catalog.add_model(settings, folder, "big")
    out = jobs.index_here(settings, "c", "big")
    assert out.rows == len(texts)
    # a CPU without bfloat16 instructions computes in float32 (indexer.loading.cpu_has_native)
    computed = dtype if cpu_has_native(getattr(torch, dtype)) else "float32"
    assert out.info["runtime"]["dtype"] == [computed] and out.info["runtime"]["device"] == ["cpu"]
    assert len(out.info["gradient"]["layers"]) == layers and out.info["gradient"]["dims"] == [layers * 64]
    folder_out = next(p for p in settings.stores.iterdir() if p.is_dir())
    grad = store.open_array(folder_out, "grad").astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(grad, axis=1), 1.0, atol=2e-3)
    # a document's second half, asked after its first, finds that document by gradients alone
    tracer = Tracer(folder_out, discover_checkpoints(folder))
    words = texts[3].split()
    question, answer = " ".join(words[:len(words) // 2]), " " + " ".join(words[len(words) // 2:])
    assert tracer.rank(question, answer, k=1, method="grad").hits[0].position == 3
