"""Contrasting the query gradient with the same question asked about other people: MRR of the
gradient method when the query loses what its answer owes to the template, relation and answer
alone, and keeps what it owes to the question's subject.

    python -m bench.grad_subject --world realistic --seed 200     # the dev seed only: never tune on 201

On question-style prompts the rows that outrank a fact's sources are mostly other people's
question–answer documents of the same attribute and answer (BENCHMARKS.md, "Centring the query's
layer inputs against its template"): their gradients share the template, the relation and the
answer with the query, and only the person differs. This bench is an oracle: it knows the world's
`question.person` and swaps it in the exact prompt, which the product cannot do without finding the
subject itself. If even the oracle does not lift the gradient method, no subject finder will.

For each correctly answered question, with its answer fixed, the query gradients (the product's:
per checkpoint EK-FAC, unit norm, checkpoint weight) of the same prompt with the person replaced by
- `others`: K other people of the world's questions (seeded);
- `made-up`: K names recombined from the world's first and last names that name nobody;
- `someone`: the words "this person".
m is their mean; the variants rank by (q − β m)·d, or by q with its component along m removed.
Exact scores over every row, the stored rows unchanged (no rebuild).
Writes bench/out/grad-subject-<world>-seed<S>.json.
"""

from __future__ import annotations

import random
import time

import numpy as np

from bench.grad_blocks import queries_of, reciprocal_rank
from bench.grad_whiten import cli, new_report, record_variant

K = 4
BETAS = (0.5, 0.8, 1.0)


def stand_ins(person: str, people: list[str], kind: str, rng: random.Random) -> list[str]:
    """What replaces `person` in the prompt: K other people, K made-up names, or a phrase."""
    if kind == "someone":
        return ["this person"]
    if kind == "others":
        return rng.sample([p for p in people if p != person], K)
    firsts = sorted({p.split()[0] for p in people})
    lasts = sorted({p.split()[-1] for p in people})
    taken, out = set(people), []
    while len(out) < K:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in taken and name not in out:
            out.append(name)
    return out


def run(world: str, seed: int) -> dict:
    from bench.product_path import open_build

    t = time.perf_counter()
    questions, tracer, ext, _ = open_build(world, seed)
    _, _, correct, answers, grad, queries, positives = queries_of(questions, tracer, ext)
    report = new_report(world, seed, correct)
    people = sorted({q.person for q in questions})
    print(f"{len(correct)} questions, {grad.shape} rows, {len(people)} people ({time.perf_counter() - t:.0f} s)",
          flush=True)
    record_variant(report, "today", [reciprocal_rank(grad @ v, p) for v, p in zip(queries, positives)])
    missing = sum(q.person not in q.prompt for q in correct)
    report["prompts_without_the_person"] = missing  # these keep today's query
    for kind in ("others", "made-up", "someone"):
        rng = random.Random(seed)
        means = []
        for q, a, v in zip(correct, answers, queries):
            if q.person not in q.prompt:
                means.append(np.zeros_like(v))
                continue
            swapped = [tracer.query_gradient(q.prompt.replace(q.person, s), a)
                       for s in stand_ins(q.person, people, kind, rng)]
            means.append(np.mean(swapped, axis=0))
        m = np.stack(means)
        report.setdefault("cosine_to_contrast", {})[kind] = float(np.mean(
            [(v @ c) / max(np.linalg.norm(v) * np.linalg.norm(c), 1e-30) for v, c in zip(queries, m) if c.any()]))
        for beta in BETAS:
            record_variant(report, f"{kind}, q − {beta} m",
                           [reciprocal_rank(grad @ (v - beta * c), p) for v, c, p in zip(queries, m, positives)])
        removed = [v - (v @ c) / max(c @ c, 1e-30) * c for v, c in zip(queries, m)]
        record_variant(report, f"{kind}, q ⊥ m", [reciprocal_rank(grad @ v, p) for v, p in zip(removed, positives)])
        print(f"{kind}: mean cosine q·m {report['cosine_to_contrast'][kind]:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return report


def main():
    cli("grad-subject", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
