"""The default's list past its likely sources: the fused order for those, then the gradient's.

    python -m bench.fusion_tail --world realistic --seed 200            # dev seed: every rule, choose here
    python -m bench.fusion_tail --world realistic --seed 201            # test seed: report, never choose

The fusion (`attribution.tracer.FUSION`) is a conditional logit fitted to put the fact's first
source on top: its MRR is dense's or better, but its places 2-10 are mostly dense's neighbours,
which a training step on them barely moves (tail-patch). The gradient's top-10 moves the answer
most and finds fewer sources. A two-stage list keeps the candidates the fusion believes are
sources (softmax probability over the pool ≥ τ, or ≥ τ × the top candidate's) in its order, and
ranks every other candidate by the gradient score. Each rule orders the same product pools (one
`Tracer.candidates` pass per correctly answered question of the world's default build); each
document's tail-patch Δ is computed once per question (`attribution.verify`, as bench.product_path).
Writes bench/out/fusion-tail-<world>-seed<seed>.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import numpy as np

from attribution.tracer import fuse, hybrid_order
from bench.product_path import OUT, open_build
from bench.quality import first_rank
from bench.trap_world import stating_ids

Rule = Callable[[dict, np.ndarray], np.ndarray]  # (raw scores, fused) → candidate order


def two_stage(tau: float, relative: bool) -> Rule:
    """The fusion's likely sources first (p ≥ τ: `attribution.tracer.hybrid_order`, or p ≥ τ · p_max),
    in its order; then every other candidate by the gradient score."""
    def rule(raw, fused):
        # p ≥ τ · p_max is p ≥ τ · p_max / Σp in the product's terms: the same cut, rescaled per pool
        p = np.exp(fused - fused.max())
        return hybrid_order(fused, raw["grad"], tau / p.sum() if relative else tau)
    return rule


def prefix(m: int) -> Rule:
    """The fusion's first `m`, then the gradient's order."""
    def rule(raw, fused):
        order = np.argsort(-fused, kind="stable")
        rest = order[m:]
        return np.concatenate([order[:m], rest[np.argsort(-raw["grad"][rest], kind="stable")]])
    return rule


RULES: dict[str, Rule] = {
    "fused (the rule before)": lambda raw, fused: np.argsort(-fused, kind="stable"),
    "grad": lambda raw, fused: np.argsort(-raw["grad"], kind="stable"),
    "dense": lambda raw, fused: np.argsort(-raw["dense"], kind="stable"),
    **{f"first {m} fused, then grad": prefix(m) for m in (1, 2, 3, 5)},
    **{f"p >= {t}, then grad": two_stage(t, False) for t in (0.01, 0.02, 0.05, 0.1, 0.2)},
    **{f"p >= {t} p_max, then grad": two_stage(t, True) for t in (0.01, 0.03, 0.1, 0.3)},
}


def pools(world: str, seed: int) -> list[dict]:
    """Per correctly answered question: its pool's raw scores, truths and each rule's top-10 Δs."""
    from attribution.verify import tail_patcher
    from bench.fusion import answered_pools

    questions, tracer, ext, texts = open_build(world, seed)
    pos_of = {e: i for i, e in enumerate(ext)}
    _, tokenizer, _ = tracer.featurizer(0)
    patcher = tail_patcher(tracer)
    out = []
    for q, a, pool in answered_pools(tracer, questions):
        fused = fuse(pool.raw)
        tops = {name: rule(pool.raw, fused) for name, rule in RULES.items()}
        docs = sorted({int(i) for order in tops.values() for i in order[:10]})
        ids = [tokenizer(texts[pool.positions[i]], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for i in docs]
        delta = dict(zip(docs, patcher.deltas(q.prompt, a, ids)))
        truth = {name: np.isin(pool.positions, [pos_of[i] for i in ids_]) for name, ids_ in
                 (("all", stating_ids(q)), ("statements", q.source_ids))}
        out.append({"trap": bool(getattr(q, "is_trap", False)), "style": getattr(q, "style", "completion"),
                    "rank": {name: {t: first_rank(order[:100], set(np.flatnonzero(truth[t]).tolist())) for t in truth}
                             for name, order in tops.items()},
                    "tail_patch": {name: float(np.mean([delta[int(i)] for i in order[:10]]))
                                   for name, order in tops.items()}})
        print(f"{len(out)} questions", end="\r", flush=True)
    return out


def table(records: list[dict]) -> dict:
    mrr = lambda rs, name, t: float(np.mean([1 / r["rank"][name][t] if r["rank"][name][t] else 0 for r in rs]))
    traps = [r for r in records if r["trap"]]
    rows = {}
    for name in records[0]["rank"]:
        rows[name] = {"mrr": mrr(records, name, "all"), "mrr_statements": mrr(records, name, "statements"),
                      "trap": mrr(traps, name, "all") if traps else None,
                      "tail_patch": float(np.mean([r["tail_patch"][name] for r in records]))}
    grad = rows["grad"]["tail_patch"]
    for row in rows.values():
        row["tail_patch_over_grad"] = row["tail_patch"] / grad
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("realistic", "trap"), default="realistic")
    ap.add_argument("--seed", type=int, default=200)
    args = ap.parse_args()
    records = pools(args.world, args.seed)
    rows = table(records)
    print(f"{len(records)} correctly answered questions, {args.world} seed {args.seed}")
    print(f"{'rule':<32}{'MRR':>8}{'stmts':>8}{'trap':>8}{'tp':>8}{'tp/grad':>9}")
    for name, r in rows.items():
        print(f"{name:<32}{r['mrr']:>8.3f}{r['mrr_statements']:>8.3f}{(r['trap'] or 0):>8.3f}"
              f"{r['tail_patch']:>8.3f}{r['tail_patch_over_grad']:>9.3f}")
    OUT.mkdir(exist_ok=True)
    path = OUT / f"fusion-tail-{args.world}-seed{args.seed}.json"
    path.write_text(json.dumps({"world": args.world, "seed": args.seed, "rules": rows, "records": records}, indent=1))


if __name__ == "__main__":
    main()
