"""`wherefrom demo`: the whole story on the embedded default, end to end.

A synthetic world of niche facts → a small GPT-2 trained from scratch (Trainer checkpoints) →
ingest → hybrid index → traces of a few questions, each showing whether the model answered
correctly and where its true source document ranks → a study over every question, and its report.
"""

from __future__ import annotations

import json
import shutil
import time

from rich.console import Console

from service.render import print_trace, progress_bars
from service.settings import Settings
from service.study_outcomes import is_correct  # noqa: F401 - the benchmarks import it from here too

CORPUS, MODEL = "demo", "demo-gpt2"


def _pick(questions, shown: int):
    """Favour single-document facts (the hard, interesting case), then 2, 4, 8 paraphrases."""
    by_n = {n: [q for q in questions if q.n_paraphrases == n] for n in (1, 2, 4, 8)}
    order = [1, 1, 2, 1, 4, 1, 8, 2, 4, 8]
    picked = []
    for n in order * 4:
        if len(picked) >= shown:
            break
        if by_n[n]:
            picked.append(by_n[n].pop(0))
    return picked


def run_demo(settings: Settings, fresh: bool = False, shown: int = 8, seed: int = 0) -> dict:
    from service import catalog, jobs, traces
    from service.demo.train import TrainConfig, train
    from service.demo.world import make_world

    console = Console()
    started = time.perf_counter()
    root = settings.data_dir / "demo"
    if fresh and root.exists():
        shutil.rmtree(root)
    world = make_world(seed)
    corpus_path, _ = world.write(root / "world")
    model_dir = root / "model"
    console.print(f"[bold]1/4 world[/] {len(world.documents)} documents, {len(world.questions)} facts "
                  f"→ {corpus_path}")
    if not any(model_dir.glob("checkpoint-*/model.safetensors")):
        console.print("[bold]2/4 training[/] a small GPT-2 from scratch on CPU (Trainer checkpoints)")
        partial = root / "model.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with progress_bars() as progress:
            train([d["text"] for d in world.documents], partial, TrainConfig(seed=seed), progress)
        partial.rename(model_dir)
    else:
        console.print(f"[bold]2/4 training[/] skipped: reusing {model_dir} (pass --fresh to retrain)")
    ingested = catalog.ingest(settings, corpus_path, CORPUS)
    catalog.add_model(settings, model_dir, MODEL)
    console.print(f"[bold]3/4 indexing[/] corpus {CORPUS} ({ingested.added} new documents), model {MODEL}")
    with progress_bars() as progress:
        build = jobs.index_here(settings, CORPUS, MODEL, progress=progress)
    console.print(f"build {build.build_id}: {build.rows} rows; gradient features "
                  f"{sum(build.info['gradient']['dims'])} dims over {len(build.info['checkpoints'])} checkpoints")

    console.print("[bold]4/4 tracing[/] answers back to the documents that taught them\n")
    for q in _pick(world.questions, shown):
        out = traces.trace(settings, q.prompt, corpus=CORPUS, model=MODEL, k=5)
        print_trace(out, truth=set(q.source_ids), correct=is_correct(out.answer, q.answer), console=console)
        console.print()
    summary = evaluate(settings, world.questions)
    for n, row in summary["by_paraphrases"].items():
        console.print(f"facts stated in {n} document(s): {row['correct']}/{row['questions']} answered correctly; "
                      f"true source at rank 1 for {row['rank1']}/{row['correct']} of those "
                      f"(MRR {row['mrr']:.2f})")
    summary["study"] = study(settings, world, root, build.build_id, console)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    console.print(f"demo finished in {summary['seconds']:.0f} s · data in {settings.data_dir}")
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(settings: Settings, questions) -> dict:
    """Trace every question; over correctly answered ones, where does a true source rank?"""
    from service import traces
    rows = {}
    for q in questions:
        out = traces.trace(settings, q.prompt, corpus=CORPUS, model=MODEL, k=10)
        row = rows.setdefault(q.n_paraphrases, {"questions": 0, "correct": 0, "rank1": 0, "rr": 0.0})
        row["questions"] += 1
        if not is_correct(out.answer, q.answer):
            continue
        row["correct"] += 1
        ranks = [h.rank for h in out.hits if h.external_id in set(q.source_ids)]
        row["rank1"] += bool(ranks and ranks[0] == 1)
        row["rr"] += 1 / ranks[0] if ranks else 0.0
    for row in rows.values():
        row["mrr"] = row.pop("rr") / max(1, row["correct"])
    return {"by_paraphrases": {n: rows[n] for n in sorted(rows)}}


def study(settings: Settings, world, root, build_id: int, console: Console) -> dict:
    """Every question of the world as one study (its facts' paraphrase counts as metadata), and its
    report; a second run over the same build reuses the study."""
    from db.errors import NotFound
    from service import jobs, studies
    from service.cli_common import write_atomically
    from service.render import print_study
    from service.study_report import build_study_report
    from service.study_report_html import render_study

    name = f"demo-build-{build_id}"
    console.print(f"\n[bold]study[/] {len(world.questions)} questions as one job ({name})")
    try:
        row = studies.summary(settings, name)
    except NotFound:
        path = root / "world" / "study.jsonl"
        path.write_text("".join(json.dumps({"question": q.prompt, "expected": q.answer, "n_paraphrases": q.n_paraphrases,
                                            "attribute": q.attribute}) + "\n" for q in world.questions))
        with progress_bars() as progress:
            jobs.submit(settings, studies.study_job(settings, path, name, CORPUS, MODEL, k=10), progress, inline=True)
        row = studies.summary(settings, name)
    print_study(row, console)
    report = root / "study.html"
    write_atomically(report, render_study(build_study_report(settings, name)))
    console.print(f"study report → {report}")
    return {"name": name, "report": str(report), **{k: row[k] for k in ("questions", "traced", "correct", "wrong")}}
