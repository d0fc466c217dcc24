"""Trace latency, p50 and p95, with and without answer generation, at 10k and 100k documents.

    wherefrom demo --data-dir wherefrom-data        # once: a real model and build
    python -m bench.latency --data-dir wherefrom-data --sizes 10000,100000

Each size gets its own data dir: a corpus of real text (the demo world plus more generated worlds),
the demo model registered as is, and a build whose stores have the real dimension: the demo
build's own rows for the demo documents, and for the others rows drawn like real features (mixtures
of real rows plus noise, `bench.faiss_scale.Rows`, for the gradient and the dense store alike).
BM25 is fitted on the real texts; FAISS uses the factory wherefrom picks for the size. Then the
real `ops.trace` (SQL, stores, FAISS, model) runs on the demo questions; a few warm-up traces load
the model first. The gradient store is not a real build at 100k — a real one takes hours here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from bench import faiss_scale
from service.demo.world import make_world

OUT = Path("bench/out")


def texts_for(n: int) -> list[tuple[str, str, dict]]:
    """n documents: the demo world (seed 0) first, then worlds 1, 2, … (ids prefixed by seed)."""
    docs, seed = [], 0
    while len(docs) < n:
        docs += [(d["id"] if seed == 0 else f"w{seed}-{d['id']}", d["text"], {})
                 for d in make_world(seed).documents]
        seed += 1
    return docs[:n]


def synthetic_rows(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Real rows first, then rows drawn like them, float16, (n, dim)."""
    out = np.empty((n, real.shape[1]), dtype=np.float16)
    out[:len(real)] = real
    rows = faiss_scale.Rows(np.asarray(real, dtype=np.float32), n - len(real), seed)
    for start, block in rows.blocks():
        out[len(real) + start:len(real) + start + len(block)] = block * _norms(real).mean()
    return out


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(x, dtype=np.float32), axis=1)


def make_scaled(demo_dir: Path, work: Path, n: int):
    """A data dir holding an n-document corpus and a build of it (see the module docstring)."""
    from db import repo
    from db.engine import transaction
    from indexer import ann, lexical, store
    from service import catalog, traces
    from service.settings import Settings

    demo = Settings.from_env(demo_dir)
    target = traces.resolve_build(demo)
    with transaction(demo.database_url) as s:
        model_path = repo.get_model(s, target.model_id).path
    real = Path(target.store_path)
    info = store.read_info(real)

    if work.exists():
        shutil.rmtree(work)
    settings = Settings.from_env(work)
    settings.stores.mkdir(parents=True)
    docs = texts_for(n)
    with transaction(settings.database_url) as s:
        repo.ingest_documents(s, repo.get_or_create_corpus(s, "scale"), docs)
    catalog.add_model(settings, Path(model_path), "demo")

    folder = settings.stores / f"scale-{n}"
    folder.mkdir()
    grad, dense = store.open_array(real, "grad"), store.open_array(real, "dense")
    if len(grad) != 651:
        raise SystemExit("expected the demo build (one row per document of world 0)")
    for name, rows, seed in (("grad", grad, 1), ("dense", dense, 2)):
        np.save(folder / f"{name}.npy", synthetic_rows(np.asarray(rows), n, seed))
    for f in real.glob("curvature-c*.npz"):
        shutil.copy(f, folder / f.name)
    lexical.build([t for _, t, _ in docs], folder / "bm25")
    grad_rows, dense_rows = store.open_array(folder, "grad"), store.open_array(folder, "dense")
    factory, dense_factory = ann.choose_factory(*grad_rows.shape), ann.choose_factory(*dense_rows.shape)
    ann.build_faiss(grad_rows, folder / "grad.faiss", factory)
    ann.build_faiss(dense_rows, folder / "dense.faiss", dense_factory)
    store.write_info(folder, {**info, "rows": n, "faiss_factory": factory, "dense_faiss_factory": dense_factory,
                              "faiss_nprobe": ann.NPROBE, "checksum": store.checksum(folder),
                              "synthetic": "bench.latency"})
    with transaction(settings.database_url) as s:
        corpus, model = repo.corpus_by_name(s, "scale"), repo.model_by_name(s, "demo")
        ids = {d.external_id: (d.id, len(d.text)) for d in repo.corpus_documents(s, corpus.id)}
        entries = [(ids[ext][0], 0, ids[ext][1]) for ext, _, _ in docs]
        repo.create_build(s, corpus_id=corpus.id, model_id=model.id, kind="hybrid",
                          config={**info["config"], "checkpoint_steps": [c["step"] for c in info["checkpoints"]]},
                          store_path=str(folder), entries=entries, checksum=store.read_info(folder)["checksum"])
    return settings, factory


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def run(settings, questions, generate: bool) -> dict:
    from service import traces
    total, stages = [], {}
    for q in questions:
        t = time.perf_counter()
        out = traces.trace(settings, q.prompt, answer=None if generate else " " + q.answer.strip())
        total.append(1000 * (time.perf_counter() - t))
        for k, v in out.timings.items():
            stages.setdefault(k, []).append(1000 * v)
    return {"p50_ms": percentile(total, 50), "p95_ms": percentile(total, 95), "n": len(total),
            "stages_p50_ms": {k: statistics.median(v) for k, v in stages.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="wherefrom-data", help="a data dir where `wherefrom demo` ran")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--work", default="bench/out/latency", help="scratch data dirs, one per size")
    args = ap.parse_args()
    questions = make_world(0).questions
    picks = [questions[i] for i in np.linspace(0, len(questions) - 1, args.questions).astype(int)]
    report = []
    for n in (int(x) for x in args.sizes.split(",")):
        t = time.perf_counter()
        settings, factory = make_scaled(Path(args.data_dir).resolve(), Path(args.work).resolve() / str(n), n)
        made = time.perf_counter() - t
        run(settings, picks[:3], generate=False)  # warm-up: models, FAISS pages
        given = run(settings, picks, generate=False)
        generated = run(settings, picks, generate=True)
        report.append({"documents": n, "factory": factory, "setup_s": made,
                       "answer_given": given, "answer_generated": generated})
        print(f"{n:>8,} docs ({factory}): answer given p50 {given['p50_ms']:.0f} ms, p95 {given['p95_ms']:.0f} ms; "
              f"with generation p50 {generated['p50_ms']:.0f} ms, p95 {generated['p95_ms']:.0f} ms")
        print("          stages p50 (answer given): " +
              ", ".join(f"{k} {v:.0f} ms" for k, v in given["stages_p50_ms"].items()))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "latency.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
