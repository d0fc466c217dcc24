"""Leave-top-k-out: retrain without each method's top-k documents and see how much the answers drop.

    python -m bench.leave_out --seed 101 --facts 10 --k 3

For a sample of correctly answered facts (completion prompts, distinct facts), each method's top-k
documents for every sampled fact are removed together, the model is retrained from scratch with the
same seed and settings, and the drop in the answers' log-probability is compared with removing k
random documents per fact and with removing k of the true source documents. One retraining per
method (about 1–2 minutes each here).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from bench.quality import OUT, prepare
from bench.trap_world import stating_ids

METHODS = ("hybrid", "bm25 (q+a)", "dense (q+a)", "trackstar", "tracin cosine")


def final_logprobs(model_dir: Path, pairs) -> list[float]:
    """log p(answer | prompt) under the last checkpoint of `model_dir`, for each (prompt, answer)."""
    from attribution.explain import answer_logprob
    from indexer.loading import load_model
    from indexer.modelio import discover_checkpoints
    model, tokenizer = load_model(discover_checkpoints(model_dir)[-1].path)
    return [answer_logprob(model, tokenizer, prompt, answer) for prompt, answer in pairs]


def question_logprobs(model_dir: Path, questions) -> list[float]:
    """log p(" " + answer | prompt) under the last checkpoint, for each question."""
    return final_logprobs(model_dir, [(q.prompt, " " + q.answer) for q in questions])


def removal_sets(world, tracer, scorer, questions, ext, k: int, rng) -> dict[str, set[str]]:
    sets = {m: set() for m in METHODS + ("random", "ground truth")}
    for q in questions:
        a = " " + q.answer
        scores = scorer.scores(q.prompt, a)
        for m in METHODS:
            if m == "hybrid":
                top = [h.position for h in tracer.rank(q.prompt, a, k=k).hits]
            else:
                top = np.argsort(-scores[m], kind="stable")[:k]
            sets[m] |= {ext[int(p)] for p in top}
        sets["random"] |= set(rng.sample(ext, k))
        sets["ground truth"] |= set(stating_ids(q)[:k])
    return sets


def run(seed: int, n_facts: int, k: int) -> dict:
    from bench.methods import Scorer
    from service.demo.train import TrainConfig, train
    from service.demo.run import is_correct

    world, _, tracer, ext, _, tokens, folder = prepare(seed)
    scorer = Scorer(folder, tracer, tokens)
    rng = random.Random(seed)
    pool = [q for q in world.questions if q.style == "completion"]
    rng.shuffle(pool)
    chosen = [q for q in pool if is_correct(tracer.generate(q.prompt), q.answer)][:n_facts]
    sets = removal_sets(world, tracer, scorer, chosen, ext, k, rng)
    base = question_logprobs(folder / "model", chosen)
    result = {"seed": seed, "facts": len(chosen), "k": k, "full_model_logprob": float(np.mean(base)), "methods": {}}
    for method, removed in sets.items():
        out = folder / "leave-out" / method.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")
        if not any(out.glob("checkpoint-*/model.safetensors")):
            docs = [d["text"] for d in world.documents if d["id"] not in removed]
            torch.manual_seed(seed)
            train(docs, out, TrainConfig(seed=seed))
        after = question_logprobs(out, chosen)
        truth_removed = sum(len(removed & set(stating_ids(q))) for q in chosen)
        result["methods"][method] = {"removed": len(removed), "true_sources_removed": truth_removed,
                                     "mean_drop": float(np.mean(np.array(base) - np.array(after))),
                                     "still_correct": int(sum(np.exp(a) > 0.5 for a in after))}
        print(method, result["methods"][method], flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description="Leave-top-k-out retraining on the trap world.")
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    result = run(args.seed, args.facts, args.k)
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"leave-top-{args.k}-out, seed {args.seed}, {result['facts']} facts "
                        f"(full model mean log p(answer) {result['full_model_logprob']:.3f})")
    for col in ("removed by", "docs removed", "true sources among them", "mean drop in log p", "still correct"):
        table.add_column(col, justify="right" if col != "removed by" else "left")
    for m, r in result["methods"].items():
        table.add_row(m, str(r["removed"]), str(r["true_sources_removed"]), f"{r['mean_drop']:.3f}",
                      f"{r['still_correct']}/{result['facts']}")
    Console(width=160).print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"leave-out-seed{args.seed}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
