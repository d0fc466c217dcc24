"""Concatenated blocks (HF run_clm's group_texts): how close the callback's rows are to each
segment's own loss gradient, the row `--chunking packed` computes offline.

    OMP_NUM_THREADS=2 python -m bench.callback_blocks                 # realistic dev seed 200, 10 epochs
    OMP_NUM_THREADS=2 python -m bench.callback_blocks --epochs 1 --docs 500     # a quick look

Trains the realistic world's Llama (its config, `--epochs` of it) on the world's corpus with an id
per token (`per_token_ids`) concatenated and cut into blocks of `--block` tokens, the remainder
dropped, with `WherefromCallback` attached. Then, at the last checkpoint's weights and moments, for
every (block, document segment) whose tokens are predicted:
- exact: the gradient of the segment's own mean-token loss with the whole block as context (labels
  on the segment only: `indexer.corpus.pack_documents`' row), one backward pass each;
- split: the block's one gradient summed over the positions that predict the segment's tokens
  (`segment_runs`) and rescaled to the segment's mean-token loss: what the callback records.
Reports their cosine and relative error over the segments, and retrieval: each question's query
gradient (answer tokens, one checkpoint, no curvature) ranks the documents by cosine, a document's
row being the sum of its segments' rows; MRR of the first source document with either row set,
and the overlap of the two top-10s. Writes bench/out/callback-blocks-e<epochs>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import torch

OUT = Path("bench/out")


def group_texts(examples: dict, block: int) -> dict:
    """run_clm's own: every column concatenated, then cut into blocks of `block`, the remainder dropped."""
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = len(joined["input_ids"]) // block * block
    return {k: [v[i:i + block] for i in range(0, total, block)] for k, v in joined.items()}


def blocks_of(data, block: int):
    """A tokenized dataset (one document a row, with its id column) as run_clm trains it: the id
    repeated over each document's tokens, then every column concatenated and cut into blocks."""
    from indexer.document_ids import per_token_ids
    return per_token_ids(data).map(group_texts, batched=True, batch_size=len(data), fn_kwargs={"block": block})


def block_dataset(docs: list[dict], tokenizer, block: int):
    """The corpus's blocks: text + eos per document (`blocks_of`)."""
    import datasets
    enc = [tokenizer(d["text"] + tokenizer.eos_token)["input_ids"] for d in docs]
    return blocks_of(datasets.Dataset.from_dict({"input_ids": enc, "attention_mask": [[1] * len(e) for e in enc],
                                                 "wherefrom_id": [d["id"] for d in docs]}), block)


def split_rows(terms: torch.Tensor, labels: torch.Tensor, runs: list[int], run_of: torch.Tensor):
    """What the callback records for each run of a batch of blocks, from the per-position terms
    (B, T, D) of each row's mean-token loss gradient: their sum over the run, rescaled to the run's
    own mean-token loss. Returns (rows (runs, D) float64, each run's loss tokens)."""
    from indexer.document_ids import loss_positions
    per_position = loss_positions(labels).flatten().double()
    n_row = per_position.view(labels.shape).sum(1).repeat_interleave(labels.shape[1])
    n_run = torch.zeros(len(runs), dtype=torch.float64).index_add_(0, run_of, per_position)
    weights = n_row / n_run.clamp_min(1)[run_of]
    rows = torch.zeros(len(runs), terms.shape[-1], dtype=torch.float64).index_add_(
        0, run_of, terms.flatten(0, 1).double() * weights[:, None])
    return rows, n_run


def train_blocks(world, data, tokenizer, out: Path, epochs: int):
    """The world's model and config trained on the blocks with the callback; its last checkpoint."""
    from indexer.callback import WherefromCallback
    from service.demo.train import train
    # every block is BLOCK tokens: length grouping would only reorder them
    train([], out, replace(world.config, epochs=epochs, group_by_length=False), tokenizer=tokenizer,
          callback=WherefromCallback(), dataset=data)
    return max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def segment_rows(feat, data, collator, batch: int = 16) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(document of each segment, exact rows, split rows), segments in block order."""
    from indexer.document_ids import segment_runs
    names, exact, split = [], [], []
    for s in range(0, len(data), batch):
        rows = data[s:s + batch]
        b = collator([{"input_ids": i, "attention_mask": m} for i, m in zip(rows["input_ids"], rows["attention_mask"])])
        runs, run_of, docs = segment_runs(rows["wherefrom_id"], b["attention_mask"], b["labels"].shape)
        terms = feat.features(b["input_ids"], b["attention_mask"], b["labels"], per_token=True)
        rows_split, n_run = split_rows(terms, b["labels"], runs, run_of)
        keep = (n_run > 0).numpy()
        width = b["labels"].shape[1]
        # the exact row of each run: the block again, labels on the run's predicted tokens only
        starts = np.cumsum([0] + runs[:-1])
        ids, mask, labels = [], [], []
        for r, (start, length) in enumerate(zip(starts, runs)):
            if not keep[r]:
                continue
            row, at = divmod(int(start), width)
            only = torch.full((width,), -100, dtype=torch.long)
            span = slice(at + 1, at + length + 1)  # position t predicts token t + 1
            only[span] = b["labels"][row, span]
            ids.append(b["input_ids"][row]), mask.append(b["attention_mask"][row]), labels.append(only)
        for k in range(0, len(ids), 64):
            exact.append(feat.features(torch.stack(ids[k:k + 64]), torch.stack(mask[k:k + 64]),
                                       torch.stack(labels[k:k + 64])).double().numpy())
        names += [d for d, k in zip(docs, keep) if k]
        split.append(rows_split.numpy()[keep])
    return names, np.concatenate(exact), np.concatenate(split)


def retrieval(feat, tokenizer, questions, names: list[str], exact: np.ndarray, split: np.ndarray) -> dict:
    from attribution.tracer import encode_qa
    from indexer.gradients import collate
    docs = sorted(set(names))
    at = {d: i for i, d in enumerate(docs)}
    index = np.array([at[n] for n in names])
    out = {}
    for kind, rows in (("exact", exact), ("split", split)):
        m = np.zeros((len(docs), rows.shape[1]))
        np.add.at(m, index, rows)
        out[kind] = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-30)
    rr, overlap = {"exact": [], "split": []}, []
    for q in questions:
        sources = [at[s] for s in q.source_ids if s in at]
        if not sources:
            continue
        ids, first = encode_qa(tokenizer, q.prompt, " " + q.answer.strip())
        g = feat.features(*collate([ids], tokenizer.pad_token_id, label_from=[first]))[0].double().numpy()
        tops = {}
        for kind, m in out.items():
            order = np.argsort(-(m @ g))
            rank = np.flatnonzero(np.isin(order, sources))[0] + 1
            rr[kind].append(1 / rank)
            tops[kind] = set(order[:10].tolist())
        overlap.append(len(tops["exact"] & tops["split"]) / 10)
    return {"questions": len(overlap), **{f"mrr_{k}": float(np.mean(v)) for k, v in rr.items()},
            "top10_overlap": float(np.mean(overlap))}


def main():
    from transformers import DataCollatorForLanguageModeling

    from bench.callback import make
    from indexer.callback import recorded_ids, written_units
    from indexer.config import GradientConfig
    from indexer.gradients import Featurizer
    from indexer.loading import load_model
    from indexer.modelio import adam_second_moments
    from service.demo.train import train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=200, help="the realistic world's seed (default: its dev seed)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--block", type=int, default=64, help="block length, at most the model's context")
    ap.add_argument("--docs", type=int, default=None, help="only the first N documents (a quick run)")
    args = ap.parse_args()
    world = make("realistic", args.seed, args.epochs)
    world.documents = world.documents[:args.docs]
    tokenizer = train_tokenizer([d["text"] for d in world.documents], world.config.vocab_size)
    data = block_dataset(world.documents, tokenizer, args.block)
    out = OUT / f"callback-blocks-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)  # a previous run's checkpoints are not this one's
    t = time.perf_counter()
    last = train_blocks(world, data, tokenizer, out / "model", args.epochs)
    trained = time.perf_counter() - t
    store = out / "model" / "wherefrom"
    exposures = sum(json.loads((u / "unit.json").read_text())["rows"] for u in written_units(store))
    model, tokenizer = load_model(last)
    feat = Featurizer(model, GradientConfig(), adam_second_moments(model, last / "optimizer.pt"))
    t = time.perf_counter()
    names, exact, split = segment_rows(feat, data, DataCollatorForLanguageModeling(tokenizer, mlm=False))
    rows_s = time.perf_counter() - t
    cos = np.sum(exact * split, 1) / np.maximum(np.linalg.norm(exact, axis=1) * np.linalg.norm(split, axis=1), 1e-30)
    rel = np.linalg.norm(exact - split, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-30)
    result = {"seed": args.seed, "epochs": args.epochs, "block": args.block, "blocks": len(data),
              "segments": len(names), "documents": len(set(names)), "checkpoint": last.name,
              "recorded_rows": exposures, "recorded_documents": len(recorded_ids(store)),
              "train_seconds": trained, "rows_seconds": rows_s,
              "cosine": {"median": float(np.median(cos)), "p10": float(np.percentile(cos, 10)),
                         "p1": float(np.percentile(cos, 1))},
              "relative_error": {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90))},
              "retrieval": retrieval(feat, tokenizer, world.questions, names, exact, split)}
    (OUT / f"callback-blocks-e{args.epochs}.json").write_text(json.dumps(result, indent=2))
    print(f"{result['blocks']} blocks of {args.block}, {result['segments']} segments of {result['documents']} "
          f"documents; callback recorded {exposures} rows over {args.epochs} epochs ({trained:.0f} s training)")
    print(f"{'':24}{'median':>9}{'p10':>9}{'p1':>9}")
    print(f"{'cosine split vs exact':24}{result['cosine']['median']:9.4f}{result['cosine']['p10']:9.4f}"
          f"{result['cosine']['p1']:9.4f}")
    print(f"relative error: median {result['relative_error']['median']:.4f}, p90 {result['relative_error']['p90']:.4f}")
    r = result["retrieval"]
    print(f"retrieval ({r['questions']} questions, one checkpoint, no curvature): MRR exact {r['mrr_exact']:.3f}, "
          f"split {r['mrr_split']:.3f}; top-10 overlap {r['top10_overlap']:.3f}")


if __name__ == "__main__":
    main()
