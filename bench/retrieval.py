"""Retrieval quality on the demo world: where does a true source document rank, per method and variant?

    python -m bench.retrieval --seed 1 --out bench/out/retrieval.json

Trains the demo model on the world of `--seed` (seed 0 is the demo's and the dev seed; report
other seeds), builds one index per gradient variant, and traces every fact the model answers
correctly. MRR and Recall@1/@10 per method, split by how many documents state the fact.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from bench.quality import summarise

VARIANTS = {  # name: (checkpoints, adam normalisation, curvature)
    "all ckpts, adam, ekfac": ("all", True, "ekfac"),
    "all ckpts, adam": ("all", True, "none"),
    "all ckpts, plain": ("all", False, "none"),
    "first ckpt, adam, ekfac": ("first", True, "ekfac"),
    "last ckpt, adam, ekfac": ("last", True, "ekfac"),
    "last ckpt, plain": ("last", False, "none"),
}


def first_rank(tracer, q, method: str, entries: dict) -> int | None:
    out = tracer.rank(q.prompt, " " + q.answer, k=10, method=method)
    for r, h in enumerate(out.hits, 1):
        if entries[h.position] in q.source_ids:
            return r
    return None


def run(seed: int, data: Path) -> dict:
    from attribution.tracer import Tracer
    from service.demo.train import TrainConfig, train
    from service.demo.world import make_world
    from db import repo
    from indexer.config import BuildConfig, GradientConfig
    from db.engine import transaction
    from service import catalog, jobs
    from service.demo.run import is_correct
    from service.settings import Settings

    settings = Settings(data_dir=data, database_url=f"sqlite:///{data}/bench.db")
    world = make_world(seed)
    corpus, _ = world.write(data / "world")
    model_dir = data / "model"
    t = time.perf_counter()
    if not model_dir.exists():
        train([d["text"] for d in world.documents], model_dir, TrainConfig(seed=seed))
    train_s = time.perf_counter() - t
    catalog.ingest(settings, corpus, "w")
    catalog.add_model(settings, model_dir, "m")
    n_ckpt = len(list(model_dir.glob("checkpoint-*")))
    steps = sorted(int(p.name.split("-")[1]) for p in model_dir.glob("checkpoint-*"))
    results, correct_qs = {}, None
    for name, (which, adam, curv) in VARIANTS.items():
        chosen = {"all": "all", "last": "last", "first": str(steps[0])}[which]
        build = jobs.index_here(settings, "w", "m", BuildConfig(gradient=GradientConfig(optimizer_norm=adam, curvature=curv)), chosen)
        with transaction(settings.database_url) as s:
            b = repo.get_build(s, build.build_id)
            entries = {p: d.external_id for p, (_, d) in repo.entries_at(s, b.id, range(b.row_count)).items()}
            store_path = b.store_path
            ckpts = catalog.checkpoints_by_step(repo.model_by_name(s, "m"))
        tracer = Tracer(settings.resolve_store(store_path), [ckpts[c["step"]] for c in build.info["checkpoints"]])
        if correct_qs is None:
            correct_qs = [q for q in world.questions if is_correct(tracer.generate(q.prompt), q.answer)]
        methods = ["grad"] if results else ["hybrid", "grad", "dense", "bm25"]
        for method in methods:
            label = method if method != "grad" else f"grad ({name})"
            ranks = {q.prompt: first_rank(tracer, q, method, entries) for q in correct_qs}
            row = {"all": summarise(list(ranks.values()))}
            for n in (1, 2, 4, 8):
                row[f"n={n}"] = summarise([ranks[q.prompt] for q in correct_qs if q.n_paraphrases == n])
            results[label] = row
    return {"seed": seed, "questions": len(world.questions), "answered_correctly": len(correct_qs),
            "checkpoints": n_ckpt, "train_s": round(train_s, 1), "methods": results}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/out/retrieval.json"))
    args = ap.parse_args()
    data = args.data or Path(f"bench/out/retrieval-seed{args.seed}")
    report = run(args.seed, data)
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"retrieval, seed {args.seed}: {report['answered_correctly']}/{report['questions']} "
                        "facts answered correctly (MRR / R@1 over those)")
    table.add_column("method")
    for col in ("all", "n=1", "n=2", "n=4", "n=8"):
        table.add_column(col, justify="right")
    for method, row in report["methods"].items():
        table.add_row(method, *(f"{row[c]['mrr']:.3f} / {row[c]['r@1']:.2f}" for c in ("all", "n=1", "n=2", "n=4", "n=8")))
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
