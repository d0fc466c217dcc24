"""The product's default path, end to end, as a user runs it: ingest → index (automatic choices) →
trace every question with the default method, then the same answers through `traces.trace` with
each `--method`. Ranks are read from the stored traces' hits (k=100), so nothing here re-ranks.

Used by `bench.quality --world realistic|trap`; `--proj N` builds with N × N projections and an exact
index (and traces the default and `--method grad` on the default run's correct answers), `--exact`
adds a second build forced to an exact FAISS index.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.trap_world import stating_ids

OUT = Path("bench/out")
METHODS = ("hybrid", "grad", "dense", "bm25")
K = 100  # hits kept per trace: the rank of the first source document, when it is in the top 100
TAIL_PATCH_QUESTIONS = 30  # one forward/backward per (question, distinct top-10 document)


def world_and_model(world: str, seed: int):
    """(corpus path, model dir, questions) of a benchmark world, trained and cached under bench/out/."""
    if world == "realistic":
        from bench.realistic_world import prepare
        corpus, model, questions, _ = prepare(seed)
        return corpus, model, questions
    from bench.trap_world import make_trap_world
    from service.demo.train import TrainConfig, train
    folder, found = OUT / f"trap-seed{seed}", make_trap_world(seed)
    corpus, _ = found.write(folder / "world")
    if not any((folder / "model").glob("checkpoint-*/model.safetensors")):  # as bench.quality trains it
        train([d["text"] for d in found.documents], folder / "model", TrainConfig(seed=seed))
    return corpus, folder / "model", found.questions


def build(folder: Path, corpus: Path, model: Path, config, name: str, publish=None):
    """Settings of a data dir holding one build of `config` (made, and timed, unless cached);
    `publish(settings)` makes it another way (bench.callback: `index --from-training`)."""
    from db.errors import NotFound
    from service import catalog, jobs, traces
    from service.settings import Settings

    data = folder / name
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data.resolve()}/bench.db")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, model, "model")
    seconds = None
    try:
        traces.resolve_build(settings)
    except NotFound:
        started = time.perf_counter()
        (publish or (lambda st: jobs.index_here(st, "world", "model", config)))(settings)
        seconds = time.perf_counter() - started
    return settings, seconds


def store_facts(settings) -> dict:
    """The build's FAISS factory, rows, gradient width and bytes per document of each store file."""
    from indexer import store
    from service import traces
    folder = Path(traces.resolve_build(settings).store_path)  # as the tracer opens it
    info = store.read_info(folder)
    grad = np.load(folder / "grad.npy", mmap_mode="r")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return {"factory": info["faiss_factory"], "rows": int(grad.shape[0]), "dim": int(grad.shape[1]),
            "grad_store_bytes_per_doc": sizes.get("grad.npy", 0) / grad.shape[0],
            "grad_index_bytes_per_doc": sizes.get("grad.faiss", 0) / grad.shape[0]}


def first_rank(hits, truth: set[str]) -> int | None:
    return next((r for r, h in enumerate(hits, 1) if h.external_id in truth), None)


def trace_all(settings, questions, methods=METHODS) -> list[dict]:
    """Every question through the default `trace` (answer generated); correctly answered ones again
    through each method with that answer. One record per question."""
    from db.errors import InputError
    from service import traces
    from service.demo.run import is_correct

    records = []
    for q in questions:  # the demo world's questions have no style or traps
        about = {"prompt": q.prompt, "style": getattr(q, "style", "completion"), "trap": getattr(q, "is_trap", False),
                 "n": q.n_paraphrases, "restated": bool(getattr(q, "restated_ids", None))}
        try:
            default = traces.trace(settings, q.prompt, k=K)
        except InputError as e:  # the model answered nothing: a user sees this line
            records.append({**about, "answer": "", "correct": False, "refused": str(e),
                            "ranks": {}, "ranks_statements": {}, "top10": {}, "trace_ms": None})
            continue
        truth, stated = set(stating_ids(q)), set(q.source_ids)
        rec = {**about, "answer": default.answer, "correct": is_correct(default.answer, q.answer),
               "ranks": {"default": first_rank(default.hits, truth)},
               "ranks_statements": {"default": first_rank(default.hits, stated)},
               "top10": {"default": [h.external_id for h in default.hits[:10]]},
               "trace_ms": 1000 * sum(default.timings.values())}
        if rec["correct"]:
            for m in methods:
                out = traces.trace(settings, q.prompt, answer=default.answer, k=K, method=m)
                rec["ranks"][m] = first_rank(out.hits, truth)
                rec["ranks_statements"][m] = first_rank(out.hits, stated)
                rec["top10"][m] = [h.external_id for h in out.hits[:10]]
        records.append(rec)
    return records


def summary(records: list[dict]) -> dict:
    """MRR (first source document's rank, 0 beyond 100) over correctly answered questions, per split."""
    correct = [r for r in records if r["correct"]]
    splits = {"all": correct, "trap": [r for r in correct if r["trap"]]}
    for key in ("style", "n", "restated"):  # restated: the fact has question–answer restatements
        for v in sorted({r[key] for r in correct}):
            splits[f"{key}={v}"] = [r for r in correct if r[key] == v]
    methods = sorted({m for r in correct for m in r["ranks"]}, key=lambda m: (m != "default", m))
    mrr = lambda rs, m, key="ranks": float(np.mean([1 / r[key][m] if r[key][m] else 0.0 for r in rs])) if rs else None
    by_style = {}
    for r in records:
        by_style.setdefault(r["style"], []).append(r["correct"])
    return {"answered": f"{len(correct)}/{len(records)}",
            "accuracy": {s: float(np.mean(v)) for s, v in by_style.items()},
            "n": {k: len(v) for k, v in splits.items()},
            "mrr": {m: {k: mrr(v, m) for k, v in splits.items()} for m in methods},
            # the first rank of a fact's statements alone, as before question–answer restatements counted
            "mrr_statements": {m: {k: mrr(v, m, "ranks_statements") for k, v in splits.items()} for m in methods},
            "trace_ms_p50": float(np.median([r["trace_ms"] for r in records if r["trace_ms"] is not None])),
            "refused_empty_answer": sum("refused" in r for r in records)}


def same_top10(a: list[dict], b: list[dict], method: str = "default") -> float:
    """Share of questions whose top-10 under `method` is the same list in two runs."""
    pairs = [(x["top10"].get(method), y["top10"].get(method)) for x, y in zip(a, b)]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    return float(np.mean([x == y for x, y in pairs])) if pairs else None


def save_features(settings, questions, records, path: Path) -> None:
    """The build's gradient rows and the query gradients of the model's answers, right or wrong: each
    is a query a user could make (for bench.faiss_scale)."""
    from service import tracer_cache, traces
    target = traces.resolve_build(settings)
    tracer = tracer_cache.build_tracer(target.store_path, target.by_step)
    queries = [tracer.query_gradient(q.prompt, r["answer"]) for q, r in zip(questions, records) if r["answer"].strip()]
    np.savez(path, base=np.asarray(tracer.grad, dtype=np.float16), queries=np.stack(queries).astype(np.float32))


def open_build(world: str, seed: int, name: str = "data"):
    """(questions, tracer, row external ids, row texts) of the world's default build, made unless
    cached: what bench.fusion scores its pools on, so rules are chosen on the build the product makes."""
    from indexer.config import BuildConfig

    corpus, model, questions = world_and_model(world, seed)
    settings, _ = build(OUT / f"{world}-seed{seed}", corpus, model, BuildConfig(), name)
    return (questions, *rows_of(settings))


def rows_of(settings):
    """(tracer, row external ids, row texts) of the data dir's latest build."""
    from db import repo
    from db.engine import transaction
    from service import tracer_cache, traces

    target = traces.resolve_build(settings)
    with transaction(settings.database_url) as s:
        b = repo.get_build(s, target.build_id)
        entries = repo.entries_at(s, b.id, range(b.row_count))
        ext = [entries[i][1].external_id for i in range(b.row_count)]
        texts = [entries[i][1].text for i in range(b.row_count)]
    return tracer_cache.build_tracer(target.store_path, target.by_step), ext, texts


def tail_patch(settings, seed: int, records: list[dict], n: int = TAIL_PATCH_QUESTIONS) -> dict:
    """Mean tail-patch Δ log p(answer) of each method's top-10 (the traces' own lists), over the first
    `n` correctly answered questions in a seeded shuffle: one Adam step from the earliest checkpoint
    on each document, as `trace --verify` does."""
    import random

    from attribution.verify import tail_patcher
    tracer, ext, texts = rows_of(settings)  # the build just traced: no second ingest or registration
    _, tokenizer, _ = tracer.featurizer(0)
    text_of = dict(zip(ext, texts))
    patcher = tail_patcher(tracer)
    chosen = [r for r in records if r["correct"]]
    random.Random(seed).shuffle(chosen)
    rng, deltas = random.Random(seed + 1), {}
    for r in chosen[:n]:
        r = {**r, "top10": {**r["top10"], "random": rng.sample(ext, 10)}}  # the noise floor
        docs = sorted({e for top in r["top10"].values() for e in top})
        ids = [tokenizer(text_of[e], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for e in docs]
        got = dict(zip(docs, patcher.deltas(r["prompt"], " " + r["answer"].strip(), ids)))
        for m, top in r["top10"].items():
            deltas.setdefault(m, []).append(float(np.mean([got[e] for e in top])))
    styles = [r["style"] for r in chosen[:n]]
    by_style = {s: {m: float(np.mean([d for d, t in zip(v, styles) if t == s])) for m, v in deltas.items()}
                for s in sorted(set(styles))}
    return {"questions": min(n, len(chosen)), "prompts": [r["prompt"] for r in chosen[:n]],
            "mean_top10_delta": {m: float(np.mean(v)) for m, v in deltas.items()},
            "by_style": {s: {"questions": styles.count(s), **v} for s, v in by_style.items()},
            "per_question": {m: v for m, v in deltas.items() if m != "random"}}


def paired(a: dict, b: dict) -> dict:
    """Per method, the mean and standard error of tail-patch a − b over the questions both measured
    (the same seeded sample when both builds answer the same questions)."""
    if a.get("prompts") != b.get("prompts"):
        return {}
    out = {}
    for m in a["per_question"].keys() & b["per_question"].keys():
        d = np.array(a["per_question"][m]) - np.array(b["per_question"][m])
        out[m] = {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None}
    return out


def run(world: str, seed: int, proj: int | None = None, exact: bool = False, limit: int | None = None,
        tail_questions: int | None = None) -> dict:
    """Default build, every question traced; optionally beside an exact-index build of the same config.

    With `proj`, a build of `proj` × `proj` projections and an exact index (a projection sweep
    compares projections, not indexes), traced on the questions the default run answered correctly
    (bench/out/quality-{world}-seed{seed}.json, so that run comes first): default and `--method grad`.
    """
    import json

    from indexer.config import BuildConfig, GradientConfig

    corpus, model, questions = world_and_model(world, seed)
    questions = questions[:limit] if limit else questions
    folder = OUT / f"{world}-seed{seed}"
    if proj:
        main = json.loads((OUT / f"quality-{world}-seed{seed}.json").read_text())["records"]
        questions = [q for q, r in zip(questions, main) if r["correct"]]
    gradient = GradientConfig(k_in=proj, k_out=proj) if proj else GradientConfig()
    name = f"data-proj{proj}" if proj else "data"
    config = BuildConfig(gradient=gradient, factory="Flat") if proj else BuildConfig(gradient=gradient)
    settings, seconds = build(folder, corpus, model, config, name)
    facts, started = store_facts(settings), time.perf_counter()
    records = trace_all(settings, questions, ("grad",) if proj else METHODS)
    report = {"world": world, "seed": seed, "proj": proj or gradient.k_in, "questions": len(questions),
              "build_seconds": seconds, "trace_seconds": time.perf_counter() - started,
              "store": facts, "config": asdict(gradient), "records": records, "summary": summary(records)}
    if not proj:
        save_features(settings, questions, records, folder / "features.npz")
        report["tail_patch"] = tail_patch(settings, seed, records, tail_questions or TAIL_PATCH_QUESTIONS)
    if exact and report["store"]["factory"] != "Flat":
        flat, flat_seconds = build(folder, corpus, model, BuildConfig(gradient=gradient, factory="Flat"), name + "-flat")
        flat_records = trace_all(flat, questions, ("grad",))  # the exact index's grad beside the default
        report["exact"] = {"build_seconds": flat_seconds, "summary": summary(flat_records),
                           "same_top10": {m: same_top10(records, flat_records, m) for m in ("default", "grad")}}
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    s = report["summary"]
    cols = [c for c in s["n"]]
    title = (f"{report['world']} world, seed {report['seed']}, proj {report['proj']}, index {report['store']['factory']}: "
             f"MRR over {s['answered']} correctly answered")
    table = Table(title=title)
    table.add_column("method (traces.trace)")
    for c in cols:
        table.add_column(f"{c} ({s['n'][c]})", justify="right")
    runs = [("", s)] + ([("exact index: ", report["exact"]["summary"])] if "exact" in report else [])
    for prefix, summ in runs:  # every stating document counts, then the fact's statements only
        for key, suffix in (("mrr", ""), ("mrr_statements", ", statements only")):
            for m, row in summ[key].items():
                table.add_row(prefix + m + suffix, *("—" if row[c] is None else f"{row[c]:.3f}" for c in cols))
    Console(width=220).print(table)
    print("accuracy per style:", {k: round(v, 3) for k, v in s["accuracy"].items()},
          f"| trace p50 {s['trace_ms_p50']:.0f} ms | build {report['build_seconds'] or 0:.0f} s (0: cached)",
          "| store", {k: (round(v) if isinstance(v, float) else v) for k, v in report["store"].items()})
    if "exact" in report:
        print("top-10 equal to the exact index's:", report["exact"]["same_top10"])
    if "tail_patch" in report:
        t = report["tail_patch"]
        print(f"tail-patch, mean Δ log p(answer) of the top-10 over {t['questions']} questions:",
              {m: round(v, 4) for m, v in t["mean_top10_delta"].items()})
        for style, v in t.get("by_style", {}).items():
            print(f"  {style} ({v['questions']}):", {m: round(x, 4) for m, x in v.items() if m != "questions"})
