"""Which parts of the gradient feature carry the attribution: MRR of the gradient method per
checkpoint alone, and with per-block weights fitted by 5-fold cross-validation on a dev seed.

    python -m bench.grad_blocks --world realistic --seed 200     # the dev seed only: never tune on 201

A stored row is the concatenation, over checkpoints c, of unit-norm EK-FAC features × √(lr share);
within a checkpoint the feature is the concatenation of k × k blocks, one per tracked module. The
gradient score d·q is therefore the sum of block inner products d_b·q_b, and any per-block weight w_b
is a query-time change (score Σ w_b d_b·q_b = d·(w ⊙ q)) that needs no rebuild. This bench scores
every row of the world's default build (exact, not through FAISS) for each correctly answered
question, groups blocks (per checkpoint; per checkpoint × module kind; per checkpoint × layer), fits
weights by a conditional logit over all rows (softmax, the source documents as positives, L2 toward
the current weights), and reports held-out MRR per grouping. Writes bench/out/grad-blocks-<world>-seed<S>.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from bench.trap_world import stating_ids

OUT = Path("bench/out")
FOLDS = 5
CUTOFF = 100  # MRR counts the first source document within the top 100, as bench.product_path does


def module_kind(name: str) -> str:
    """The module's role, without its layer number: `model.layers.3.mlp.down_proj` → `mlp.down_proj`."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def layer_of(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))


def block_scores(grad: np.ndarray, queries: np.ndarray, per: int) -> np.ndarray:
    """(Q, N, B) inner products of every row with each query, per block of `per` dims (k_in × k_out of
    one module); B = checkpoints × modules."""
    rows = grad.reshape(len(grad), -1, per)  # (N, B, k²)
    return np.stack([np.einsum("nbk,bk->nb", rows, q.reshape(-1, per)).astype(np.float16) for q in queries])


def groupings(layers: list[str], checkpoints: int) -> dict[str, np.ndarray]:
    """Block → group index, for each way of tying weights."""
    kinds = sorted({module_kind(n) for n in layers})
    depth = sorted({layer_of(n) for n in layers})
    per_ckpt = {
        "one weight (today)": [0] * len(layers),
        "checkpoint": [0] * len(layers),
        "checkpoint x module kind": [kinds.index(module_kind(n)) for n in layers],
        "checkpoint x layer": [depth.index(layer_of(n)) for n in layers],
    }
    out = {}
    for name, within in per_ckpt.items():
        width = max(within) + 1
        out[name] = np.array([0 if name.startswith("one") else c * width + g
                              for c in range(checkpoints) for g in within])
    return out


def reciprocal_rank(score: np.ndarray, positives: np.ndarray) -> float:
    """1 / the 1-based rank of the best positive, 0 beyond CUTOFF."""
    r = int((score > score[positives].max()).sum()) + 1
    return 1 / r if r <= CUTOFF else 0.0


def mrr(weights: np.ndarray, scores, positives) -> float:
    return float(np.mean([reciprocal_rank(s.astype(np.float32) @ weights, pos) for s, pos in zip(scores, positives)]))


def fit(scores, positives, groups: np.ndarray, l2: float = 1e-2, steps: int = 150) -> np.ndarray:
    """Per-group weights maximising the log-likelihood of the positives under a softmax over all rows."""
    n_groups = int(groups.max()) + 1
    theta = torch.ones(n_groups, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)  # scores are cosines: learn a scale
    g = torch.as_tensor(groups)
    data = [(torch.as_tensor(s.astype(np.float32), dtype=torch.float64), torch.as_tensor(p))
            for s, p in zip(scores, positives)]
    opt = torch.optim.LBFGS([theta, temp], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w = theta[g] * torch.exp(temp) * 20
        loss = 0.0
        for s, p in data:
            z = s @ w
            loss = loss - (torch.logsumexp(z[p], 0) - torch.logsumexp(z, 0))
        loss = loss / len(data) + l2 * ((theta - 1) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().numpy()[groups]


def cross_validated(scores, positives, groups, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(scores))
    folds = np.array_split(order, FOLDS)
    held = np.zeros(len(scores))
    for f in folds:
        train = np.setdiff1d(order, f)
        w = fit([scores[i] for i in train], [positives[i] for i in train], groups)
        for i in f:
            held[i] = reciprocal_rank(scores[i].astype(np.float32) @ w, positives[i])
    w_all = fit(scores, positives, groups)
    return {"cv_mrr": float(held.mean()), "per_question": held.tolist(), "weights_all": w_all.tolist()}


def template_of(prompt: str, markers) -> str | None:
    """The prompt with its question's content removed (the template, system part and solved examples
    left), or None when the content is the whole prompt (a completion) or cannot be found verbatim."""
    from attribution.text_query import question_content
    content = question_content(prompt, markers)
    at = prompt.rfind(content) if content else -1
    if at < 0 or content == " ".join(prompt.split()):
        return None
    return prompt[:at] + prompt[at + len(content):]


def contrast(tracer, grad, correct, answers, queries, positives, alphas=(0.0, 0.5, 1.0)) -> dict:
    """Reciprocal ranks when the query loses its component along the gradient of the same answer
    after the bare template: q − α (q·t / t·t) t. Completion prompts (no template) keep their query."""
    markers = tracer.text_markers()
    rr = {str(a): [] for a in alphas}
    for q, answer, query, pos in zip(correct, answers, queries, positives):
        template = template_of(q.prompt, markers)
        t = tracer.query_gradient(template, answer) if template else None
        for a in alphas:
            v = query if t is None else query - a * (query @ t) / (t @ t) * t
            rr[str(a)].append(reciprocal_rank(grad @ v, pos))
    return rr


def block_normalised(scores: np.ndarray, grad: np.ndarray, queries: np.ndarray, per: int, positives) -> float:
    """MRR when every block (checkpoint × module) of rows and queries is unit-normalised before the
    sum: each module's cosine counts alike, whatever its gradient's share of the norm."""
    norms = np.maximum(np.linalg.norm(grad.reshape(len(grad), -1, per), axis=2), 1e-12)  # (N, B)
    q_norms = np.maximum(np.linalg.norm(queries.reshape(len(queries), -1, per), axis=2), 1e-12)  # (Q, B)
    return float(np.mean([reciprocal_rank((s.astype(np.float32) / norms / qn).sum(1), pos)
                          for s, qn, pos in zip(scores, q_norms, positives)]))


def correct_queries(world: str, seed: int):
    """(tracer, questions, the correctly answered ones, their answers, grad rows (N, D), their query
    gradients (Q, D), each one's source rows) on the world's default build."""
    from bench.product_path import open_build

    questions, tracer, ext, _ = open_build(world, seed)
    return queries_of(questions, tracer, ext)


def queries_of(questions, tracer, ext: list[str]):
    """`correct_queries` on a build already open: `questions`, its tracer and its rows' document ids."""
    from service.demo.run import is_correct

    row_of = {}
    for i, e in enumerate(ext):
        row_of.setdefault(e, []).append(i)
    correct, answers = [], []
    for q in questions:
        answer = tracer.generate(q.prompt)
        if is_correct(answer, q.answer):
            correct.append(q)
            answers.append(answer)
    grad = np.asarray(tracer.grad, dtype=np.float32)  # (N, D), once: every variant scores it
    queries = np.stack([tracer.query_gradient(q.prompt, a) for q, a in zip(correct, answers)])  # (Q, D)
    positives = [np.array([r for s in stating_ids(q) for r in row_of.get(s, [])], dtype=np.int64) for q in correct]
    return tracer, questions, correct, answers, grad, queries.astype(np.float32), positives


def run(world: str, seed: int, fit_blocks: bool = True) -> dict:
    tracer, questions, correct, answers, grad, queries, positives = correct_queries(world, seed)
    layers = tracer.info["gradient"]["layers"]
    per = tracer.info["gradient"]["dims"][0] // len(layers)  # k_in × k_out of each module
    scores = block_scores(grad, queries, per)
    n_ckpt = len(tracer.info["gradient"]["dims"])
    groups = groupings(layers, n_ckpt)
    report = {"world": world, "seed": seed, "correct": len(correct), "questions": len(questions),
              "styles": [getattr(q, "style", "completion") for q in correct], "alone": {}, "fitted": {}}
    blocks = scores.shape[2]
    today = np.ones(blocks)
    report["today"] = mrr(today, scores, positives)
    per_ckpt = blocks // n_ckpt
    for c in range(n_ckpt):
        w = np.zeros(blocks)
        w[c * per_ckpt:(c + 1) * per_ckpt] = 1
        report["alone"][f"checkpoint {c}"] = mrr(w, scores, positives)
    report["block_normalised"] = block_normalised(scores, grad, queries, per, positives)
    print(f"blocks unit-normalised: {report['block_normalised']:.3f}", flush=True)
    report["contrast"] = contrast(tracer, grad, correct, answers, queries, positives)
    for name, g in groups.items() if fit_blocks else ():
        report["fitted"][name] = cross_validated(scores, positives, g, seed)
        print(f"{name:<28} cv MRR {report['fitted'][name]['cv_mrr']:.3f}", flush=True)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("realistic", "trap"), default="realistic")
    ap.add_argument("--seed", type=int, default=200)
    ap.add_argument("--no-fit", action="store_true", help="skip the per-block weight fits")
    args = ap.parse_args()
    report = run(args.world, args.seed, not args.no_fit)
    print(f"correct {report['correct']}/{report['questions']}; grad MRR today {report['today']:.3f}")
    for k, v in report["alone"].items():
        print(f"  {k} alone: {v:.3f}")
    styles = np.array(report["styles"])
    for name, r in report["fitted"].items():
        held = np.array(r["per_question"])
        split = {s: float(held[styles == s].mean()) for s in sorted(set(styles))}
        print(f"  {name:<28} cv {r['cv_mrr']:.3f}  " + "  ".join(f"{s} {v:.3f}" for s, v in split.items()))
    for a, held in report["contrast"].items():
        held = np.array(held)
        split = {s: float(held[styles == s].mean()) for s in sorted(set(styles))}
        print(f"  template contrast α={a:<5}        {held.mean():.3f}  "
              + "  ".join(f"{s} {v:.3f}" for s, v in split.items()))
    OUT.mkdir(exist_ok=True)
    (OUT / f"grad-blocks-{args.world}-seed{args.seed}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
