"""Leave-top-k-out on the realistic world, from the product's own rankings: retrain without each
method's top-k documents and see how much the answers' log-probability drops.

    python -m bench.leave_out_product plan   --seed 201 --facts 30 --k 10   # facts and removal sets
    python -m bench.leave_out_product train  --seed 201 --method grad        # one retraining (one process each,
    python -m bench.leave_out_product train  --seed 201 --method random      #  so two run side by side)
    python -m bench.leave_out_product report --seed 201

`plan` samples `--facts` correctly answered questions of distinct facts (seeded) and takes each
method's top-k for each through the world's default build (`bench.callback`'s offline build of the
same model, else `bench.product_path`'s): `hybrid` (the default), `grad`, `dense`, `bm25`, `random`
(k random documents per fact: what removing that many documents does by itself) and the facts' true
sources (`truth`, k per fact: statements first, then question–answer restatements), and the
`VARIANTS` lists (`hybrid_all`: the default traced with `--gradient-positions all`). Each method's
documents for all facts are removed together and the model is retrained from scratch with the
world's training config and seed, and the full model's tokenizer (a tokenizer refitted on fewer
documents would change the log-probabilities being compared).
`--train-seed S` retrains with another seed: `train --method none --train-seed S` (nothing removed)
is the retraining noise against the world's model, and the full model the `M --train-seed S` runs
are measured against.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from bench.trap_world import stating_ids

OUT = Path("bench/out")
METHODS = ("hybrid", "grad", "dense", "bm25")
# ranked lists beside the methods': the default with the loss's full gradient as its query
# (`trace --gradient-positions all`, the query before session 24's names-and-answer positions)
VARIANTS = {"hybrid_all": {"method": "hybrid", "gradient_positions": "all"}}
RANKED = METHODS + tuple(VARIANTS)  # every list `plan` takes through the build


def folder(seed: int) -> Path:
    return OUT / f"leave-out-realistic-seed{seed}"


def full_model(seed: int) -> Path:
    return OUT / f"realistic-seed{seed}" / "model"


def default_build(seed: int):
    """Settings of a data dir holding the default build of the world's model."""
    from bench import product_path as pp
    from indexer.config import BuildConfig
    from service.settings import Settings
    data = OUT / "callback-realistic" / f"seed{seed}" / "data-offline"  # bench.callback's, when made
    if (data / "bench.db").exists():
        return Settings(data_dir=data, database_url=f"sqlite:///{data.resolve()}/bench.db")
    corpus, model, _ = pp.world_and_model("realistic", seed)
    return pp.build(OUT / f"realistic-seed{seed}", corpus, model, BuildConfig(), "data")[0]


def plan(seed: int, n_facts: int, k: int) -> dict:
    from bench import product_path as pp
    from bench.realistic_world import make_realistic_world
    from service.demo.run import is_correct

    docs, questions = make_realistic_world(seed)
    tracer, ext, _ = pp.rows_of(default_build(seed))
    rng = random.Random(seed)
    pool = list(questions)
    rng.shuffle(pool)
    chosen, facts = [], set()
    for q in pool:
        if len(chosen) == n_facts:
            break
        if (q.person, q.attribute) in facts:
            continue
        answer = tracer.generate(q.prompt)
        if is_correct(answer, q.answer):
            chosen.append({"prompt": q.prompt, "answer": answer, "style": q.style, "sources": stating_ids(q)})
            facts.add((q.person, q.attribute))
    sets = {m: set() for m in RANKED + ("random", "truth")}
    for q in chosen:
        for m in RANKED:
            sets[m] |= top_k(tracer, ext, q, k, m)
        sets["random"] |= set(rng.sample([d["id"] for d in docs], k))
        sets["truth"] |= set(q["sources"][:k])
    out = {"seed": seed, "k": k, "facts": chosen, "sets": {m: sorted(s) for m, s in sets.items()}}
    folder(seed).mkdir(parents=True, exist_ok=True)
    (folder(seed) / "plan.json").write_text(json.dumps(out, indent=1))
    return out


def top_k(tracer, ext: list[str], fact: dict, k: int, name: str) -> set[str]:
    """The documents of a method's (or a VARIANTS entry's) top-k for one fact."""
    how = VARIANTS.get(name, {"method": name})
    return {ext[h.position] for h in tracer.rank(fact["prompt"], fact["answer"], k=k, **how).hits}


def train_without(seed: int, method: str, train_seed: int | None) -> Path:
    from dataclasses import replace

    from transformers import AutoTokenizer

    from bench.realistic_world import make_realistic_world, train_config
    from indexer.modelio import discover_checkpoints
    from service.demo.train import train

    # "none": nothing removed (with --train-seed: the noise); it needs no plan, so it can run beside `plan`
    removed = set() if method == "none" else set(json.loads((folder(seed) / "plan.json").read_text())["sets"][method])
    docs, _ = make_realistic_world(seed)
    tokenizer = AutoTokenizer.from_pretrained(discover_checkpoints(full_model(seed))[-1].path)
    config = train_config(seed) if train_seed is None else replace(train_config(seed), seed=train_seed)
    out = folder(seed) / (method + (f"-seed{train_seed}" if train_seed is not None else ""))
    if not any(out.glob("checkpoint-*/model.safetensors")):
        train([d["text"] for d in docs if d["id"] not in removed], out, config, tokenizer=tokenizer)
    return out


def finished(run: Path) -> bool:
    """A retraining that saved its last step (a running one has earlier checkpoints only)."""
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return False
    state = json.loads(states[-1].read_text())
    return state["global_step"] == state["max_steps"]


def logprobs(model_dir: Path, facts: list[dict]) -> list[float]:
    from bench.leave_out import final_logprobs
    return final_logprobs(model_dir, [(f["prompt"], f["answer"]) for f in facts])


def report(seed: int) -> dict:
    """Each finished retraining's drop per fact against the full model trained with the same seed:
    the world's model for seed-`seed` runs, `none-seedS` (nothing removed) for `M-seedS` runs, so a
    drop is what removing the documents did, not what changing the seed did. Runs are named
    `M` (the world's seed) or `M-seedS`; `none-seedS` against the world's model is the seed noise."""
    p = json.loads((folder(seed) / "plan.json").read_text())
    facts = p["facts"]
    runs = {d.name: d for d in sorted(folder(seed).iterdir()) if d.is_dir() and finished(d)}
    scored = {name: np.array(logprobs(d, facts)) for name, d in runs.items()}
    full = np.array(logprobs(full_model(seed), facts))
    out = {"seed": seed, "k": p["k"], "facts": len(facts), "full_model_logprob": float(full.mean()), "runs": {}}
    for name, after in scored.items():
        method, _, train_seed = name.partition("-seed")
        base = scored.get(f"none-seed{train_seed}") if train_seed and method != "none" else full
        if base is None:
            continue  # that seed's full model is not trained yet
        removed = set(p["sets"].get(method, []))
        drops = base - after
        out["runs"][name] = {
            "train_seed": int(train_seed) if train_seed else seed, "removed": len(removed),
            "true_sources_removed": sum(len(removed & set(f["sources"])) for f in facts),
            "mean_drop": float(drops.mean()), "sem": float(drops.std(ddof=1) / np.sqrt(len(drops))),
            "still_top": int(sum(np.exp(a) > 0.5 for a in after)), "drops": drops.tolist()}
    for name, x in out["runs"].items():  # paired over facts: the default's drop minus this run's, same seed
        ref = out["runs"].get("hybrid" + (f"-seed{x['train_seed']}" if x["train_seed"] != seed else ""))
        if ref is not None and ref is not x and not name.startswith("none"):
            d = np.array(ref["drops"]) - np.array(x["drops"])
            x["default_minus_this"] = [float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))]
    out["both_seeds"] = both_seeds(out["runs"])
    (OUT / f"leave-out-realistic-seed{seed}.json").write_text(json.dumps(out, indent=1))
    return out


def both_seeds(runs: dict) -> dict:
    """Per method run at two or more training seeds beside the default: the default's drop minus
    the method's, per fact averaged over the seeds, then mean ± sem over the facts. Averaging a
    fact's two seeds first halves the variance that retraining adds to its difference, and keeps
    the facts, not the (fact, seed) pairs, as the independent draws."""
    by_method: dict[str, dict[int, np.ndarray]] = {}
    for name, x in runs.items():
        method = name.partition("-seed")[0]
        by_method.setdefault(method, {})[x["train_seed"]] = np.array(x["drops"])
    default, out = by_method.get("hybrid", {}), {}
    for method, drops in by_method.items():
        seeds = sorted(drops.keys() & default.keys())
        if method in ("hybrid", "none") or len(seeds) < 2:
            continue
        per_seed = np.array([default[s] - drops[s] for s in seeds])  # (seeds, facts)
        d = per_seed.mean(0)
        out[method] = {"seeds": seeds, "mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d))),
                       # facts the default's documents unlearn more, or less, at every seed
                       "above_at_every_seed": int((per_seed > 0).all(0).sum()),
                       "below_at_every_seed": int((per_seed < 0).all(0).sum())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("plan", "train", "report"))
    ap.add_argument("--seed", type=int, default=201)
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--method", default="hybrid",
                    help="hybrid, grad, dense, bm25, random, truth, none, or a variant: " + ", ".join(VARIANTS))
    ap.add_argument("--train-seed", type=int, help="retrain with this seed instead of the world's")
    args = ap.parse_args()
    if args.step == "plan":
        p = plan(args.seed, args.facts, args.k)
        print({m: len(s) for m, s in p["sets"].items()}, "facts", len(p["facts"]))
    elif args.step == "train":
        print(train_without(args.seed, args.method, args.train_seed))
    else:
        r = report(args.seed)
        print(f"leave-top-{r['k']}-out, seed {r['seed']}, {r['facts']} facts, "
              f"full model mean log p(answer) {r['full_model_logprob']:.3f}")
        print(f"{'run':<16}{'removed':>9}{'true srcs':>11}{'mean drop':>11}{'± sem':>8}{'p>0.5':>7}"
              f"{'default − this (paired)':>26}")
        for name, x in r["runs"].items():
            paired = x.get("default_minus_this")
            print(f"{name:<16}{x['removed']:>9}{x['true_sources_removed']:>11}{x['mean_drop']:>11.3f}"
                  f"{x['sem']:>8.3f}{x['still_top']:>5}/{r['facts']}"
                  + (f"{paired[0]:>18.3f} ± {paired[1]:.3f}" if paired else ""))
        for name, x in r["both_seeds"].items():
            print(f"default − {name}, per fact over seeds {x['seeds']}: {x['mean']:.3f} ± {x['sem']:.3f}; "
                  f"facts above at every seed {x['above_at_every_seed']}, below {x['below_at_every_seed']}")


if __name__ == "__main__":
    main()
