"""Fusion candidates for `--method hybrid`, scored from one pass of per-method scores.

    python -m bench.fusion --seed 100               # dev seed: choose here (5-fold CV inside it)
    python -m bench.fusion --seed 101 --dev 100     # test seed: fit on dev, report here
    python -m bench.fusion --world realistic --seed 201 --dev 200   # the realistic world

The pools come from the world's default build, the one `bench.quality` traces (bench/out/{world}-seed{seed}/data).
Each correctly answered question is traced once through the product (`Tracer.candidates`: the
gradient, dense and BM25 top-100 and every method's raw score on the union, with the derived text
query); the pools are cached in bench/out/fusion-{world}-seed{seed}.npz. Every candidate rule then
orders the same pools, so no candidate retraces. Rules with parameters are fitted on the dev seed
only; on the dev seed their MRR is 5-fold cross-validated (fit on 4/5, score the held-out 1/5).
"Without grad" refits a rule on dense + BM25 alone, over the pool those two methods find.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize

from attribution.tracer import FUSION, combine, fuse, pool_ranks, zscores
from bench.quality import OUT, first_rank
from bench.trap_world import stating_ids

METHODS = ("grad", "dense", "bm25")
K = 100  # each method's candidates, as `Tracer.candidates`


@dataclass
class Pool:
    raw: dict[str, np.ndarray]  # method → (P,) raw scores
    truth: np.ndarray  # (P,) bool: a true source
    trap: bool
    style: str  # the question's prompt style ("completion", "question", …)
    whole_prompt: dict[str, int | None]  # rank of the first source by dense/BM25 on the whole prompt

    def ranks(self, m: str) -> np.ndarray:
        """1-based rank of each candidate by method m (ties by row, as the product's stable sort)."""
        return pool_ranks(self.raw[m])

    def found_by(self, methods) -> "Pool":
        """The pool as only `methods` would have formed it (candidates in one of their top-K)."""
        keep = np.any([self.ranks(m) <= K for m in methods], axis=0)
        return Pool({m: v[keep] for m, v in self.raw.items()}, self.truth[keep], self.trap, self.style,
                    self.whole_prompt)


def collect(world_name: str, seed: int, build: str = "data") -> list[Pool]:
    """One product pass per correctly answered question (cached)."""
    path = OUT / f"fusion-{world_name}-seed{seed}{'' if build == 'data' else '-' + build}.json"
    if path.exists():
        return [Pool({m: np.array(v) for m, v in p["raw"].items()}, np.array(p["truth"]), p["trap"], p["style"],
                     p["whole"])
                for p in json.loads(path.read_text())]
    from bench.product_path import open_build
    from indexer import semantic

    questions, tracer, ext, _ = open_build(world_name, seed, build)
    pos_of = {e: i for i, e in enumerate(ext)}
    pools = []
    for q, a, pool in answered_pools(tracer, questions):
        stating = stating_ids(q)
        truth = np.isin(pool.positions, [pos_of[i] for i in stating])
        whole = q.prompt + a  # the text query before attribution/text_query.py
        rows = {"dense": tracer.dense.astype(np.float32) @ semantic.embed([whole])[0],
                "bm25": tracer.lexical.scores(whole)}
        sources = {pos_of[i] for i in stating}
        pools.append(Pool(pool.raw, truth, bool(getattr(q, "is_trap", False)), getattr(q, "style", "completion"),
                          {m: first_rank(np.argsort(-v, kind="stable"), sources) for m, v in rows.items()}))
    path.write_text(json.dumps([{"raw": {m: v.tolist() for m, v in p.raw.items()}, "truth": p.truth.tolist(),
                                 "trap": p.trap, "style": p.style, "whole": p.whole_prompt} for p in pools]))
    return pools


def answered_pools(tracer, questions):
    """(question, answer as traced, `Tracer.candidates` pool) of each question the model answers correctly."""
    from service.demo.run import is_correct
    for q in questions:
        answer = tracer.generate(q.prompt)
        if is_correct(answer, q.answer):
            a = " " + answer.strip()
            yield q, a, tracer.candidates(q.prompt, a)


# Rules: fit(pools, methods) → score(pool) → (P,) scores. Fixed rules ignore the pools.
Rule = Callable[[Pool], np.ndarray]


def zsum(weights: dict[str, float]) -> Rule:
    return lambda p: combine(p.raw, weights)


def rrf(weights: dict[str, float], k: int = 60) -> Rule:
    """Reciprocal-rank fusion (Cormack et al. 2009): Σ w_m / (k + rank_m)."""
    return lambda p: sum(w / (k + p.ranks(m)) for m, w in weights.items())


def features(p: Pool, methods, log_rr: bool = True) -> np.ndarray:
    """Per candidate: each method's z-score and (with `log_rr`) log reciprocal rank. (P, F)"""
    cols = [zscores(p.raw[m]) for m in methods] + ([-np.log(p.ranks(m)) for m in methods] if log_rr else [])
    return np.stack(cols, axis=1)


def fit_listwise(xs: list[np.ndarray], truths: list[np.ndarray], l2: float = 1e-2) -> np.ndarray:
    """Conditional logit (a listwise logistic regression): maximise Σ log P(a true source | pool),
    P = softmax(x · w) over the pool. Coefficients (F,)."""
    def loss(w):
        total, grad = l2 * w @ w, 2 * l2 * w
        for x, t in zip(xs, truths):
            s = x @ w
            p = np.exp(s - s.max())
            p /= p.sum()
            pt = p * t / (p * t).sum()
            total -= np.log((p * t).sum())
            grad += p @ x - pt @ x
        return total / len(xs), grad / len(xs)
    return minimize(loss, np.zeros(xs[0].shape[1]), jac=True, method="L-BFGS-B").x


def fit_learned(pools: list[Pool], methods, log_rr: bool) -> Rule:
    w = fit_listwise([features(p, methods, log_rr) for p in pools], [p.truth for p in pools])
    rule = lambda p: features(p, methods, log_rr) @ w
    names = [f"z_{m}" for m in methods] + ([f"logrr_{m}" for m in methods] if log_rr else [])
    rule.coefficients = dict(zip(names, (round(float(x), 4) for x in w)))
    return rule


def fit_calibrated(pools: list[Pool], methods, mixture: bool) -> Rule:
    """Per-method calibration: a temperature per method, fitted alone (softmax of its z-scores over
    the pool = P(source)); fused as a product of experts (Σ z/T) or a mixture (mean of P)."""
    inv_t = {m: fit_listwise([zscores(p.raw[m])[:, None] for p in pools], [p.truth for p in pools])[0]
             for m in methods}

    def rule(p):
        logits = {m: a * zscores(p.raw[m]) for m, a in inv_t.items()}
        if not mixture:
            return sum(logits.values())
        return sum(np.exp(v - v.max()) / np.exp(v - v.max()).sum() for v in logits.values())
    rule.coefficients = {f"1/T_{m}": round(float(a), 4) for m, a in inv_t.items()}
    return rule


def grid(make, pools: list[Pool], methods, values=(0, 0.25, 0.5, 1, 2), **kw) -> Rule:
    """The best weights of a grid on `pools` (MRR, then trap MRR)."""
    best = None
    for ws in itertools.product(values, repeat=len(methods)):
        if not any(ws):
            continue
        rule = make(dict(zip(methods, ws)), **kw)
        key = score(rule, pools)
        if best is None or (key["mrr"], key["trap_mrr"]) > (best[0]["mrr"], best[0]["trap_mrr"]):
            best = key, rule, dict(zip(methods, ws))
    best[1].coefficients = best[2]
    return best[1]


# fewer fitted parameters first (`choose` prefers the earlier of two rules within 0.005)
CANDIDATES: dict[str, Callable[[list[Pool], tuple], Rule]] = {
    "z-sum grad 0.25 · dense 1 (the product's rule before FUSION)": lambda pools, ms: zsum(
        {m: {"grad": 0.25, "dense": 1.0, "bm25": 0.0}[m] for m in ms}),
    "the product's `fuse` (FUSION, fitted on both worlds' dev seeds)": lambda pools, ms: (
        lambda p: fuse(p.raw, {k: {m: v[m] for m in ms} for k, v in FUSION.items()})),
    "z-sum equal": lambda pools, ms: zsum({m: 1.0 for m in ms}),
    "RRF k=60 equal": lambda pools, ms: rrf({m: 1.0 for m in ms}),
    "z-sum, grid-fitted weights": lambda pools, ms: grid(zsum, pools, ms),
    "RRF k=60, grid-fitted weights": lambda pools, ms: grid(rrf, pools, ms),
    "calibrated, product of experts": lambda pools, ms: fit_calibrated(pools, ms, mixture=False),
    "calibrated, mixture": lambda pools, ms: fit_calibrated(pools, ms, mixture=True),
    "learned (conditional logit on z)": lambda pools, ms: fit_learned(pools, ms, log_rr=False),
    "learned (conditional logit on z + log rr)": lambda pools, ms: fit_learned(pools, ms, log_rr=True),
}
SINGLE = {m: (lambda m: lambda pools, ms: (lambda p: p.raw[m]))(m) for m in METHODS}


def score(rule: Rule, pools: list[Pool]) -> dict:
    rr = np.array([1 / r if (r := first_rank(np.argsort(-rule(p), kind="stable"), set(np.flatnonzero(p.truth))))
                   else 0.0 for p in pools])
    trap = np.array([p.trap for p in pools])
    return {"n": len(pools), "mrr": float(rr.mean()), "trap_mrr": float(rr[trap].mean()) if trap.any() else None}


def cross_validated(fit, pools: list[Pool], methods, folds: int = 5) -> dict:
    """MRR of `fit` on each fifth of `pools`, fitted on the other four fifths."""
    order = np.random.default_rng(0).permutation(len(pools))
    rr, traps = [], []
    for f in range(folds):
        held = set(order[f::folds].tolist())
        rule = fit([p for i, p in enumerate(pools) if i not in held], methods)
        part = [pools[i] for i in sorted(held)]
        s = score(rule, part)
        rr.append(s["mrr"] * s["n"])
        traps += [(s["trap_mrr"] or 0) * sum(p.trap for p in part), sum(p.trap for p in part)]
    return {"mrr": sum(rr) / len(pools), "trap_mrr": sum(traps[::2]) / max(sum(traps[1::2]), 1)}


def text_query_table(pools: list[Pool]) -> dict:
    """Dense and BM25 MRR with the derived text query against the whole prompt, per prompt style."""
    out = {}
    for style in sorted({p.style for p in pools}) + ["all"]:
        part = [p for p in pools if style in ("all", p.style)]
        for m in ("dense", "bm25"):
            derived = score(lambda p: p.raw[m], part)["mrr"]
            whole = float(np.mean([1 / r if (r := p.whole_prompt[m]) else 0.0 for p in part]))
            out[f"{m}, {style} ({len(part)})"] = {"derived": derived, "whole prompt": whole}
    return out


def report(world: str, seed: int, dev_seed: int, build: str = "data") -> dict:
    """Every rule's dev MRR (in-sample and 5-fold CV, with and without grad) and, for a test
    `seed`, its MRR there when fitted on the whole dev seed; the chosen rule by `choose`."""
    dev = collect(world, dev_seed, build)
    test = None if seed == dev_seed else collect(world, seed, build)
    no_grad = ("dense", "bm25")
    rows = {}
    for name, fit in {**SINGLE, **CANDIDATES}.items():
        rule = fit(dev, METHODS)
        row = {"coefficients": getattr(rule, "coefficients", None), "in-sample": score(rule, dev),
               "cv": cross_validated(fit, dev, METHODS)}
        if name in CANDIDATES:
            row["cv without grad"] = cross_validated(fit, [p.found_by(no_grad) for p in dev], no_grad)
        if test is not None:
            row["test"] = score(rule, test)
            if name in CANDIDATES:
                blind = fit([p.found_by(no_grad) for p in dev], no_grad)
                row["test without grad"] = score(blind, [p.found_by(no_grad) for p in test])
        rows[name] = row
    shown = test or dev
    return {"world": world, "seed": seed, "dev_seed": dev_seed, "questions": len(shown),
            "trap_questions": sum(p.trap for p in shown), "rules": rows, "chosen": choose(rows),
            "text_query": text_query_table(shown)}


def choose(rows: dict) -> str:
    """The rule: the fusion candidate with the best dev CV MRR; within 0.005 of it, the one with
    fewer fitted parameters (the first in the order of CANDIDATES)."""
    best = max(rows[n]["cv"]["mrr"] for n in CANDIDATES)
    return next(n for n in CANDIDATES if rows[n]["cv"]["mrr"] >= best - 0.005)


def print_report(r: dict) -> None:
    fmt = lambda s: "—" if s is None else f"{s['mrr']:.3f} / {s['trap_mrr']:.3f}"
    cols = ["in-sample", "cv", "cv without grad"] + (["test", "test without grad"] if r["seed"] != r["dev_seed"] else [])
    print(f"{r['world']} world, seed {r['seed']} (fitted and chosen on {r['dev_seed']}): {r['questions']} correctly "
          f"answered questions, {r['trap_questions']} trap; cells MRR / trap MRR")
    print("| rule | " + " | ".join(cols) + " | coefficients |\n|" + " --- |" * (len(cols) + 2))
    for name, row in r["rules"].items():
        print(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + f" | {row['coefficients'] or ''} |")
    chosen = r["rules"][r["chosen"]]
    last = "test" if r["seed"] != r["dev_seed"] else "cv"
    print(f"\nchosen on the dev seed: {r['chosen']}; removing grad: MRR {chosen[last]['mrr']:.3f} → "
          f"{chosen[last + ' without grad']['mrr']:.3f}, trap {chosen[last]['trap_mrr']:.3f} → "
          f"{chosen[last + ' without grad']['trap_mrr']:.3f} ({last})")
    print("\n| text query MRR | derived | whole prompt |\n| --- | --- | --- |")
    for name, row in r["text_query"].items():
        print(f"| {name} | {row['derived']:.3f} | {row['whole prompt']:.3f} |")


def main():
    ap = argparse.ArgumentParser(description="Fusion candidates from one pass of per-method scores.")
    ap.add_argument("--world", choices=("trap", "realistic"), default="trap")
    ap.add_argument("--seed", type=int, default=101, help="the seed to report (101: test)")
    ap.add_argument("--dev", type=int, default=100, help="the seed rules are fitted and chosen on")
    ap.add_argument("--build", default="data", help="the data dir under bench/out/{world}-seed{seed}/ to score")
    args = ap.parse_args()
    r = report(args.world, args.seed, args.dev, args.build)
    print_report(r)
    (OUT / f"fusion-{args.world}-seed{args.seed}-report.json").write_text(json.dumps(r, indent=1, default=float))


if __name__ == "__main__":
    main()
