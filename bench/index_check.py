"""Does a FAISS factory keep the product's ranking on a real build? The realistic world's build made
with `--factory` against its exact (Flat) build, every question traced through the product's path.

    python -m bench.index_check --seed 201 --factory "RR14336,LSH"

The default trace of every question (answer generated) and `--method grad` of the correctly answered
ones, on both builds; prints MRR, trace p50 and the share of questions whose top-10 is the same list,
and writes bench/out/realistic-seed{seed}/index_check_{factory}.json.
"""

from __future__ import annotations

import argparse
import json
import time

from bench import product_path as pp


def main():
    from indexer.config import BuildConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=200, help="200 dev, 201 test")
    ap.add_argument("--factory", required=True, help="the FAISS factory string of the build to check")
    args = ap.parse_args()
    corpus, model, questions = pp.world_and_model("realistic", args.seed)
    folder, name = pp.OUT / f"realistic-seed{args.seed}", args.factory.replace(",", "-")
    flat, _ = pp.build(folder, corpus, model, BuildConfig(factory="Flat"), "data-flat")  # bench.quality --exact's
    checked, seconds = pp.build(folder, corpus, model, BuildConfig(factory=args.factory), "data-" + name)
    records, report = {}, {"factory": args.factory, "build_seconds": seconds, "store": pp.store_facts(checked)}
    for label, settings in ((args.factory, checked), ("Flat", flat)):
        started = time.perf_counter()
        records[label] = pp.trace_all(settings, questions, ("grad",))
        s = pp.summary(records[label])
        report[label] = {"trace_seconds": time.perf_counter() - started, "summary": s}
        print(f"{label}: default MRR {s['mrr']['default']['all']:.3f}, grad {s['mrr']['grad']['all']:.3f}, "
              f"trace p50 {s['trace_ms_p50']:.0f} ms", flush=True)
    report["same_top10"] = {m: pp.same_top10(records[args.factory], records["Flat"], m) for m in ("default", "grad")}
    print("top-10 equal to the Flat build's:", report["same_top10"], "| build", seconds, "s |", report["store"])
    (folder / f"index_check_{name}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
