"""Under DDP every rank records its own examples' rows in its own unit set, each row the gradient
of its example's mean-token loss at that step's weights (the loss the Trainer scales by the world
size and the tokens of all ranks), and publishing reads every rank: two gloo processes on the CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from indexer.callback import recorded_ids, write_training_shard
from tests.indexer.test_callback import DOCS, assert_offline_at_5, tiny_data, units

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_record_their_own_rows_and_publish_as_one(tmp_path, tiny_world):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          str(ROOT / "tests" / "indexer" / "ddp_rank.py"), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [units(tmp_path, r) for r in (0, 1)]
    for found in ranks:  # 4 examples a rank and step, 5 steps an epoch: a unit per save on each rank
        assert [u["name"] for u in found] == ["unit-00000005", "unit-00000010", "unit-00000015"]
    # a save window is an epoch here: the ranks split it, every document once, nothing else
    tokens = tiny_data(tiny_world)[2]
    for a, b in zip(*ranks):
        assert len(a["ids"]) == len(b["ids"]) == DOCS // 2
        assert sorted(a["ids"].tolist() + b["ids"].tolist()) == sorted(tokens)
    # each rank's rows at weight version 5 are checkpoint-5's offline features of those examples
    for found in ranks:
        assert_offline_at_5(tmp_path, found[1], tokens, 4)
    info = json.loads((tmp_path / "wherefrom" / "info.json").read_text())
    assert [s["step"] for s in info["saves"]] == [5, 10, 15] and info["world_size"] == 2
    # publishing reads both ranks: one row per document, every exposure of both summed in
    root = tmp_path / "wherefrom"
    assert recorded_ids(root) == set(tokens)
    shard = tmp_path / "shard"
    shard.mkdir()
    row_of = {i: n for n, i in enumerate(sorted(tokens))}
    meta = write_training_shard(root, shard, row_of, [5, 10, 15])
    assert meta["exposures"] == 3 * DOCS
    lrs = {int(k): v for k, v in info["learning_rates"].items()}
    want = np.zeros((3, len(row_of), ranks[0][0]["raw"].shape[1]))
    for u in ranks[0] + ranks[1]:  # Σ lr_t g_t per document and nearest save: steps 0-7, 8-12, 13-14
        for i, step, g in zip(u["ids"], u["steps"], u["raw"]):
            want[0 if step <= 7 else 1 if step <= 12 else 2, row_of[i]] += lrs[int(step)] * g
    for c in range(3):
        np.testing.assert_allclose(np.load(shard / f"raw-c{c}.npy"), want[c], rtol=1e-5, atol=1e-9)
