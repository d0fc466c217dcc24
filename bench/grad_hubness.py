"""Hub rows and template-shared directions in the gradient index: MRR of the gradient method when
the score discounts what a row or a query shares with its neighbourhood.

    python -m bench.grad_hubness --world realistic --seed 200     # the dev seed only: never tune on 201

On the realistic dev seed a chat-template query's nearest rows are *other people's* chat documents
(cosine ~0.8): every row of one template shares a direction, and the query's answer term lies along
it. These variants remove what a query or a row shares with its k nearest rows, all computed from
the stored rows (no rebuild), exact scores over every row of the default build:
- `query centred k α`: q' = q − α μ_k(q), μ_k(q) the mean of the query's k nearest rows;
- `query projected k`: q' = q with its component along μ_k(q) removed;
- `rows centred k β` (localized centring, Hara et al. 2015): d' = d − β μ_k(d), μ_k(d) the mean of
  the row's k nearest other rows, so q·d' = q·d − β mean over d's neighbours of q·n;
- `csls k β`: q·d − β r_k(d), r_k(d) the row's mean cosine to its k nearest other rows (CSLS's hub term);
- combinations of a row-side and a query-side variant;
- `global mean a`: q' = q − a m, m the mean row; `all but the top m` (Mu & Viswanath 2018): q
  without its components along the rows' top m principal directions (of the centred rows).
Writes bench/out/grad-hubness-<world>-seed<S>.json.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.grad_blocks import correct_queries, reciprocal_rank
from bench.grad_whiten import cli, new_report, record_variant

KS = (5, 10, 20, 50, 100)


def neighbours(grad: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by inner product: (indices (N, k), scores (N, k)), best first."""
    n = len(grad)
    idx, val = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        s = grad[start:start + chunk] @ grad.T  # (c, N)
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf  # not itself
        part = np.argpartition(-s, k, axis=1)[:, :k]
        v = np.take_along_axis(s, part, 1)
        order = np.argsort(-v, axis=1)
        idx[start:start + chunk] = np.take_along_axis(part, order, 1)
        val[start:start + chunk] = np.take_along_axis(v, order, 1)
    return idx, val


def run(world: str, seed: int) -> dict:
    t = time.perf_counter()
    _, _, correct, _, grad, queries, positives = correct_queries(world, seed)
    print(f"{len(correct)} correct questions, {grad.shape} rows ({time.perf_counter() - t:.0f} s)", flush=True)
    report = new_report(world, seed, correct)

    def record(name, scores):
        record_variant(report, name, [reciprocal_rank(s, p) for s, p in zip(scores, positives)])

    t = time.perf_counter()
    nbr, nbr_val = neighbours(grad, max(KS))
    print(f"row neighbours: {time.perf_counter() - t:.0f} s", flush=True)
    s = queries @ grad.T  # (Q, N)
    record("today", s)
    mean = grad.mean(0)
    for a in (0.5, 1.0):
        record(f"global mean a={a}", s - a * (mean @ grad.T)[None, :])
    # exact principal directions: a randomized SVD (svd_lowrank, q=40) moved top-30's MRR by 0.008 between runs
    centred = torch.from_numpy(grad - mean).double()
    _, v = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    v = v.flip(1)[:, :30].float().numpy()
    for m in (1, 3, 10, 30):
        u = v[:, :m]
        record(f"all but the top {m}", s - ((queries @ u) @ u.T) @ grad.T)
    q_top = np.argsort(-s, axis=1)[:, :max(KS)]
    for k in KS:
        mu_q = grad[q_top[:, :k]].mean(1)  # (Q, D)
        back = mu_q @ grad.T  # μ_k(q)·d
        for a in (0.25, 0.5, 1.0):
            record(f"query centred k={k} a={a}", s - a * back)
        unit = mu_q / np.linalg.norm(mu_q, axis=1, keepdims=True)
        record(f"query projected k={k}", s - (queries * unit).sum(1, keepdims=True) * (unit @ grad.T))
        hub = nbr_val[:, :k].mean(1)  # r_k(d)
        for b in (0.25, 0.5, 1.0):
            record(f"csls k={k} b={b}", s - b * hub[None, :])
        # q·μ_k(d) and μ_k(q)·μ_k(d): the mean of a score row over d's neighbours
        local, back_local = (np.stack([row[nbr[:, :k]].mean(1) for row in m]) for m in (s, back))
        for b in (0.5, 1.0):
            record(f"rows centred k={k} b={b}", s - b * local)
            # (q − 0.5 μ_k(q))·(d − b μ_k(d))
            record(f"rows centred k={k} b={b} + query centred a=0.5", s - b * local - 0.5 * (back - b * back_local))
    return report


def main():
    cli("grad-hubness", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
