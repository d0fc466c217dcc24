"""Bergson's projected-gradient build on our model and corpus: the (c) yardstick of bench/perf.py.

An optional bench extra, installed without its dependencies so that it cannot pull a CUDA torch:
    pip install --no-deps bergson==2.5.1 peft jaxtyping wadler_lindig natsort petname \
        simple-parsing docstring-parser torchopt ml_dtypes
We call bergson's own collector (`collect_gradients`) on a tokenised dataset, with its batch
allocation, so the timing covers exactly its gradient collection and index writing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def available() -> bool:
    try:
        import bergson  # noqa: F401
    except ImportError:
        return False
    return True


def bergson_build(model, folder: Path, ids: list[list[int]], projection: int, token_batch: int) -> float:
    """Seconds for bergson to collect and write projected per-example gradients of `ids`, with its
    Adam normalisation from the checkpoint's optimizer.pt (as ours folds it in)."""
    from bergson.collection import collect_gradients
    from bergson.config.config import IndexConfig
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import create_processor
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids, "length": [len(x) for x in ids]})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = IndexConfig(run_path=str(Path(tmp) / "run"), model=str(folder), projection_dim=projection,
                          token_batch_size=token_batch, loss_reduction="mean",
                          optimizer_state=str(folder))
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        processor = create_processor(model, cfg)
        batches = allocate_batches(data["length"][:], token_batch)
        collect_gradients(model, data, processor, cfg, batches=batches)
        return time.perf_counter() - t
