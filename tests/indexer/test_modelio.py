"""Reading a Trainer run: checkpoints, learning rates, and Adam moments mapped to the right weights."""

import json
import re

import torch

from indexer.adapter import tracked_layers
from indexer.loading import load_model
from indexer.modelio import adam_second_moments, discover_checkpoints


def test_trainer_folder_yields_every_checkpoint_with_its_learning_rate(trained):
    folder, trainer = trained
    ckpts = discover_checkpoints(folder)
    assert len(ckpts) == 3 and [c.step for c in ckpts] == sorted(c.step for c in ckpts)
    assert all(c.optimizer_state_path and c.optimizer_state_path.exists() for c in ckpts)
    assert len({c.weights_sha256 for c in ckpts}) == 3
    assert len({c.tokenizer_hash for c in ckpts}) == 1
    history = json.loads((ckpts[-1].path / "trainer_state.json").read_text())["log_history"]
    logged = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    for before, c in zip([0] + [c.step for c in ckpts], ckpts):  # the mean rate of the steps it closes
        window = [lr for s, lr in logged if before < s <= c.step]
        assert window and abs(c.learning_rate - sum(window) / len(window)) < 1e-12
    # the schedule ends at 0, so the rate logged at the last step would give the last checkpoint no weight
    assert [lr for s, lr in logged if s <= ckpts[-1].step][-1] < 1e-6 < ckpts[-1].learning_rate


def test_adam_moments_map_to_the_parameters_the_optimizer_held(trained):
    """The last checkpoint's optimizer.pt, mapped by our rule, equals the live optimizer's state,
    bias-corrected as Adam's update divides by it: v / (1 − β2^step)."""
    folder, trainer = trained
    last = discover_checkpoints(folder)[-1]
    model, _ = load_model(last.path)
    moments = adam_second_moments(model, last.optimizer_state_path)
    live = dict(trainer.model.named_parameters())
    layers = tracked_layers(model)
    assert {l.name + ".weight" for l in layers} <= set(moments)
    for name, v in moments.items():
        assert float(trainer.optimizer.state[live[name]]["step"]) == last.step, name
        assert_raw_moment(v, trainer, live[name], name)


def assert_raw_moment(v, trainer, param, name: str) -> None:
    """`v`, bias-corrected (v / (1 − β2^step)), is the live optimizer's exp_avg_sq of `param`."""
    state = trainer.optimizer.state[param]
    raw = v * (1 - trainer.args.adam_beta2 ** float(state["step"]))
    torch.testing.assert_close(raw, state["exp_avg_sq"].float(), rtol=1e-6, atol=0, msg=name)


def test_checkpoints_are_selected_by_step_and_recorded_rows_read_back(trained):
    import pytest

    from db.errors import InputError
    from db.models import Checkpoint
    from indexer.modelio import CheckpointInfo, context_length, select_checkpoints

    folder, _ = trained
    ckpts = discover_checkpoints(folder)
    steps = [c.step for c in ckpts]
    assert select_checkpoints(ckpts, "all") == ckpts and select_checkpoints(ckpts, "last") == ckpts[-1:]
    assert select_checkpoints(ckpts, f"{steps[2]},{steps[0]}") == [ckpts[0], ckpts[2]]
    with pytest.raises(InputError, match=re.escape(f"known steps: {steps}")):
        select_checkpoints(ckpts, f"{steps[0]},999999")
    c = ckpts[0]
    row = Checkpoint(step=c.step, path=str(c.path), weights_sha256=c.weights_sha256, tokenizer_hash=c.tokenizer_hash,
                     learning_rate=c.learning_rate, optimizer_state_path=str(c.optimizer_state_path), base_path=None)
    assert CheckpointInfo.from_row(row) == c
    assert context_length(c.path) > 0
