"""Quality: the product's default path end to end (`bench.product_path`), and on the trap world every
baseline method, what misled wrong answers, tail-patch.

    python -m bench.quality --world realistic --seed 200 --exact   # dev seed: tune here only
    python -m bench.quality --world realistic --seed 201           # test seed: the numbers we report
    python -m bench.quality --world trap --seed 101 --baselines    # the trap world with every baseline

The product path writes bench/out/quality-{world}-seed{seed}[-proj{N}].json. `--baselines` also
trains the demo-sized GPT-2 on the trap world of `--seed` (cached under bench/out/), indexes it
with the product's default build, scores every row for every question with every method, and
writes bench/out/quality-seed{seed}.json with the hybrid weight grid (read it on the dev seed only). Leave-top-k-out retraining is `bench/leave_out.py`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np

from bench.trap_world import stating_ids

OUT = Path("bench/out")
TAIL_PATCH_QUESTIONS = 30  # tail-patch costs one forward/backward per (question, document)


def make_world(name: str, seed: int):
    """The benchmark world `name`: "trap" (bench/trap_world.py) or "realistic" (bench/realistic_world.py)."""
    if name == "trap":
        from bench.trap_world import make_trap_world
        return make_trap_world(seed)
    try:
        from bench.realistic_world import make_realistic_world
    except ModuleNotFoundError as e:
        if e.name != "bench.realistic_world":  # the world's own missing dependency: show it as it is
            raise
        raise SystemExit("--world realistic needs make_realistic_world in bench/realistic_world.py, "
                         "which this checkout lacks: merge the realistic-world branch or use --world trap")
    return make_realistic_world(seed)


def prepare(seed: int, world_name: str = "trap"):
    """World, trained model, one default build; returns (world, settings, tracer, row ext ids, row tokens)."""
    from attribution.tracer import Tracer
    from service.demo.train import TrainConfig, train
    from db import repo
    from db.engine import transaction
    from db.errors import NotFound
    from service import catalog, jobs
    from service.settings import Settings

    folder = OUT / f"{world_name}-seed{seed}"
    settings = Settings(data_dir=folder, database_url=f"sqlite:///{folder.resolve()}/bench.db")
    world = make_world(world_name, seed)
    corpus, _ = world.write(folder / "world")
    if not any((folder / "model").glob("checkpoint-*/model.safetensors")):
        train([d["text"] for d in world.documents], folder / "model", TrainConfig(seed=seed))
    catalog.ingest(settings, corpus, "trap")
    catalog.add_model(settings, folder / "model", "trap")
    try:
        with transaction(settings.database_url) as s:
            build_id = repo.latest_build(s).id
    except NotFound:
        build_id = jobs.index_here(settings, "trap", "trap").build_id
    with transaction(settings.database_url) as s:
        build = repo.get_build(s, build_id)
        entries = repo.entries_at(s, build.id, range(build.row_count))
        ext = [entries[i][1].external_id for i in range(build.row_count)]
        texts = [entries[i][1].text for i in range(build.row_count)]
        ckpts = list(catalog.checkpoints_by_step(repo.model_by_name(s, "trap")).values())
        store_path = build.store_path
    tracer = Tracer(settings.resolve_store(store_path), ckpts)
    _, tokenizer, _ = tracer.featurizer(len(ckpts) - 1)
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return world, settings, tracer, ext, texts, tokens, folder


def first_rank(order: np.ndarray, truth: set[int]) -> int | None:
    for r, pos in enumerate(order, 1):
        if int(pos) in truth:
            return r
    return None


def summarise(ranks: list[int | None]) -> dict:
    r = np.array([x or np.inf for x in ranks], dtype=float)
    if not len(r):
        return {"n": 0, "mrr": None, "r@1": None, "r@10": None}
    return {"n": len(r), "mrr": float(np.mean(1 / r)), "r@1": float(np.mean(r <= 1)), "r@10": float(np.mean(r <= 10))}


def run(seed: int, rerank_n: int = 20) -> dict:
    from attribution.rerank import exact_scores
    from attribution.verify import lexical_match, tail_patcher
    from bench.methods import Scorer
    from service.demo.run import is_correct

    world, settings, tracer, ext, texts, tokens, folder = prepare(seed)
    pos_of = {e: i for i, e in enumerate(ext)}
    scorer = Scorer(folder, tracer, tokens)
    patcher = tail_patcher(tracer)  # as `trace --verify` does
    rng = random.Random(seed)
    records, tail_cache, pools = [], {}, []
    patch_ids = set(rng.sample(range(len(world.questions)), min(len(world.questions), 4 * TAIL_PATCH_QUESTIONS)))
    started = time.perf_counter()
    for qi, q in enumerate(world.questions):
        answer = tracer.generate(q.prompt)
        correct = is_correct(answer, q.answer)
        a = " " + answer.strip()
        scores = scorer.scores(q.prompt, a)
        orders = {m: np.argsort(-v, kind="stable") for m, v in scores.items()}
        hybrid = tracer.rank(q.prompt, a, k=50)
        orders["hybrid"] = np.array([h.position for h in hybrid.hits])
        head = orders["hybrid"][:rerank_n]
        exact = exact_scores(tracer, q.prompt, a, [tokens[p] for p in head])
        orders["hybrid + exact rerank"] = np.concatenate([head[np.argsort(-exact, kind="stable")], orders["hybrid"][rerank_n:]])
        truth = {pos_of[i] for i in stating_ids(q)}  # every stating document
        if correct:
            pools.append((hybrid_pool(scores), truth, q.is_trap))
        rec = {"q": qi, "style": q.style, "trap": q.is_trap, "traps": q.traps, "n": q.n_paraphrases,
               "correct": correct, "answer": answer,
               "ranks": {m: first_rank(o, truth) for m, o in orders.items()}}
        if not correct and answer.strip():
            rec["misled@10"] = {m: any(lexical_match(texts[p], answer) for p in o[:10]) for m, o in orders.items()}
        if correct and qi in patch_ids and sum("tail" in r for r in records) < TAIL_PATCH_QUESTIONS:
            need = sorted({int(p) for o in orders.values() for p in o[:10]} - {k[1] for k in tail_cache if k[0] == qi})
            for p, d in zip(need, patcher.deltas(q.prompt, a, [tokens[p] for p in need])):
                tail_cache[(qi, p)] = d
            rec["tail"] = {m: float(np.mean([tail_cache[(qi, int(p))] for p in o[:10]])) for m, o in orders.items()}
        records.append(rec)
    return {"seed": seed, "records": records, "seconds": round(time.perf_counter() - started, 1),
            "rows": len(ext), "questions": len(world.questions), "weight_grid": tune(pools)}


def hybrid_pool(scores: dict, k: int = 100) -> dict:
    """The hybrid's candidate pool and raw scores, as `Tracer.rank` forms them."""
    parts = {"grad": scores["trackstar"], "dense": scores["dense (q+a)"], "bm25": scores["bm25 (q+a)"]}
    pool = np.unique(np.concatenate([np.argsort(-v, kind="stable")[:k] for v in parts.values()]))
    return {"pool": pool, **{m: v[pool] for m, v in parts.items()}}


def tune(pools) -> list[dict]:
    """MRR of the hybrid rule for a grid of weights (use on the dev seed only)."""
    from attribution.tracer import combine
    grid = []
    for wg, wd, wb in itertools.product((0, 0.25, 0.5, 1, 2), (0, 0.5, 1, 2), (0, 0.25, 0.5, 1)):
        if wg == wd == wb == 0:
            continue
        weights, rr, rr_trap = {"grad": wg, "dense": wd, "bm25": wb}, [], []
        for p, truth, trap in pools:
            order = p["pool"][np.argsort(-combine({m: p[m] for m in weights}, weights), kind="stable")]
            r = first_rank(order, truth)
            rr.append(1 / r if r else 0.0)
            if trap:
                rr_trap.append(rr[-1])
        grid.append({"weights": weights, "mrr": float(np.mean(rr)), "trap_mrr": float(np.mean(rr_trap or [0]))})
    return sorted(grid, key=lambda g: (-g["mrr"], -g["trap_mrr"]))


def tables(report: dict) -> dict:
    recs = report["records"]
    correct = [r for r in recs if r["correct"]]
    methods = list(recs[0]["ranks"])
    splits = {"all": correct, "trap": [r for r in correct if r["trap"]], "non-trap": [r for r in correct if not r["trap"]],
              "completion": [r for r in correct if r["style"] == "completion"],
              "question": [r for r in correct if r["style"] == "question"]}
    splits.update({f"n={n}": [r for r in correct if r["n"] == n] for n in (1, 2, 4, 8)})
    retrieval = {m: {k: summarise([r["ranks"][m] for r in rs]) for k, rs in splits.items()} for m in methods}
    wrong = [r for r in recs if "misled@10" in r]
    misled = {m: float(np.mean([r["misled@10"][m] for r in wrong])) if wrong else None for m in methods}
    patched = [r for r in recs if "tail" in r]
    tail = {m: float(np.mean([r["tail"][m] for r in patched])) if patched else None for m in methods}
    return {"answered": f"{len(correct)}/{len(recs)}", "wrong_with_answer": len(wrong),
            "tail_patch_questions": len(patched), "retrieval": retrieval, "misled@10": misled, "tail_patch": tail}


def print_tables(t: dict, seed: int) -> None:
    from rich.console import Console
    from rich.table import Table
    cols = ["all", "trap", "non-trap", "completion", "question", "n=1", "n=2", "n=4", "n=8"]
    table = Table(title=f"trap world, seed {seed}: MRR over {t['answered']} correctly answered questions")
    table.add_column("method")
    for c in cols + ["R@1", "R@10", "tail-patch Δlogp", "misled@10"]:
        table.add_column(c, justify="right")
    fmt = lambda x: "—" if x is None else f"{x:.3f}"
    for m, row in t["retrieval"].items():
        table.add_row(m, *(fmt(row[c]["mrr"]) for c in cols), fmt(row["all"]["r@1"]), fmt(row["all"]["r@10"]),
                      fmt(t["tail_patch"][m]), fmt(t["misled@10"][m]))
    Console(width=200).print(table)
    print("(n per split: " + ", ".join(f"{c} {t['retrieval']['hybrid'][c]['n']}" for c in cols)
          + f"; tail-patch over {t['tail_patch_questions']} questions; misled over {t['wrong_with_answer']} wrong answers)")


def main():
    ap = argparse.ArgumentParser(description="Quality benchmark: the product's default path, and every method.")
    ap.add_argument("--world", choices=("trap", "realistic"), default="trap")
    ap.add_argument("--seed", type=int, default=None,
                    help="trap: 101 test, 100 dev; realistic: 201 test, 200 dev (the default: tune on dev only)")
    ap.add_argument("--proj", type=int, default=None, help="projection size per side (default: GradientConfig's)")
    ap.add_argument("--exact", action="store_true", help="also a build forced to an exact FAISS index")
    ap.add_argument("--limit", type=int, default=None, help="the first N questions only")
    ap.add_argument("--tail-patch", type=int, default=None,
                    help="correctly answered questions whose top-10s are tail-patched, a seeded sample "
                         "(default: bench.product_path.TAIL_PATCH_QUESTIONS)")
    ap.add_argument("--baselines", action="store_true", help="trap world: also score every baseline method")
    args = ap.parse_args()
    from bench import product_path
    seed = args.seed if args.seed is not None else (101 if args.world == "trap" else 200)
    OUT.mkdir(parents=True, exist_ok=True)
    report = product_path.run(args.world, seed, args.proj, args.exact, args.limit, args.tail_patch)
    product_path.print_report(report)
    suffix = f"-proj{args.proj}" if args.proj else ""
    (OUT / f"quality-{args.world}-seed{seed}{suffix}.json").write_text(json.dumps(report, indent=1))
    if args.baselines and args.world == "trap":
        baselines = run(seed)
        t = tables(baselines)
        print_tables(t, seed)
        print("hybrid weight grid, best first:", *baselines["weight_grid"][:5], sep="\n  ")
        (OUT / f"quality-seed{seed}.json").write_text(json.dumps({**baselines, "tables": t}, indent=1))


if __name__ == "__main__":
    main()
