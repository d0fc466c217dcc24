#!/usr/bin/env bash
# The GPU benchmark in one go, on a machine with CUDA: installs what it needs, then measures a
# 124M GPT-2, a Pythia-410M-shaped and a Llama-3.2-1B-shaped model in bfloat16 (bench/gpu.py) and
# writes JSON. Under 8 minutes on one H100-class GPU; nothing in the project depends on it.
#
#   bash bench/gpu.sh [OUT.json]          # default bench/out/gpu.json
#   PYTHON=/path/to/python bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/out/gpu.json}"
PY="${PYTHON:-python3}"
export TQDM_DISABLE=1 OMP_WAIT_POLICY=PASSIVE

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device: this script measures a GPU"' \
  || { echo "error: torch sees no CUDA device; run bench/gpu.py --device cpu --tiny to check the code" >&2; exit 2; }

# the project itself, keeping the CUDA torch already installed (pip leaves a satisfied torch alone)
"$PY" -c 'import indexer.build, faiss, transformers, tokenizers' 2>/dev/null \
  || "$PY" -m pip install --quiet -e . \
  || { echo "error: could not install the project (pip install -e .)" >&2; exit 2; }
# bergson without its dependencies, so it cannot replace the CUDA torch (bench/bergson_ref.py)
"$PY" -m pip install --quiet --no-deps bergson==2.5.1 peft jaxtyping wadler_lindig natsort petname \
    simple-parsing docstring-parser torchopt ml_dtypes datasets \
  || echo "note: bergson did not install; its column (c) is left out"

# 450 s for the measurements leaves the installs the rest of the 8 minutes
timeout 450 "$PY" -m bench.gpu --device cuda --out "$OUT"
