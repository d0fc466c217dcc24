"""The callback's cost per training step, read in one process where the Trainer-level ratio is too noisy.

    OMP_NUM_THREADS=1 python -m bench.callback_steps                 # the realistic world's Llama, dev seed
    OMP_NUM_THREADS=1 python -m bench.callback_steps --rounds 12 --batches 80
    OMP_NUM_THREADS=1 python -m bench.callback_steps --width 768 --layers 12 --heads 12 --batches 12 --rounds 3

bench/callback.py's ratio (whole Trainer runs, one process each) moved by ±4 % between pairs of
the same run here: more than the changes to the hooks it was meant to judge. This one holds two
copies of the world's model with the same weights, one recorded by a `WherefromCallback` driven
through the Trainer's own events (forward pre-hook, refold, collect, K-FAC sums, rows written),
and steps them in turn on the same length-grouped batches (forward, backward, AdamW), alternating
which goes first. Each batch's time is its minimum over the rounds; the ratio is of their sums.
Left out: the Trainer's own per-step work (data loading, logging) on both sides, which dilutes the
ratio, and the callback's work at saves and in its id collator, which adds to it.
`--width`, `--layers` and `--heads` widen the world's Llama (the same corpus, tokenizer and
batches) to read the ratio against model size: the callback's projections grow with d·k, the
model's own work with d². `--control` steps both copies plain, so the "callback" column is a
second plain copy: the ratio an A/A pair reads. Writes bench/out/callback-steps[-WxL][-control].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

OUT = Path("bench/out")


def batches(world, seed: int, count: int, size: int):
    """`count` batches of `size` examples spread over the corpus sorted by length (as group_by_length
    makes them), collated as the Trainer's collator does, with each example's document id."""
    from transformers import DataCollatorForLanguageModeling

    from bench.callback import make
    from service.demo.train import train_tokenizer
    w = make(world, seed, 1)
    texts = [d["text"] for d in w.documents]
    tokenizer = train_tokenizer(texts, w.config.vocab_size)
    encoded = [tokenizer(t + tokenizer.eos_token, truncation=True, max_length=w.config.n_positions) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    chunks = chunks[::max(1, len(chunks) // count)][:count]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    ids = [d["id"] for d in w.documents]
    return w.config, tokenizer, [(collator([encoded[i] for i in c]), [ids[i] for i in c]) for c in chunks]


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as store:  # the rows the callback writes: ~60 MB a run
        return _measure(args, store)


def _measure(args, store: str) -> dict:
    from transformers import TrainerState, TrainingArguments

    from indexer.callback import WherefromCallback
    from service.demo.train import tiny_model
    config, tokenizer, data = batches(args.world, args.seed, args.batches, args.batch_size)
    sizes = {"n_embd": args.width, "n_layer": args.layers, "n_head": args.heads}
    config = replace(config, **{k: v for k, v in sizes.items() if v})
    torch.manual_seed(args.seed)
    plain = tiny_model(config, tokenizer).train()
    recorded = copy.deepcopy(plain).train()
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=config.learning_rate) for m in (plain, recorded)}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizers[recorded], lambda _: 1.0)
    callback = WherefromCallback()
    targs = TrainingArguments(output_dir=store, use_cpu=True, report_to=[])
    state = TrainerState()
    if not args.control:
        callback.on_train_begin(targs, state, None, model=recorded)

    def step(model, batch, ids) -> float:
        t = time.perf_counter()
        if model is recorded and not args.control:
            state.global_step += 1
            callback.on_step_begin(targs, state, None, optimizer=optimizers[model])
            model(**batch, **{callback.id_column: ids}).loss.backward()
            callback.on_pre_optimizer_step(targs, state, None, lr_scheduler=schedule)
        else:
            model(**batch).loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad()
        return time.perf_counter() - t

    best = {"plain": [float("inf")] * len(data), "callback": [float("inf")] * len(data)}
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        for i, (batch, ids) in enumerate(data):
            pair = [("plain", plain), ("callback", recorded)]
            for name, model in (pair if (i + r) % 2 else pair[::-1]):
                seconds = step(model, batch, ids)
                if r:
                    best[name][i] = min(best[name][i], seconds)
    profile = ops_profile(step, [plain, recorded], data[:args.profile]) if args.profile else None
    if not args.control:
        callback.on_train_end(targs, state, None)
    tokens = sum(int(b["attention_mask"].sum()) for b, _ in data) / len(data)
    ms = {k: 1000 * sum(v) / len(v) for k, v in best.items()}
    params = sum(p.numel() for p in plain.parameters())
    return {"world": args.world, "seed": args.seed, "batches": len(data), "batch_size": args.batch_size,
            "control": args.control,
            "model": {"width": config.n_embd, "layers": config.n_layer, "heads": config.n_head, "parameters": params},
            "rounds": args.rounds, "tokens_per_batch": tokens, "threads": torch.get_num_threads(),
            "ms_per_step": ms, "added_ms": ms["callback"] - ms["plain"], "ratio": ms["callback"] / ms["plain"],
            "profile": profile}


def ops_profile(step, models, data) -> list[dict]:
    """Self CPU time per op of each copy over the same steps under torch.profiler, as the
    difference a step (callback − plain), largest first: where the callback's time goes. The
    profiler's own cost per op inflates the many small ones, so read shares, not milliseconds."""
    from torch.profiler import ProfilerActivity, profile
    per_copy = []
    for model in models:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch, ids in data:
                step(model, batch, ids)
        per_copy.append({e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()})
    plain, recorded = per_copy
    rows = []
    for k in set(plain) | set(recorded):
        (calls0, us0), (calls1, us1) = plain.get(k, (0, 0)), recorded.get(k, (0, 0))
        rows.append({"op": k, "calls": (calls1 - calls0) / len(data), "ms": (us1 - us0) / 1000 / len(data),
                     "plain_ms": us0 / 1000 / len(data)})
    return sorted(rows, key=lambda r: -abs(r["ms"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("demo", "realistic"), default="realistic")
    ap.add_argument("--seed", type=int, default=200, help="the world's seed (default: the realistic dev seed)")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="the realistic world's training batch")
    ap.add_argument("--rounds", type=int, default=8, help="each batch's time is its minimum over these")
    ap.add_argument("--control", action="store_true",
                    help="step the second copy without the callback too: the bench's own A/A difference")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many steps of each copy: self CPU time per op, callback − plain")
    ap.add_argument("--width", type=int, help="hidden size (default: the world's model)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the world's model)")
    ap.add_argument("--heads", type=int, help="attention heads (default: the world's model)")
    args = ap.parse_args()
    report = measure(args)
    print(f"{'':<10}{'ms/step':>10}")
    for name, ms in report["ms_per_step"].items():
        print(f"{name:<10}{ms:>10.2f}")
    what = "a second plain copy (--control)" if args.control else "callback"
    print(f"{what} adds {report['added_ms']:.2f} ms a step: {report['ratio']:.3f}x "
          f"({report['model']['parameters'] / 1e6:.1f}M parameters, "
          f"{report['batches']} batches of {report['batch_size']}, {report['tokens_per_batch']:.0f} tokens each, "
          f"{report['threads']} thread(s))")
    if report["profile"]:
        total = sum(r["plain_ms"] for r in report["profile"])
        print(f"\nprofiled, per step (plain: {total:.1f} ms of ops' self time); the 20 largest differences")
        print(f"{'op':<44}{'calls':>8}{'ms':>9}")
        for r in report["profile"][:20]:
            print(f"{r['op'][:43]:<44}{r['calls']:>8.1f}{r['ms']:>9.3f}")
    OUT.mkdir(exist_ok=True)
    suffix = f"-{report['model']['width']}x{report['model']['layers']}" if args.width or args.layers else ""
    suffix += "-control" if args.control else ""
    (OUT / f"callback-steps{suffix}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
