"""Index while training: the callback's training overhead and its build's quality against the offline one.

    python -m bench.callback                      # the demo world, 3 runs each way
    python -m bench.callback --world realistic    # bench/realistic_world.py: its Llama and config
    python -m bench.callback --world realistic --epochs 1 --runs 3 --timing-only   # the overhead only

Trains the world's model with and without `WherefromCallback`, alternating, each run in its own
process (wall time of `trainer.train()` and the process's peak RSS), and reports the same-run
ratio of medians. Then publishes the callback's store (`index --from-training`), builds the offline
4-checkpoint index of the run without the callback, and compares both on MRR of the first source
document over the questions the model answers correctly (gradient method and hybrid).
Writes bench/out/callback-<world>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

OUT = Path("bench/out")


@dataclass
class BenchWorld:
    """What the bench needs of a world: its documents and questions, how its model is trained."""

    documents: list[dict]  # {"id", "text"}
    questions: list  # each with .prompt, .answer, .source_ids
    config: object  # service.demo.train.TrainConfig
    chat_template: str | None = None  # set on the trained tokenizer (the realistic world's chat prompts)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        corpus = folder / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in self.documents))
        return corpus


def make(world: str, seed: int, epochs: int | None = None) -> BenchWorld:
    """The world of `seed` and its training config (`epochs` to shorten a run for timing): the demo
    trainer's defaults, or `bench.realistic_world.train_config(seed)` read as it stands in main."""
    from service.demo.train import TrainConfig
    shorter = {"epochs": epochs} if epochs else {}
    if world == "demo":
        from service.demo.world import make_world
        w = make_world(seed)
        return BenchWorld(w.documents, w.questions, TrainConfig(seed=seed, **shorter))
    from bench.realistic_world import CHAT_TEMPLATE, make_realistic_world, train_config
    docs, questions = make_realistic_world(seed)
    return BenchWorld(docs, questions, replace(train_config(seed), **shorter), CHAT_TEMPLATE)


def train_once(world: str, seed: int, out: Path, with_callback: bool, epochs: int | None) -> dict:
    """One training run in this process: wall and CPU seconds of training, and peak RSS (MB).

    CPU seconds (user + system of this process) are what the ratio is read from on a shared box:
    wall time there follows the other tenants' load (1.6x apart between two plain runs at load 6-8).
    The tokenizer is fitted before the clock starts, as `bench.realistic_world.prepare` does.
    """
    from indexer.callback import WherefromCallback
    from service.demo.train import train, train_tokenizer
    w = make(world, seed, epochs)
    texts = [d["text"] for d in w.documents]
    tokenizer = train_tokenizer(texts, w.config.vocab_size)
    if w.chat_template:
        tokenizer.chat_template = w.chat_template
    callback = WherefromCallback(row_ids=[d["id"] for d in w.documents]) if with_callback else None
    t, cpu = time.perf_counter(), _cpu()
    train(texts, out, w.config, tokenizer=tokenizer, callback=callback)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_runs(args) -> dict:
    runs = {"plain": [], "callback": []}
    for i in range(args.runs):
        for kind in ("plain", "callback"):
            out = OUT / f"callback-{args.world}" / f"{kind}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "bench.callback", "--world", args.world, "--seed", str(args.seed),
                   "--train-one", kind, "--out", str(out)] + (["--epochs", str(args.epochs)] if args.epochs else [])
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            result["load_1min"] = os.getloadavg()[0]  # the other tenants', as uptime says it
            runs[kind].append(result)
            print(kind, i, result, "load", os.getloadavg(), flush=True)
    return summary(runs)


def summary(runs: dict) -> dict:
    """Ratios of medians and per pair (plain i, callback i) of the runs each way."""
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "median_s": med, "wall_ratio": med["callback"] / med["plain"],
            "median_cpu_s": cpu, "overhead_ratio": cpu["callback"] / cpu["plain"],
            "per_pair_cpu_ratios": [c["cpu_seconds"] / p["cpu_seconds"] for p, c in zip(runs["plain"], runs["callback"])],
            "peak_rss_mb": rss, "memory_ratio": rss["callback"] / rss["plain"]}


def mrr(tracer, world, method: str, correct) -> float:
    ranks = []
    for q in correct:
        # the answer as the model generates it, after a space: "born in" + "1979" would be traced as
        # the token "in1979", a different query gradient (grad MRR fell to ~0.1 that way)
        hits = tracer.rank(q.prompt, " " + q.answer.strip(), k=100, method=method).hits
        sources = set(q.source_ids)
        first = next((i + 1 for i, h in enumerate(hits) if tracer.ext[h.position] in sources), None)
        ranks.append(1 / first if first else 0.0)
    return sum(ranks) / max(len(ranks), 1)


def quality(args) -> dict:
    from attribution.tracer import Tracer
    from db import repo
    from db.engine import transaction
    from service import catalog, jobs
    from service.settings import Settings
    from service.training_builds import index_from_training

    base = OUT / f"callback-{args.world}"
    settings = Settings(data_dir=base / "data", database_url=f"sqlite:///{(base / 'data').resolve()}/bench.db")
    shutil.rmtree(base / "data", ignore_errors=True)
    w = make(args.world, args.seed)
    corpus = w.write(base / "world")
    catalog.ingest(settings, corpus, "w")
    catalog.add_model(settings, base / "plain-0", "offline")
    catalog.add_model(settings, base / "callback-0", "training")
    t = time.perf_counter()
    offline = jobs.index_here(settings, "w", "offline")
    t_offline = time.perf_counter() - t
    t = time.perf_counter()
    trained = index_from_training(settings, "w", "training")
    t_training = time.perf_counter() - t
    report = {"build_s": {"offline": t_offline, "from_training": t_training}}
    tracers = {}
    for name, out, model in (("offline", offline, "offline"), ("from_training", trained, "training")):
        with transaction(settings.database_url) as s:
            build = repo.get_build(s, out.build_id)
            entries = repo.entries_at(s, build.id, range(build.row_count))
            ckpts = catalog.checkpoints_by_step(repo.model_by_name(s, model))
            path = settings.resolve_store(build.store_path)  # SQL holds it relative to the data dir
        tracer = Tracer(Path(path), [ckpts[c["step"]] for c in out.info["checkpoints"]])
        tracer.ext = [entries[i][1].external_id for i in range(build.row_count)]
        tracers[name] = tracer
    correct = [q for q in w.questions if tracers["offline"].generate(q.prompt).strip() == q.answer.strip()]
    report["questions"], report["correct"] = len(w.questions), len(correct)
    report["mrr"] = {name: {m: mrr(tr, w, m, correct) for m in ("grad", "hybrid")} for name, tr in tracers.items()}
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("demo", "realistic"), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3, help="training runs each way (the ratio is of medians)")
    ap.add_argument("--epochs", type=int, help="default: the world's training config's")
    ap.add_argument("--timing-only", action="store_true",
                    help="the training overhead only: no offline build, no quality comparison")
    ap.add_argument("--reuse", action="store_true", help="compare the builds of the last run's models only")
    ap.add_argument("--train-one", choices=("plain", "callback"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_one:
        print(json.dumps(train_once(args.world, args.seed, args.out, args.train_one == "callback", args.epochs)))
        return
    make(args.world, args.seed)  # fail on a missing world before any training
    path = OUT / f"callback-{args.world}{'-timing' if args.timing_only else ''}.json"
    report = json.loads(path.read_text()) if args.reuse else {"world": args.world, "seed": args.seed,
                                                              "epochs": args.epochs, "training": timed_runs(args)}
    report["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))  # the timings survive a failing build comparison
    report["quality"] = None if args.timing_only else quality(args)
    path.write_text(json.dumps(report, indent=2))
    keys = ("median_s", "wall_ratio", "median_cpu_s", "overhead_ratio", "peak_rss_mb", "memory_ratio")
    print(json.dumps({k: report["training"][k] for k in keys}
                     | {"quality": report["quality"]}, indent=2))


if __name__ == "__main__":
    main()
