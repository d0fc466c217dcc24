"""Peak memory of our gradient pass alone, in a fresh process, against the goal "≤ 2 × the model's
float32 weights + one batch" (issue 15).

    python -m bench.ours_rss --shape gpt2-86m --docs 82 --batch-size 16

The model is built from `bench.large`'s shape (random weights, saved first in a child process so
this one never holds a second copy); then only `shard_gradients` runs here. Reports the process's
RSS after imports, its peak (VmHWM) after the pass and the float32 weight bytes; `--plain` runs a
plain forward+backward of the same batches instead, the reference for "weights + one batch".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_now() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2-86m")
    ap.add_argument("--docs", type=int, default=82)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--plain", action="store_true",
                    help="a plain forward+backward of the same batches instead: what weights, their gradients "
                         "and one batch's activations cost, the reference for ours")
    ap.add_argument("--save-to", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from bench import large
    if args.save_to:  # the child: write the model and stop
        large.save_model(args.shape, args.save_to, large.documents(args.docs))
        return
    from indexer import memory
    from indexer.build import shard_gradients
    from indexer.config import BuildConfig, GradientConfig
    from indexer.corpus import Chunk
    from indexer.modelio import read_checkpoint
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "bench.ours_rss", "--shape", args.shape, "--docs", str(args.docs),
                        "--save-to", str(folder)], check=True)
        ckpt = read_checkpoint(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        texts = large.documents(args.docs)
        chunks = [Chunk(0, 0, 0, tok(t + tok.eos_token)["input_ids"]) for t in texts]
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        before = rss_now()
        if args.plain:
            from indexer.gradients import collate
            from indexer.loading import load_model
            model, _ = load_model(folder)
            ids = sorted((c.token_ids for c in chunks), key=len)
            large.plain_pass(model, [collate(ids[s:s + args.batch_size], tok.pad_token_id)
                                     for s in range(0, len(ids), args.batch_size)])
        else:
            shard = Path(tmp) / "shard"
            shard.mkdir()
            shard_gradients(shard, chunks, [ckpt], BuildConfig(batch_size=args.batch_size, gradient=GradientConfig()),
                            lambda *a: None)
        row = {"shape": args.shape, "pass": "plain" if args.plain else "ours", "documents": args.docs, "batch_size": args.batch_size,
               "tokens": sum(len(c.token_ids) for c in chunks), "weights_gib": weights / 2**30,
               "rss_before_pass_gib": before / 2**30, "peak_rss_gib": memory.peak_rss() / 2**30}
    row["peak_over_weights"] = row["peak_rss_gib"] / row["weights_gib"]
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
