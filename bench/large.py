"""Real model shapes with random weights: the path from 86M to 1.2B parameters, on any device.

    python -m bench.large --shape llama-1b --docs 50 --dtype bfloat16     # the 1.2B CPU row
    python -m bench.large --shape gpt2-124m --device cuda                 # what bench/gpu.sh runs

Each run saves a model of the shape (random weights, a BPE tokenizer fitted on the demo world,
no hub download), then measures in one process: (a) a plain forward+backward over the documents
with weight gradients, as a training step without the update; (b) our gradient pass over the same
documents (`indexer.build.shard_gradients`, projected features and K-FAC sums); the query-gradient
latency of one question; and the peak memory of the process (VmHWM) and of the CUDA device.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from indexer import memory

# name -> (transformers config class, sizes): the published shapes, random weights
SHAPES = {
    "gpt2-86m": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)),  # 124M with its 50k vocab
    "gpt2-124m": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "pythia-410m": ("GPTNeoXConfig", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                          intermediate_size=4096, max_position_embeddings=2048, vocab_size=50304)),
    "llama-350m": ("LlamaConfig", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                       num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=2048)),
    "llama-1b": ("LlamaConfig", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=2048,
                                     vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)),
    "tiny-gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=2, n_positions=256)),
    "tiny-llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)),
}


def documents(n: int, group: int = 6) -> list[str]:
    """`n` documents of about 60-120 tokens: demo-world sentences joined `group` at a time."""
    from service.demo.world import make_world
    texts, seed = [], 0
    while len(texts) < n:
        docs = [d["text"] for d in make_world(seed).documents]
        texts += [" ".join(docs[i:i + group]) for i in range(0, len(docs), group)]
        seed += 1
    return texts[:n]


def save_model(shape: str, folder: Path, texts: list[str], dtype: str = "float32") -> Path:
    """A causal LM of `shape` with random weights (seed 0) and a BPE tokenizer, saved in `folder`."""
    import transformers
    from transformers import AutoModelForCausalLM

    from service.demo.train import train_tokenizer
    tokenizer = train_tokenizer(texts, 512)
    cls, sizes = SHAPES[shape]
    sizes = {"vocab_size": len(tokenizer), **sizes}
    config = getattr(transformers, cls)(**sizes, bos_token_id=tokenizer.eos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_pass(model, batches) -> float:
    """(a): forward+backward with weight gradients over `batches`, in seconds."""
    from indexer.gradients import per_example_loss
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    t = time.perf_counter()
    for ids, mask, labels in batches:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_example_loss(logits, labels).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def measure(shape: str, n_docs: int, device: str, dtype: str, batch_size: int, projection: int,
            runs: int = 1, bergson: bool = False) -> dict:
    """One row: (a), (b), the query-gradient latency and peak memory for `shape`; with `bergson`
    (installed: bench/bergson_ref.py), (c) bergson's build of the same model and projection."""
    from indexer.build import shard_gradients
    from indexer.config import BuildConfig, GradientConfig, Runtime
    from indexer.corpus import Chunk
    from indexer.gradients import collate, featurizer_for
    from indexer.loading import load_model
    from indexer.modelio import read_checkpoint

    texts = documents(n_docs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(shape, Path(tmp) / "model", texts, dtype)
        ckpt = read_checkpoint(folder)
        runtime = Runtime(device=device, dtype=dtype)
        config = BuildConfig(batch_size=batch_size, gradient=GradientConfig(k_in=projection, k_out=projection))
        model, tok = load_model(folder, None, device, dtype)
        ids = [tok(t + tok.eos_token)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = [collate([ids[i] for i in order[s:s + batch_size]], tok.pad_token_id)
                   for s in range(0, len(order), batch_size)]
        tokens = sum(map(len, ids))
        chunks = [Chunk(0, 0, 0, x) for x in ids]
        dev = next(model.parameters()).device
        plain_pass(model, batches[:1])  # warm-up: one-time allocations and kernel choices
        a_runs, b_runs = [], []
        for _ in range(runs):
            a_runs.append(plain_pass(model, batches))
            shard = Path(tmp) / f"shard-{len(b_runs)}"
            shard.mkdir()
            t = time.perf_counter()
            shard_gradients(shard, chunks, [ckpt], config, lambda *a: None, runtime)
            b_runs.append(time.perf_counter() - t)
        params = sum(p.numel() for p in model.parameters())
        extra = {}
        if bergson:
            from bench import bergson_ref
            token_batch = batch_size * max(map(len, ids))  # bergson batches by a token budget
            c = bergson_ref.bergson_build(model, folder, ids, projection, token_batch)
            extra = {"c_tok_s": tokens / c, "b_over_c": min(b_runs) / c}
        del model
        _, _, feat = featurizer_for(ckpt, config.gradient, runtime)
        query = collate([ids[0][:24]], tok.pad_token_id)
        feat.features(*query)  # warm-up
        t = time.perf_counter()
        feat.features(*query)
        latency = time.perf_counter() - t
    a, b = min(a_runs), min(b_runs)
    return {"shape": shape, "params": params, "device": str(dev), "dtype": dtype, "documents": n_docs,
            "tokens": tokens, "batch_size": batch_size, "projection": projection,
            "a_tok_s": tokens / a, "b_tok_s": tokens / b, "b_over_a": b / a, "query_gradient_s": latency,
            "peak_rss_gib": memory.peak_rss() / 2**30,
            "peak_device_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None, **extra}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--projection", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/out/large.json"))
    args = ap.parse_args()
    row = measure(args.shape, args.docs, args.device, args.dtype, args.batch_size, args.projection, args.runs)
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
