"""Indexing speed against the cost of training, measured in the same run on the same model and corpus.

    python -m bench.perf --runs 5

(a) a plain batched forward+backward over the corpus (the floor: one training pass, no optimizer);
(b) our gradient index build for one checkpoint (projection + Adam normalisation + EK-FAC
    statistics, then EK-FAC fit and finalisation);
(c) bergson's projected-gradient build with the same projection size (optional bench extra, see
    bench/bergson_ref.py; skipped with a note when it is not installed);
(d) captum TracInCP-style per-example gradients without projection, on a sample (it is slow).
Reports tokens/s and the time ratios (b)/(a), (b)/(c) and (d)/(b) per token, as medians over
`--runs` interleaved runs, and the peak resident memory of (b) alone (VmHWM reset before it; the
process then holds (a)'s model too, and (b) loads its own copy) beside the float32 weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers imports tqdm: bergson's bars would flood the table

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from service.demo.world import make_world

OUT = Path("bench/out")


def corpus(worlds: int, group: int) -> list[str]:
    """Documents of about 50-120 tokens: consecutive demo-world documents joined `group` at a time
    (a world's own documents are one sentence, too short for the per-batch overheads to show)."""
    texts = []
    for seed in range(worlds):
        docs = [d["text"] for d in make_world(seed).documents]
        texts += [" ".join(docs[i:i + group]) for i in range(0, len(docs), group)]
    return texts


def setup(n_layer: int, n_embd: int, worlds: int, group: int, seed: int = 0):
    """A GPT-2 of the given size trained one epoch with the HF Trainer (so its checkpoint holds the
    Adam state the default features fold in), and the corpus tokenised as the build sees it."""
    from service.demo.train import TrainConfig, train
    from indexer.loading import load_model
    from indexer.modelio import discover_checkpoints

    texts = corpus(worlds, group)
    folder = Path(tempfile.mkdtemp())
    train(texts, folder, TrainConfig(n_layer=n_layer, n_embd=n_embd, n_positions=256, epochs=1,
                                      n_checkpoints=1, seed=seed))
    ckpt = discover_checkpoints(folder)[-1]
    model, tok = load_model(ckpt.path)
    ids = [tok(t + tok.eos_token)["input_ids"] for t in texts]
    return model.eval(), tok, ckpt, ids


def plain_pass(model, ids, pad, batch_size: int) -> float:
    """(a): forward+backward with weight gradients, as a training step without the update."""
    from indexer.gradients import collate, per_example_loss
    model.zero_grad(set_to_none=True)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    t = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = collate([ids[i] for i in order[start:start + batch_size]], pad)
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        per_example_loss(logits, batch[2]).sum().backward()
    return time.perf_counter() - t


def our_build(ckpt, ids, batch_size: int, projection: int, peaks: list | None = None) -> float:
    """(b): the gradient store of one checkpoint with the default features: projected gradients
    with the Adam fold and K-FAC sums, EK-FAC fit, unit norm, float16 store and its FAISS index.
    Appends (resident bytes before, peak resident bytes during) to `peaks`."""
    from indexer import memory
    from indexer import ann, store
    from indexer.build import finalize_gradients, shard_gradients
    from indexer.config import BuildConfig
    from indexer.corpus import Chunk
    from indexer.config import GradientConfig
    chunks = [Chunk(0, 0, 0, x) for x in ids]
    config = BuildConfig(batch_size=batch_size, gradient=GradientConfig(k_in=projection, k_out=projection))
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "s"
        shard.mkdir()
        before = memory.rss()
        memory.reset_peak()
        t = time.perf_counter()
        meta = shard_gradients(shard, chunks, [ckpt], config, lambda *a: None)
        (shard / "meta.json").write_text(json.dumps({"rows": len(chunks), **meta}))
        finalize_gradients(Path(tmp), [shard], [ckpt], config, lambda *a: None)
        grad = store.open_array(Path(tmp), "grad")
        ann.build_faiss(grad, Path(tmp) / "grad.faiss", ann.choose_factory(*grad.shape))
        seconds = time.perf_counter() - t
        if peaks is not None:
            peaks.append((before, memory.peak_rss()))
        return seconds


class LogitsOnly(torch.nn.Module):
    """captum calls model(*inputs): ids and mask in, logits out."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask).logits


def captum_per_example(model, ids, pad, sample: int) -> float:
    """(d): unprojected per-example gradients through captum (self-influence of a sample)."""
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    from indexer.adapter import tracked_layers
    from indexer.gradients import collate, per_example_loss
    data = TensorDataset(*collate(ids[:sample], pad))
    layers = ["lm." + l.name for l in tracked_layers(model)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, Path(tmp) / "c.pt")
        tracin = TracInCP(LogitsOnly(model), data, [str(Path(tmp) / "c.pt")], checkpoints_load_func=lambda m, p: 1.0,
                          layers=layers, loss_fn=per_example_loss, batch_size=16)
        t = time.perf_counter()
        tracin.self_influence()
        return time.perf_counter() - t


def profile(ckpt, ids, batch_size: int, projection: int) -> None:
    """(b) under torch's profiler (operators) and cProfile (Python), top entries by own time."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    our_build(ckpt, ids, batch_size, projection)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        our_build(ckpt, ids, batch_size, projection)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    profiler = cProfile.Profile()
    profiler.runcall(our_build, ckpt, ids, batch_size, projection)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=320, help="320 hidden × 4 layers ≈ 5M parameters")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--projection", type=int, default=8, help="k_in = k_out for ours, projection_dim for bergson")
    ap.add_argument("--captum-sample", type=int, default=32)
    ap.add_argument("--worlds", type=int, default=4, help="demo worlds in the corpus (seeds 0..N-1)")
    ap.add_argument("--group", type=int, default=8, help="world documents per corpus document")
    ap.add_argument("--profile", action="store_true", help="profile one run of (b) and print where time goes")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, ckpt, ids = setup(args.layers, args.embd, args.worlds, args.group)
    if args.profile:
        return profile(ckpt, ids, args.batch_size, args.projection)
    tokens = sum(map(len, ids))
    sample_tokens = sum(map(len, ids[:args.captum_sample]))
    from bench import bergson_ref
    with_bergson = bergson_ref.available()
    token_batch = args.batch_size * max(map(len, ids))  # bergson batches by a token budget
    rows, peaks = [], []
    for _ in range(args.runs):  # interleaved, so machine noise hits all alike
        a = plain_pass(model, ids, tok.pad_token_id, args.batch_size)
        b = our_build(ckpt, ids, args.batch_size, args.projection, peaks)
        d = captum_per_example(model, ids, tok.pad_token_id, args.captum_sample)
        row = {"a_tok_s": tokens / a, "b_tok_s": tokens / b, "d_tok_s": sample_tokens / d,
               "b_over_a": b / a, "d_over_b": (d / sample_tokens) / (b / tokens)}
        if with_bergson:
            c = bergson_ref.bergson_build(model, ckpt.path, ids, args.projection, token_batch)
            row.update(c_tok_s=tokens / c, b_over_c=b / c)
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * 4 for p in model.parameters())
    memory_row = {"float32_weights_gib": weights / 2**30, "b_rss_before_gib": max(p[0] for p in peaks) / 2**30,
                  "b_peak_rss_gib": max(p[1] for p in peaks) / 2**30}
    report = {"params": params, **memory_row, "projection": args.projection, "batch_size": args.batch_size, "tokens": tokens, "documents": len(ids), "runs": rows, "median": med,
              "torch_threads": torch.get_num_threads()}
    print(f"model {params / 1e6:.1f}M params, corpus {len(ids)} docs / {tokens} tokens, {args.runs} runs (median)")
    print(f"(a) plain forward+backward   {med['a_tok_s']:9.0f} tokens/s")
    print(f"(b) our index build          {med['b_tok_s']:9.0f} tokens/s   (b)/(a) time ratio {med['b_over_a']:.2f}")
    if with_bergson:
        print(f"(c) bergson build            {med['c_tok_s']:9.0f} tokens/s   (b)/(c) time ratio {med['b_over_c']:.2f}")
    else:
        print("(c) bergson not installed: see bench/bergson_ref.py for the --no-deps install")
    print(f"(b) peak RSS {memory_row['b_peak_rss_gib']:.2f} GiB (before it {memory_row['b_rss_before_gib']:.2f} GiB), "
          f"float32 weights {memory_row['float32_weights_gib']:.2f} GiB")
    print(f"(d) captum per-example grads {med['d_tok_s']:9.0f} tokens/s   (d)/(b) time per token {med['d_over_b']:.1f}x")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "perf.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
