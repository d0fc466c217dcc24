"""Concatenated blocks (HF run_clm's group_texts): the callback records one row per (block,
document segment), the segment's share of the block's gradient split by position."""

import numpy as np
import pytest
import torch

from bench.callback_blocks import blocks_of, split_rows
from indexer.config import GradientConfig
from indexer.document_ids import IdCollator, segment_runs
from indexer.gradients import Featurizer
from indexer.loading import load_model
from indexer.modelio import adam_second_moments
from tests.indexer.test_callback import make_trainer, units

BLOCK = 32


def blocks(data):
    return blocks_of(data.remove_columns(["note"]), BLOCK)


def test_segment_runs_give_each_position_the_document_of_the_token_it_predicts():
    ids = [["a", "a", "a", "b", "b"], ["b", "c", "c", "c"]]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # the second row padded on the right
    runs, run_of, names = segment_runs(ids, mask, (2, 5))
    # position 2 predicts b's first token; the second row's lone first token of b is never predicted
    assert runs == [2, 3, 5] and names == ["a", "b", "c"]
    assert run_of.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    left = segment_runs([["a", "b"]], torch.tensor([[0, 0, 1, 1]]), (1, 4))
    assert left[0] == [2, 2] and left[2] == ["a", "b"]  # left padding joins the run after it


def test_an_id_list_that_is_not_one_per_token_is_refused():
    from db.errors import InputError
    collate = IdCollator(lambda features: {}, "wherefrom_id")
    with pytest.raises(InputError, match="per_token_ids"):
        collate([{"input_ids": [1, 2, 3], "wherefrom_id": ["a", "b"]}])


def test_blocks_record_each_segment_as_the_block_gradient_at_its_positions(tmp_path, tiny_world):
    """Every recorded row of weight version 5 is checkpoint-5's per-position gradient of its block,
    summed over the segment's positions and rescaled to the segment's mean-token loss; over three
    epochs every (block, segment) is recorded three times, nothing else."""
    from transformers import DataCollatorForLanguageModeling
    trainer, _ = make_trainer(tmp_path, tiny_world, prepare=blocks)
    data = trainer.train_dataset
    with pytest.warns(UserWarning, match="--chunking packed"):
        trainer.train()
    found = units(tmp_path)
    model, tokenizer = load_model(tmp_path / "checkpoint-5")
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in data])
    runs, run_of, names = segment_runs(data["wherefrom_id"], batch["attention_mask"], batch["labels"].shape)
    assert sorted(np.concatenate([u["ids"] for u in found]).tolist()) == sorted(names * 3)
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4, seed=5),
                      adam_second_moments(model, tmp_path / "checkpoint-5" / "optimizer.pt"))
    terms = feat.features(batch["input_ids"], batch["attention_mask"], batch["labels"], per_token=True)
    want = split_rows(terms, batch["labels"], runs, run_of)[0].numpy()
    unit = found[1]
    at = np.flatnonzero(unit["steps"] == 5)
    assert len(at) >= 8  # 8 blocks a step, each at least one segment
    for r in at:
        same = [j for j, n in enumerate(names) if n == unit["ids"][r]]
        rel = np.linalg.norm(want[same] - unit["raw"][r], axis=1) / np.linalg.norm(want[same], axis=1)
        assert rel.min() < 1e-4, rel
