"""The product's fusion coefficients: the learned rule fitted on both worlds' dev seeds, scored on both test seeds.

    python -m bench.fusion_pooled

Reads the pools `bench.fusion` caches (bench/out/fusion-{world}-seed{seed}[-build].json; made
on first use from the product path's builds): realistic dev 200 (build data-window: the default
build made with the current checkpoint learning rates) and test 201, trap dev 100 and test 101.
Prints, per rule, its MRR / trap MRR on each test seed fitted on both devs and on the realistic
dev alone, refitted without grad, and the coefficients; `attribution.tracer.FUSION` holds the
"learned z + log rr" coefficients fitted on both devs. Writes bench/out/fusion-pooled.json.
"""

from __future__ import annotations

import json

from bench import fusion as f

DEV = {"realistic": (200, "data-window"), "trap": (100, "data")}
TEST = {"realistic": (201, "data"), "trap": (101, "data")}
RULES = {
    "z-sum grad 0.25 dense 1 (the rule before)": lambda pools, ms: f.zsum({"grad": 0.25, "dense": 1.0, "bm25": 0.0}),
    "dense": lambda pools, ms: (lambda p: p.raw["dense"]),
    "learned z": lambda pools, ms: f.fit_learned(pools, ms, False),
    "learned z + log rr": lambda pools, ms: f.fit_learned(pools, ms, True),
}


def main():
    dev = {w: f.collect(w, *a) for w, a in DEV.items()}
    test = {w: f.collect(w, *a) for w, a in TEST.items()}
    no_grad = ("dense", "bm25")
    out = {}
    for name, fit in RULES.items():
        row = {}
        for fitted_on, pools in {"both devs": dev["realistic"] + dev["trap"], "realistic dev": dev["realistic"]}.items():
            rule = fit(pools, f.METHODS)
            row[f"coefficients ({fitted_on})"] = getattr(rule, "coefficients", None)
            for w, tp in test.items():
                row[f"{w} test ({fitted_on})"] = f.score(rule, tp)
                if name.startswith("learned"):
                    blind = fit([p.found_by(no_grad) for p in pools], no_grad)
                    row[f"{w} test without grad ({fitted_on})"] = f.score(blind, [p.found_by(no_grad) for p in tp])
        out[name] = row
        cells = {k: (f"{v['mrr']:.3f} / {v['trap_mrr']:.3f}" if isinstance(v, dict) and "mrr" in v else v)
                 for k, v in row.items()}
        print(name, json.dumps(cells, indent=1), flush=True)
    (f.OUT / "fusion-pooled.json").write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
