"""Whitening the gradient query against directions many documents or many queries share: MRR of the
gradient method on the world's default build, exact scores over every row, per prompt style.

    python -m bench.grad_whiten --world realistic --seed 200     # the dev seed only: never tune on 201

A stored row is unit-norm EK-FAC features per checkpoint; EK-FAC whitens within each module, not
across modules or checkpoints, so a direction shared by a whole class of documents (one template,
one answer after it) keeps its weight. Variants, all query-side (d·M⁻¹q, no rebuild):
- `train λ`: M = C_train + λ·I, C_train the rows' second moment (scaled to unit mean eigenvalue);
- `queries mix λ`: TrackStar's task-specific mix, M = mix·C_train + (1 − mix)·C_query + λ·I,
  C_query the second moment of the other folds' query gradients (5-fold: a question never whitens
  itself), applied through the Woodbury identity in C_train's eigenbasis;
- each also with the rows renormalised after whitening (d·M⁻¹q / ‖M^-½ d‖).
Writes bench/out/grad-whiten-<world>-seed<S>.json.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np

from bench.grad_blocks import correct_queries, reciprocal_rank

OUT = Path("bench/out")
FOLDS = 5


def scaled(x: np.ndarray) -> np.ndarray:
    """x scaled so that xᵀx / n has unit mean eigenvalue."""
    return x * np.sqrt(x.shape[1] / max(float((x * x).sum()) / len(x), 1e-30))


def ranks(scores: np.ndarray, positives) -> list[float]:
    return [reciprocal_rank(s, p) for s, p in zip(scores, positives)]


def summary(rr, styles) -> dict:
    rr, styles = np.array(rr), np.array(styles)
    return {"mrr": float(rr.mean()), **{s: float(rr[styles == s].mean()) for s in sorted(set(styles))}}


def new_report(world: str, seed: int, correct) -> dict:
    """The JSON a dev-seed variant bench writes: its questions' prompt styles and, per variant, MRR."""
    styles = [getattr(q, "style", "completion") for q in correct]
    return {"world": world, "seed": seed, "correct": len(correct), "variants": {}, "styles": styles}


def record_variant(report: dict, name: str, rr: list[float]) -> None:
    """One variant's reciprocal ranks into `report`, and its line of the printed table."""
    s = summary(rr, report["styles"])
    report["variants"][name] = {"summary": s, "per_question": rr}
    print(f"{name:<40} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)


def cli(name: str, run, description: str) -> None:
    """`--world` and `--seed` (default the realistic dev seed), then `run`'s report to
    bench/out/<name>-<world>-seed<S>.json."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--world", choices=("realistic", "trap"), default="realistic")
    ap.add_argument("--seed", type=int, default=200)
    args = ap.parse_args()
    report = run(args.world, args.seed)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}-{args.world}-seed{args.seed}.json").write_text(json.dumps(report, indent=1))


def woodbury(g, q, d0, u):
    """Scores g·M⁻¹q and row norms ‖M^-½ g‖ for M = diag(d0) + uᵀu, all in one basis."""
    gi, ui = g / d0, u / d0
    core = np.linalg.inv(np.eye(len(u)) + u @ ui.T)  # (r, r)
    gu, qu = g @ ui.T, q @ ui.T  # (N, r), (Q, r)
    scores = (gi @ q.T - gu @ core @ qu.T).T  # (Q, N)
    norms = np.sqrt(np.maximum((g * gi).sum(1) - np.einsum("nr,rs,ns->n", gu, core, gu), 1e-30))
    return scores, norms


def run(world: str, seed: int, lams=(1.0, 0.3, 0.1, 0.03, 0.01), mixes=(0.99, 0.9, 0.5, 0.1)) -> dict:
    _, _, correct, _, grad, queries, positives = correct_queries(world, seed)
    report = new_report(world, seed, correct)

    record = partial(record_variant, report)

    record("today", ranks(queries @ grad.T, positives))
    g = scaled(grad.astype(np.float64))
    w, v = np.linalg.eigh(g.T @ g / len(g))  # C_train, unit mean eigenvalue
    w = np.maximum(w, 0)
    gr, qr = (g @ v), (queries.astype(np.float64) @ v)  # the eigenbasis
    report["train_spectrum_top"] = w[::-1][:50].tolist()
    for lam in lams:
        d0 = w + lam
        record(f"train λ={lam}", ranks((qr / d0) @ gr.T, positives))
        norms = np.sqrt(((gr * gr) / d0).sum(1))
        record(f"train λ={lam}, renorm", ranks((qr / d0) @ gr.T / norms, positives))
    fold = np.random.default_rng(seed).permutation(len(queries)) % FOLDS
    u_all = scaled(qr)
    for mix in mixes:
        for lam in (0.1, 0.01):
            plain = [None] * len(queries)
            renorm = [None] * len(queries)
            for f in range(FOLDS):
                held = np.flatnonzero(fold == f)
                u = u_all[fold != f] * np.sqrt((1 - mix) / (fold != f).sum())
                s, norms = woodbury(gr, qr[held], mix * w + lam, u)
                for j, i in enumerate(held):
                    plain[i] = reciprocal_rank(s[j], positives[i])
                    renorm[i] = reciprocal_rank(s[j] / norms, positives[i])
            record(f"queries mix={mix} λ={lam}", plain)
            record(f"queries mix={mix} λ={lam}, renorm", renorm)
    return report


def main():
    cli("grad-whiten", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
