"""The GPU row of BENCHMARKS.md in one run: three published shapes in bfloat16, random weights.

    python -m bench.gpu --device cuda --out bench/out/gpu.json      # what bench/gpu.sh runs
    python -m bench.gpu --device cpu --tiny                         # the same code, tiny shapes

Per shape (`bench.large.measure`): (a) plain forward+backward tokens/s, (b) our gradient pass,
(c) bergson's build with the same projection when it is installed, the query-gradient latency and
the peak device memory. Goals (BENCHMARKS.md): (b) ≥ (c) and (b)/(a) ≤ 1.10 at 124M and 1B.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from bench import bergson_ref
from bench.large import measure

FULL = ("gpt2-124m", "pythia-410m", "llama-1b")
TINY = ("tiny-gpt2", "tiny-llama")


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and 16 documents: proves the path on a CPU")
    ap.add_argument("--docs", type=int, default=400, help="documents of 60-120 tokens per shape")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--projection", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/out/gpu.json"))
    args = ap.parse_args()
    shapes, docs = (TINY, 16) if args.tiny else (FULL, args.docs)
    with_bergson = bergson_ref.available()
    rows, t = [], time.perf_counter()
    for shape in shapes:
        row = measure(shape, docs, args.device, "bfloat16", args.batch_size, args.projection, runs=2,
                      bergson=with_bergson)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": device_name(args.device), "bergson": with_bergson, "seconds": time.perf_counter() - t,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['seconds']:.0f} s on {report['device']})")


if __name__ == "__main__":
    main()
