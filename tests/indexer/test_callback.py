"""The training callback records what the offline build computes, once per (document, exposure),
and a killed and resumed run records the same store as an uninterrupted one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.callback import WherefromCallback
from indexer.config import GradientConfig
from indexer.curvature import Stats
from indexer.gradients import Featurizer, collate
from indexer.loading import load_model
from indexer.modelio import adam_second_moments

DOCS = 40  # 5 steps per epoch at batch 8: three epochs and three saves in a few seconds


class Killed(Exception):
    pass


class KillAt:
    """Raises at the end of step `step`, as a killed process stops: no train end, an open unit left."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed()


def make_trainer(out: Path, world, accumulation=1, group_by_length=False, extra=None, ranks=1, collator=None,
                 arch="gpt2", prepare=None):
    """A Trainer over the tiny world's first DOCS documents with the callback attached: 8 examples a
    step in all, split over `accumulation` substeps and `ranks` DDP processes (gloo, on the CPU);
    `prepare` maps the dataset first (blocks of concatenated documents)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from service.demo.train import TrainConfig, tiny_model
    set_seed(3)
    tokenizer, data, tokens = tiny_data(world)
    data = prepare(data) if prepare else data
    model = tiny_model(TrainConfig(arch=arch, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer)
    args = TrainingArguments(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=8 // accumulation // ranks,
                             ddp_backend="gloo" if ranks > 1 else None,
                             gradient_accumulation_steps=accumulation, learning_rate=3e-3, warmup_steps=2,
                             weight_decay=0.01, save_strategy="steps", save_steps=5, logging_steps=5, report_to=[],
                             use_cpu=True, seed=3, disable_tqdm=True,
                             train_sampling_strategy="group_by_length" if group_by_length else "random",
                             remove_unused_columns=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=collator or DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[extra] if extra else None)
    WherefromCallback(GradientConfig(k_in=4, k_out=4, seed=5)).attach(trainer)
    return trainer, tokens


def tiny_data(world):
    """(tokenizer, dataset, each document's tokens) of the world's first DOCS documents: the dataset
    carries the id column and a column the model does not read."""
    import datasets

    from service.demo.train import train_tokenizer
    docs = world.documents[:DOCS]
    tokenizer = train_tokenizer([d["text"] for d in docs], 256)
    enc = [tokenizer(d["text"] + tokenizer.eos_token, truncation=True, max_length=64) for d in docs]
    data = datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc],
                                       "attention_mask": [e["attention_mask"] for e in enc],
                                       "wherefrom_id": [d["id"] for d in docs], "note": ["unused"] * DOCS})
    return tokenizer, data, {d["id"]: e["input_ids"] for d, e in zip(docs, enc)}


def units(out: Path, rank: int = 0) -> list[dict]:
    found = []
    for unit in sorted((out / "wherefrom" / f"rank-{rank:05d}").glob("unit-*")):
        meta = json.loads((unit / "unit.json").read_text())
        raw = np.fromfile(unit / "raw.f32", dtype=np.float32).reshape(meta["rows"], meta["dim"])
        found.append({"name": unit.name, "ids": np.load(unit / "ids.npy"), "steps": np.load(unit / "steps.npy"),
                      "raw": raw, "stats": dict(np.load(unit / "stats.npz"))})
    return found


@pytest.mark.parametrize("accumulation,group_by_length", [(1, False), (2, True)], ids=["plain", "accum2-grouped"])
def test_rows_equal_offline_features_at_the_checkpoint(tmp_path, tiny_world, accumulation, group_by_length):
    trainer, tokens = make_trainer(tmp_path, tiny_world, accumulation, group_by_length)
    trainer.train()
    found = units(tmp_path)
    assert [u["name"] for u in found] == ["unit-00000005", "unit-00000010", "unit-00000015"]
    ids = np.concatenate([u["ids"] for u in found])
    # one row per (document, epoch): every document three times, nothing else
    assert sorted(ids.tolist()) == sorted(list(tokens) * 3)
    # rows recorded at weight version 5 saw exactly checkpoint-5's weights and Adam moments
    unit = found[1]
    feat = assert_offline_at_5(tmp_path, unit, tokens, 8)
    assert len(feat.normalised) == len(feat.layers)
    # the step's K-FAC sums are those of its batch, δ rescaled to each example's mean-token loss
    k = list(unit["stats"]["steps"]).index(5)
    for i, layer in enumerate(feat.layers):
        offline = feat.stats.layers[layer.name]
        np.testing.assert_allclose(unit["stats"][f"{i}.a"][k], offline.a_sum, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(unit["stats"][f"{i}.s"][k], offline.s_sum, rtol=1e-3, atol=1e-12)
        assert unit["stats"][f"{i}.t"][k] == offline.tokens
    info = json.loads((tmp_path / "wherefrom" / "info.json").read_text())
    assert [s["step"] for s in info["saves"]] == [5, 10, 15]
    assert sorted(map(int, info["learning_rates"])) == list(range(15))
    assert info["learning_rates"]["0"] == 0.0 and info["learning_rates"]["2"] > 0


def assert_offline_at_5(out: Path, unit: dict, tokens: dict, rows: int) -> Featurizer:
    """The unit holds `rows` rows of weight version 5, each checkpoint-5's offline feature of its
    example (one padded batch, Adam's moments from its optimizer.pt). Returns the featurizer, with
    the batch's K-FAC sums in `stats`."""
    at = unit["steps"] == 5
    assert at.sum() == rows
    model, tokenizer = load_model(out / "checkpoint-5")
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4, seed=5),
                      adam_second_moments(model, out / "checkpoint-5" / "optimizer.pt"))
    feat.stats = Stats()
    want = feat.features(*collate([tokens[i] for i in unit["ids"][at]], tokenizer.pad_token_id)).numpy()
    rel = np.linalg.norm(unit["raw"][at] - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 1e-4, rel
    return feat


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_free_packing_records_each_example_as_if_alone(tmp_path, tiny_world, arch):
    from transformers import DataCollatorWithFlattening
    trainer, tokens = make_trainer(tmp_path, tiny_world, collator=DataCollatorWithFlattening(), arch=arch)
    trainer.train()
    found = units(tmp_path)
    assert sorted(np.concatenate([u["ids"] for u in found]).tolist()) == sorted(list(tokens) * 3)
    # the 8 examples of a step share one row of the batch; each one's row is its own gradient
    assert_offline_at_5(tmp_path, found[1], tokens, 8)


def test_packing_whose_examples_attend_to_each_other_is_refused(tmp_path, tiny_world):
    from transformers import DataCollatorWithFlattening

    from db.errors import InputError
    flat = DataCollatorWithFlattening()

    def with_mask(features):  # an attention mask over the packed row lets the examples see each other
        batch = flat(features)
        return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    trainer, _ = make_trainer(tmp_path, tiny_world, collator=with_mask)
    with pytest.raises(InputError, match="DataCollatorWithFlattening"):
        trainer.train()


def test_killed_and_resumed_run_records_the_same_store(tmp_path, tiny_world):
    whole, _ = make_trainer(tmp_path / "whole", tiny_world)
    whole.train()
    killed, _ = make_trainer(tmp_path / "run", tiny_world, extra=KillAt(8))
    with pytest.raises(Killed):
        killed.train()
    assert (tmp_path / "run" / "wherefrom" / "rank-00000" / "open").is_dir()  # rows of steps 5-7, never saved
    resumed, _ = make_trainer(tmp_path / "run", tiny_world)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))
    a, b = units(tmp_path / "whole"), units(tmp_path / "run")
    assert [u["name"] for u in a] == [u["name"] for u in b]
    for ua, ub in zip(a, b):
        assert ua["ids"].tolist() == ub["ids"].tolist() and ua["steps"].tolist() == ub["steps"].tolist()
        np.testing.assert_allclose(ua["raw"], ub["raw"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ua["stats"]["0.s"], ub["stats"]["0.s"], rtol=1e-5, atol=1e-12)
    info = [json.loads((tmp_path / d / "wherefrom" / "info.json").read_text()) for d in ("whole", "run")]
    assert info[0]["learning_rates"] == info[1]["learning_rates"]
    assert [s["step"] for s in info[1]["saves"]] == [5, 10, 15]
    assert not (tmp_path / "run" / "wherefrom" / "rank-00000" / "open").exists()


def test_evaluation_batches_are_not_recorded(tmp_path, tiny_world):
    trainer, _ = make_trainer(tmp_path, tiny_world)
    trainer.train()
    before = sum(len(u["ids"]) for u in units(tmp_path))
    with torch.no_grad():
        trainer.evaluate(trainer.train_dataset)
    assert sum(len(u["ids"]) for u in units(tmp_path)) == before == 3 * DOCS


def test_live_moments_are_bias_corrected_as_adam_divides_by_them():
    """Step t's fold uses v / (1 − β2^t), the second moment Adam's own update divides by: raw, the
    first steps' rows would weigh up to 1/√(1 − β2) times more than their update did."""
    from types import SimpleNamespace

    from indexer.callback import live_second_moments
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    feat = SimpleNamespace(layers=[SimpleNamespace(name="linear", module=linear, transposed=False)])
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, betas=(0.9, 0.99))
    assert live_second_moments(optimizer, feat) == {}  # no moments before the first step
    for _ in range(3):
        linear(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    got = live_second_moments(optimizer, feat)["linear.weight"]  # the means of v̂ the fold reads
    v = optimizer.state[linear.weight]["exp_avg_sq"] / (1 - 0.99 ** 3)
    torch.testing.assert_close(got.row, v.mean(1))
    torch.testing.assert_close(got.col, v.mean(0))
