"""Indexing speed against the cost of training, measured in the same run on the same model and corpus.

    python -m bench.perf --runs 5

(a) a plain batched forward+backward over the corpus (the floor: one training pass, no optimizer);
(b) our gradient index build for one checkpoint (projection + Adam normalisation + EK-FAC
    statistics, then EK-FAC fit and finalisation);
(d) captum TracInCP-style per-example gradients without projection, on a sample (it is slow).
Reports tokens/s and the ratios (b)/(a) and (d)/(b) as medians over `--runs` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.world import make_world

OUT = Path("bench/out")


def setup(n_layer: int, n_embd: int, seed: int = 0):
    """A GPT-2 of the given size saved as a Trainer-like checkpoint, and the demo corpus tokenised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.train import train_tokenizer
    from indexer.modelio import read_checkpoint

    world = make_world(seed)
    texts = [d["text"] for d in world.documents]
    tok = train_tokenizer(texts, 1024)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=n_embd, n_layer=n_layer,
                                       n_head=4, pad_token_id=tok.pad_token_id))
    folder = Path(tempfile.mkdtemp()) / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ids = [tok(t + tok.eos_token)["input_ids"] for t in texts]
    return model.eval(), tok, read_checkpoint(folder), ids


def plain_pass(model, ids, pad, batch_size: int) -> float:
    """(a): forward+backward with weight gradients, as a training step without the update."""
    from indexer.build import collate
    from indexer.gradients import per_example_loss
    model.zero_grad(set_to_none=True)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    t = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = collate([ids[i] for i in order[start:start + batch_size]], pad)
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        per_example_loss(logits, batch[2]).sum().backward()
    return time.perf_counter() - t


def our_build(ckpt, ids, batch_size: int) -> float:
    """(b): compute_shard + finalize_gradients for one checkpoint, default features."""
    from indexer.build import BuildConfig, compute_shard, finalize_gradients
    from indexer.corpus import Chunk
    chunks = [Chunk(0, 0, 0, x) for x in ids]
    config = BuildConfig(batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        compute_shard(Path(tmp) / "s", chunks, [ckpt], config, lambda *a: None)
        finalize_gradients(Path(tmp), [Path(tmp) / "s"], [ckpt], config, lambda *a: None)
        return time.perf_counter() - t


def captum_per_example(model, ids, pad, sample: int) -> float:
    """(d): unprojected per-example gradients through captum (self-influence of a sample)."""
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    from attribution.rerank import _LogitsOnly
    from indexer.adapter import tracked_layers
    from indexer.build import collate
    from indexer.gradients import per_example_loss
    data = TensorDataset(*collate(ids[:sample], pad))
    layers = ["lm." + l.name for l in tracked_layers(model)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, Path(tmp) / "c.pt")
        tracin = TracInCP(_LogitsOnly(model), data, [str(Path(tmp) / "c.pt")], checkpoints_load_func=lambda m, p: 1.0,
                          layers=layers, loss_fn=per_example_loss, batch_size=16)
        t = time.perf_counter()
        tracin.self_influence()
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256, help="256 hidden × 4 layers ≈ 5M parameters with the head")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--captum-sample", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, ckpt, ids = setup(args.layers, args.embd)
    tokens = sum(map(len, ids))
    sample_tokens = sum(map(len, ids[:args.captum_sample]))
    rows = []
    for _ in range(args.runs):  # interleaved, so machine noise hits all three alike
        a = plain_pass(model, ids, tok.pad_token_id, args.batch_size)
        b = our_build(ckpt, ids, args.batch_size)
        d = captum_per_example(model, ids, tok.pad_token_id, args.captum_sample)
        rows.append({"a_tok_s": tokens / a, "b_tok_s": tokens / b, "d_tok_s": sample_tokens / d,
                     "b_over_a": b / a, "d_over_b": (d / sample_tokens) / (b / tokens)})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    params = sum(p.numel() for p in model.parameters())
    report = {"params": params, "tokens": tokens, "documents": len(ids), "runs": rows, "median": med,
              "torch_threads": torch.get_num_threads()}
    print(f"model {params / 1e6:.1f}M params, corpus {len(ids)} docs / {tokens} tokens, {args.runs} runs (median)")
    print(f"(a) plain forward+backward   {med['a_tok_s']:9.0f} tokens/s")
    print(f"(b) our index build          {med['b_tok_s']:9.0f} tokens/s   (b)/(a) time ratio {med['b_over_a']:.2f}")
    print(f"(d) captum per-example grads {med['d_tok_s']:9.0f} tokens/s   (d)/(b) time per token {med['d_over_b']:.1f}x")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "perf.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
