"""Throughput of trace jobs on the scale-out topology: PostgreSQL + Redis + `wherefrom worker`s.

    python -m bench.jobs --workers 2 --threads 1 --jobs 50 --runs 5

The tests' tiny world and model (2-layer GPT-2, 3 checkpoints, 197 documents), indexed in-process
into a throwaway PostgreSQL database; then N worker processes on the local Redis. Each run submits
J trace jobs at once (generated answers, k=5, hybrid) and measures from the first job's creation
to the last one's finish, as recorded in the jobs table. Workers are warmed first (each loads the
build's tracer once). Also times the same traces one after another in this process, without jobs,
as the baseline, with one worker's threads. Reports per-run throughput and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.cluster import REDIS, Workers, temporary_database, wait_for


def submit_and_wait(settings, workers, prompts, n: int, name: str) -> dict:
    from db import job_repo
    from db.engine import transaction
    from service import jobs
    from service.job_params import TraceJob

    ids = [jobs.submit(settings, TraceJob(prompts[i % len(prompts)], corpus=name, model=name, k=5))
           for i in range(n)]

    def all_finished():
        with transaction(settings.database_url) as s:
            return job_repo.batch_summary(s, ids)[0] == n
    wait_for(all_finished, 1800, f"{n} trace jobs", interval=0.1, logs=workers.tail)
    with transaction(settings.database_url) as s:
        _, failed, first, last = job_repo.batch_summary(s, ids)
    seconds = (last - first).total_seconds()
    return {"jobs": n, "failed": failed, "seconds": round(seconds, 2), "jobs_per_s": round(n / seconds, 2)}


def inline_baseline(settings, prompts, n: int, name: str, threads: int | None) -> dict:
    import torch

    from service import traces

    if threads:  # the same threads as one worker: the baseline is one worker without the job machinery
        torch.set_num_threads(threads)
    traces.trace(settings, prompts[0], corpus=name, model=name, k=5)  # load the tracer
    t = time.perf_counter()
    for i in range(n):
        traces.trace(settings, prompts[i % len(prompts)], corpus=name, model=name, k=5)
    seconds = time.perf_counter() - t
    return {"jobs": n, "seconds": round(seconds, 2), "jobs_per_s": round(n / seconds, 2)}


def setup_world(settings, root: Path, name: str, cache: Path):
    from service.demo.train import TrainConfig, train
    from service import catalog, jobs
    from service.demo.world import make_world

    world = make_world(seed=7, n_people=10, n_filler=20)
    corpus, _ = world.write(root / "world")
    model = cache / "model"  # trained once (seeded), reused by later runs of the benchmark
    if not any(model.glob("checkpoint-*/model.safetensors")):
        shutil.rmtree(cache / "model.partial", ignore_errors=True)  # a run cut off mid-training
        train([d["text"] for d in world.documents], cache / "model.partial",
              TrainConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=512, epochs=40, batch_size=8,
                          n_checkpoints=3, seed=7))
        (cache / "model.partial").rename(model)
    catalog.ingest(settings, corpus, name)
    catalog.add_model(settings, model, name)
    jobs.index_here(settings, name, name)
    return [q.prompt for q in world.questions]


def run(n_workers: int, n_jobs: int, runs: int, threads: int | None, cache: Path) -> dict:
    from service.settings import Settings

    name = "bench"
    with tempfile.TemporaryDirectory() as tmp, temporary_database() as url:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data", database_url=url, broker_url=REDIS,
                            queue=f"wherefrom-bench-{uuid.uuid4().hex[:8]}", visibility_timeout=600)
        prompts = setup_world(settings, root, name, cache)
        (root / "logs").mkdir()
        workers = Workers(settings, root / "logs", threads)
        try:
            for i in range(n_workers):
                workers.start(f"w{i}")
            submit_and_wait(settings, workers, prompts, 2 * n_workers, name)  # warm-up: tracers loaded
            results = [submit_and_wait(settings, workers, prompts, n_jobs, name) for _ in range(runs)]
        finally:
            workers.stop()
        baseline = inline_baseline(settings, prompts, n_jobs, name, threads)
    return {"workers": n_workers, "threads_per_worker": threads or "torch default", "runs": results,
            "median_jobs_per_s": statistics.median(r["jobs_per_s"] for r in results),
            "in_process_sequential": baseline, "machine": machine()}


def machine() -> str:
    """CPU model, cores and load: on a shared machine the load says how much the numbers are worth."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = ", load %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores{load}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/jobs.json"))
    parser.add_argument("--cache", type=Path, default=Path("bench/out/jobs-world"), help="where the trained model is kept")
    args = parser.parse_args()
    result = run(args.workers, args.jobs, args.runs, args.threads, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in result["runs"]:
        print(f"{r['jobs']} trace jobs on {args.workers} workers: {r['seconds']:.1f} s, {r['jobs_per_s']:.2f} jobs/s"
              f"{', ' + str(r['failed']) + ' failed' if r['failed'] else ''}")
    print(f"median {result['median_jobs_per_s']:.2f} jobs/s; in-process, one after another: "
          f"{result['in_process_sequential']['jobs_per_s']:.2f} traces/s")


if __name__ == "__main__":
    main()
