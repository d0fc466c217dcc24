"""Throughput of a study against the in-process trace rate, on the demo world.

    python -m bench.study --questions 1000 --workers 1 2 --model-dir wherefrom-data/demo/model

The demo world (seed 0: 160 facts, 680 documents) and its trained model (`wherefrom demo` trains
it; pass its folder), indexed in-process into a throwaway PostgreSQL database. Then, in one run:
- the baseline: `traces.trace` one question after another in this process (the tracer loaded
  first), with one torch thread, as one worker has;
- a study of N questions (the world's prompts, cycled) on 1 `wherefrom worker`, then on 2, each
  with one thread, timed from the job's creation to its finish in the jobs table: the workers
  start cold, so each one's tracer loading is inside the time (amortised over its tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench.cluster import REDIS, Workers, temporary_database, wait_job
from bench.jobs import machine


def setup(settings, root: Path, model_dir: Path, n: int) -> tuple[Path, list[str]]:
    from service import catalog, jobs
    from service.demo.world import make_world

    world = make_world(0)
    corpus, _ = world.write(root / "world")
    catalog.ingest(settings, corpus, "demo")
    catalog.add_model(settings, model_dir, "demo")
    jobs.index_here(settings, "demo", "demo")
    questions = [world.questions[i % len(world.questions)] for i in range(n)]
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q.prompt, "expected": q.answer}) + "\n" for q in questions))
    return path, [q.prompt for q in questions]


def baseline(settings, prompts: list[str]) -> dict:
    import torch

    from service import traces
    torch.set_num_threads(1)
    traces.trace(settings, prompts[0], corpus="demo", model="demo")  # load the tracer
    t = time.perf_counter()
    for p in prompts:
        traces.trace(settings, p, corpus="demo", model="demo")
    seconds = time.perf_counter() - t
    return {"questions": len(prompts), "seconds": round(seconds, 2), "per_s": round(len(prompts) / seconds, 2)}


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process, summed by kind: the workers, PostgreSQL,
    Redis, this bench and the rest. Read from /proc, so a run can say where the cores went."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        kind = ("worker" if "wherefrom" in cmd and " worker" in cmd else "postgres" if "postgres" in cmd
                else "redis" if "redis" in cmd else "bench" if int(stat.parent.name) == os.getpid() else "other")
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per kind since `before` (processes that ended in between are not counted)."""
    now = cpu_by_process()
    return {k: round(now.get(k, 0.0) - before.get(k, 0.0), 1) for k in sorted(set(now) | set(before))}


def study_on_workers(settings, root: Path, path: Path, n_workers: int, tasks_of: int) -> dict:
    from service import jobs, studies

    logs = root / f"logs-{n_workers}"
    logs.mkdir()
    workers = Workers(settings, logs, threads=1)
    try:
        for i in range(n_workers):
            workers.start(f"w{i}")
        spec = studies.study_job(settings, path, f"bench-{n_workers}-{uuid.uuid4().hex[:6]}", "demo", "demo",
                                 tasks_of=tasks_of)
        job_id = jobs.submit(settings, spec)
        before = cpu_by_process()
        wait_job(settings, job_id, workers, timeout=3600)
        cpu = cpu_since(before)  # before the workers stop: their CPU is counted while they live
    finally:
        workers.stop()
    from db import job_repo
    from db.engine import transaction
    with transaction(settings.database_url) as s:
        job = job_repo.get_job(s, job_id)
        seconds = (job.finished_at - job.created_at).total_seconds()
        result = job.result
    n = result["questions"]
    return {"workers": n_workers, "questions": n, "failed": result["failed"], "seconds": round(seconds, 2),
            "per_s": round(n / seconds, 2), "cpu_seconds": cpu}


def run(model_dir: Path, n: int, n_baseline: int, worker_counts: list[int], tasks_of: int) -> dict:
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as tmp, temporary_database() as url:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data", database_url=url, broker_url=REDIS,
                            queue=f"wherefrom-bench-{uuid.uuid4().hex[:8]}", visibility_timeout=3600)
        path, prompts = setup(settings, root, model_dir, n)
        load_before = machine()
        runs = [study_on_workers(settings, root, path, w, tasks_of) for w in worker_counts]
        base = baseline(settings, prompts[:n_baseline])
    one = next((r for r in runs if r["workers"] == 1), None)
    out = {"baseline_in_process": base, "studies": runs, "tasks_of": tasks_of,
           "machine_before": load_before, "machine_after": machine()}
    if one:
        out["one_worker_vs_in_process"] = round(one["per_s"] / base["per_s"], 3)
        out["speedup"] = {r["workers"]: round(r["per_s"] / one["per_s"], 3) for r in runs}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("wherefrom-data/demo/model"))
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=300, help="questions traced one by one for the baseline")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks-of", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("bench/out/study.json"))
    args = parser.parse_args()
    result = run(args.model_dir, args.questions, args.baseline, args.workers, args.tasks_of)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
