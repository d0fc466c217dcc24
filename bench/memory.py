"""A build's peak memory against corpus size: two corpora an order of magnitude apart.

    python -m bench.memory --sizes 5000,50000

One small model (trained here in a minute, 4 checkpoints) indexes corpora of real world text of
each size through the real CLI (`wherefrom ingest`, `model add`, `index`, embedded default), each
command in its own process; the peak resident set size of the `index` process is read from
`wait4`. Stores are written as memory maps and FAISS is fed in blocks, so the peak should follow
the batch size, not the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.latency import texts_for

OUT = Path("bench/out")


def run(args: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one CLI command in its own process."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def main():
    from service.demo.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,50000")
    ap.add_argument("--work", default="bench/out/memory")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--faiss-factory", help="the same FAISS factory at every size (default: wherefrom's "
                    "choice, which turns from exact to PCA + IVF above 256 MB of vectors)")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    model = work / "model"
    if not (model / "done").exists():
        texts = [t for _, t, _ in texts_for(651)]
        train(texts, model, TrainConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=512, epochs=4, n_checkpoints=4))
        (model / "done").write_text("")
    report = []
    for n in (int(x) for x in args.sizes.split(",")):
        data = work / f"data-{n}"
        subprocess.run(["rm", "-rf", str(data)], check=True)
        corpus = work / f"corpus-{n}.jsonl"
        corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t, _ in texts_for(n)))
        env = {**os.environ, "WHEREFROM_DATA_DIR": str(data), "OMP_WAIT_POLICY": "PASSIVE"}
        env.pop("WHEREFROM_DATABASE_URL", None)
        run(["ingest", str(corpus), "--corpus", "c"], env)
        run(["model", "add", str(model), "--name", "m"], env)
        factory = ["--faiss-factory", args.faiss_factory] if args.faiss_factory else []
        seconds, rss = run(["index", "--corpus", "c", "--model", "m", "--batch-size", str(args.batch_size),
                            *factory], env)
        report.append({"documents": n, "index_s": seconds, "peak_rss_mib": rss})
        print(f"{n:>8,} documents: index {seconds:6.0f} s, peak RSS {rss:7.0f} MiB")
    growth = report[-1]["peak_rss_mib"] / report[0]["peak_rss_mib"] - 1
    print(f"peak RSS grows {100 * growth:.1f}% for {report[-1]['documents'] / report[0]['documents']:.0f}× the documents")
    OUT.mkdir(parents=True, exist_ok=True)
    name = "memory.json" if not args.faiss_factory else "memory-fixed-factory.json"
    (OUT / name).write_text(json.dumps({"runs": report, "growth": growth, "factory": args.faiss_factory}, indent=1))


if __name__ == "__main__":
    main()
