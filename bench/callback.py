"""Index while training: the callback's training overhead and its build's quality against the offline one.

    python -m bench.callback                      # the demo world, 3 runs each way
    python -m bench.callback --world realistic    # bench/realistic_world.py: its Llama and config
    python -m bench.callback --world realistic --epochs 1 --runs 3 --timing-only   # the overhead only
    python -m bench.callback --world realistic --epochs 1 --runs 3 --timing-only --kinds plain ids hooks callback

Trains the world's model with and without `WherefromCallback`, alternating, each run in its own
process (wall time of `trainer.train()` and the process's peak RSS), and reports the same-run
ratio of medians. Then publishes the callback's store (`index --from-training`), builds the offline
4-checkpoint index of the run without the callback, and compares both through the product's path
(bench.product_path: MRR of the first source document per method, and tail-patch of each method's
top-10) on the questions both models answer correctly. `--reuse --models PLAIN CALLBACK` compares
two training folders made elsewhere (e.g. bench.realistic_world's model and a `--train-one callback`
run, trained side by side).
Writes bench/out/callback-<world>.json. The per-step cost of the hooks alone, in one process and
with less noise than whole runs: bench/callback_steps.py.
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
KINDS = ("plain", "callback", "hooks", "ids")


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


def callback_for(kind: str, row_ids: list[str]):
    """What a run of `kind` (KINDS) trains with: nothing (`plain`), `WherefromCallback` (`callback`),
    or the callback doing part of its work, to tell its training overhead apart: `hooks`, every
    hook registered and every step event run but nothing recorded (the layers' hooks return at
    once: no projection, no rows); `ids`, `attach` alone (the id column carried to the model and
    popped there), no layer hooks and no step events."""
    from indexer.callback import WherefromCallback

    class Hooks(WherefromCallback):
        def _pre_forward(self, module, args, kwargs):
            kwargs.pop(self.id_column, None)
            return args, kwargs  # recording stays off

        def _collect(self):
            pass

    class Ids(WherefromCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            pop = lambda module, a, k: (a, {n: v for n, v in k.items() if n != self.id_column})
            self._handles = [model.register_forward_pre_hook(pop, with_kwargs=True)]

        def _skip(self, *args, **kw):
            pass

        on_step_begin = on_substep_end = on_pre_optimizer_step = on_save = _skip

        def on_train_end(self, args, state, control, **kw):
            for h in self._handles:
                h.remove()

    made = {"plain": None, "callback": WherefromCallback, "hooks": Hooks, "ids": Ids}[kind]
    return made and made(row_ids=row_ids)


def train_once(world: str, seed: int, out: Path, kind: str, epochs: int | None) -> dict:
    """One training run in this process: wall and CPU seconds of training, and peak RSS (MB).
    `kind`: one of KINDS (`callback_for`).

    CPU seconds (user + system of this process) are what the ratio is read from on a shared box:
    wall time there follows the other tenants' load (1.6x apart between two plain runs at load 6-8).
    The tokenizer is fitted before the clock starts, as `bench.realistic_world.prepare` does.
    """
    from service.demo.train import train, train_tokenizer
    w = make(world, seed, epochs)
    texts = [d["text"] for d in w.documents]
    tokenizer = train_tokenizer(texts, w.config.vocab_size)
    if w.chat_template:
        tokenizer.chat_template = w.chat_template
    callback = callback_for(kind, [d["id"] for d in w.documents])
    t, cpu = time.perf_counter(), _cpu()
    train(texts, out, w.config, tokenizer=tokenizer, callback=callback)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_runs(args) -> dict:
    runs = {kind: [] for kind in args.kinds}
    for i in range(args.runs):
        # the order turns every round (ABBA…): a load that drifts during the run set then weighs on
        # both sides alike instead of always on the kind that goes second
        for kind in (args.kinds if i % 2 == 0 else args.kinds[::-1]):
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
    extra = {f"{k}_overhead_ratio": cpu[k] / cpu["plain"] for k in runs if k not in ("plain", "callback")}
    pairs = [c["cpu_seconds"] / p["cpu_seconds"] for p, c in zip(runs["plain"], runs["callback"])]
    return {"runs": runs, **extra, "median_s": med, "wall_ratio": med["callback"] / med["plain"],
            "median_cpu_s": cpu, "overhead_ratio": cpu["callback"] / cpu["plain"],
            "per_pair_cpu_ratios": pairs, "median_pair_ratio": statistics.median(pairs),
            "median_pair_ratio_ci95": bootstrap_median_ci(pairs),
            "peak_rss_mb": rss, "memory_ratio": rss["callback"] / rss["plain"]}


def bootstrap_median_ci(values: list[float], draws: int = 10_000, seed: int = 0) -> list[float]:
    """A 95 % percentile-bootstrap interval of the median of `values` (the pairs' ratios): how far
    the run set's median could move on another run set of the same size, on this box's noise."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    medians = np.median(np.random.default_rng(seed).choice(v, size=(draws, len(v))), axis=1)
    return [float(x) for x in np.percentile(medians, [2.5, 97.5])]


def quality(args) -> dict:
    """Both builds through the product's default path (bench.product_path: ingest, `index` or
    `index --from-training`, `trace` with each method), MRR per method and tail-patch of each
    method's top-10, on the questions both models answer correctly (the two training runs are two
    models, so each answers its own set; the comparison is on the shared one)."""
    from bench import product_path as pp
    from indexer.config import BuildConfig
    from service.training_builds import index_from_training

    base = OUT / f"callback-{args.world}"
    plain, trained = (Path(m) for m in args.models) if args.models else (base / "plain-0", base / "callback-0")
    data = base / f"seed{args.seed}"  # each seed's builds apart: pp.build caches by folder name
    w = make(args.world, args.seed)
    corpus = w.write(data / "world")
    builds, report = {}, {"models": [str(plain), str(trained)], "build_s": {}}
    if not args.skip_offline:
        builds["offline"], report["build_s"]["offline"] = pp.build(data, corpus, plain, BuildConfig(), "data-offline")
    recorded = "from_training" + args.tag
    shutil.rmtree(data / f"data-{recorded}", ignore_errors=True)  # always published afresh: it takes a minute
    builds[recorded], report["build_s"][recorded] = pp.build(
        data, corpus, trained, None, f"data-{recorded}", publish=lambda st: index_from_training(st, "world", "model"))
    records = {name: pp.trace_all(settings, w.questions) for name, settings in builds.items()}
    both = [all(rs[i]["correct"] for rs in records.values()) for i in range(len(w.questions))]
    shared = {name: [{**r, "correct": ok} for r, ok in zip(rs, both)] for name, rs in records.items()}
    report["own"] = {name: pp.summary(rs) for name, rs in records.items()}
    report["shared"] = {name: pp.summary(rs) for name, rs in shared.items()}
    report["tail_patch"] = {name: pp.tail_patch(settings, args.seed, shared[name], args.tail_patch)
                            for name, settings in builds.items()}
    if "offline" in builds:
        report["tail_patch_paired"] = pp.paired(report["tail_patch"][recorded], report["tail_patch"]["offline"])
    return report


def print_quality(q: dict) -> None:
    first = next(iter(q["shared"].values()))
    print(f"questions both models answer correctly: {first['answered']}")
    methods = list(first["mrr"])
    patched = ("default", "grad", "dense", "bm25", "random")
    for key, title in (("mrr", "MRR, every document stating the fact"),
                       ("mrr_statements", "MRR, the fact's statements only")):
        print(f"{title}; tail-patch (tp) of each method's top-10")
        print(f"{'build':<28}" + "".join(f"{m:>9}" for m in methods) + f"{'trap':>9}" +
              "".join(f"{'tp ' + m:>12}" for m in patched))
        for name in q["shared"]:
            mrr, tp = q["shared"][name][key], q["tail_patch"][name]["mean_top10_delta"]
            trap = mrr["default"]["trap"]
            print(f"{name:<28}" + "".join(f"{mrr[m]['all']:>9.3f}" for m in methods)
                  + (f"{trap:>9.3f}" if trap is not None else f"{'-':>9}")
                  + "".join(f"{tp.get(m, float('nan')):>12.3f}" for m in patched))
    for m, d in sorted(q.get("tail_patch_paired", {}).items()):
        sem = "" if d["sem"] is None else f" ± {d['sem']:.3f}"
        print(f"tail-patch from training − offline, {m}: {d['mean']:+.3f}{sem} (paired, standard error)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("demo", "realistic"), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3, help="training runs each way (the ratio is of medians)")
    ap.add_argument("--epochs", type=int, help="default: the world's training config's")
    ap.add_argument("--timing-only", action="store_true",
                    help="the training overhead only: no offline build, no quality comparison")
    ap.add_argument("--reuse", action="store_true", help="compare the builds of the last run's models only")
    ap.add_argument("--models", nargs=2, metavar=("PLAIN", "CALLBACK"),
                    help="with --reuse: the two training output folders to compare (default: run 0's)")
    ap.add_argument("--tail-patch", type=int, default=30, help="questions whose top-10s are tail-patched")
    ap.add_argument("--skip-offline", action="store_true", help="the from-training build only")
    ap.add_argument("--tag", default="", help="a suffix for the from-training build's folder and name")
    ap.add_argument("--kinds", nargs="+", default=["plain", "callback"], choices=KINDS,
                    help="what each run trains with, alternating: hooks = the callback's hooks registered, "
                         "recording off; ids = only the id column carried to the model")
    ap.add_argument("--train-one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_one:
        print(json.dumps(train_once(args.world, args.seed, args.out, args.train_one, args.epochs)))
        return
    make(args.world, args.seed)  # fail on a missing world before any training
    path = OUT / f"callback-{args.world}{'-timing' if args.timing_only else f'-{args.seed}{args.tag}'}.json"
    if args.reuse:  # the models are there: no training, keep the last run's timings if any
        fresh = {"world": args.world, "seed": args.seed}
        report = json.loads(path.read_text()) if path.exists() and not args.models else fresh
    else:
        report = {"world": args.world, "seed": args.seed, "epochs": args.epochs, "training": timed_runs(args)}
    report["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))  # the timings survive a failing build comparison
    report["quality"] = None if args.timing_only else quality(args)
    path.write_text(json.dumps(report, indent=2))
    keys = ("median_s", "wall_ratio", "median_cpu_s", "overhead_ratio", "median_pair_ratio",
            "median_pair_ratio_ci95", "peak_rss_mb", "memory_ratio")
    if "training" in report:
        t = report["training"]
        print(json.dumps({k: v for k, v in t.items() if k in keys or k.endswith("_overhead_ratio")}, indent=2))
    if report["quality"]:
        print_quality(report["quality"])


if __name__ == "__main__":
    main()
