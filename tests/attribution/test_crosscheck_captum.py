"""Cross-check: with projection off, our per-checkpoint gradient dot products are captum's TracInCP."""

import torch
from captum.influence import TracInCP
from torch import nn
from torch.utils.data import TensorDataset

from indexer.adapter import tracked_layers
from indexer.gradients import Featurizer, collate, per_example_loss
from indexer.config import GradientConfig
from tests.indexer.test_gradients import tiny_llama

TRAIN = [[5, 7, 9, 11, 3, 2], [4, 8, 15], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 1, 30]]
TEST = [[5, 7, 9, 12, 13], [22, 4, 8, 15, 16, 23]]
ANSWER_FROM = [3, 4]  # the query loss is on the answer tokens only


class Wrapper(nn.Module):
    """captum calls model(*inputs): ids and mask in, logits out."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask).logits


def loss_fn(logits, labels):
    return per_example_loss(logits, labels)  # per example, as captum expects without a reduction


def test_exact_gradients_match_captum_tracincp(tmp_path):
    lm = tiny_llama()
    paths = []
    for seed in (0, 1):  # two checkpoints with different weights
        torch.manual_seed(seed)
        for p in lm.parameters():
            p.data.normal_(0, 0.2)
        paths.append(str(tmp_path / f"ckpt{seed}.pt"))
        torch.save(lm.state_dict(), paths[-1])
    wrapper = Wrapper(lm)

    def load(model, path):
        model.lm.load_state_dict(torch.load(path, weights_only=True))
        return 1.0  # learning rate: compare raw per-checkpoint dot products

    layers = ["lm." + l.name for l in tracked_layers(lm)]
    train = TensorDataset(*collate(TRAIN, 0))
    tracin = TracInCP(wrapper, train, paths, checkpoints_load_func=load, layers=layers,
                      loss_fn=loss_fn, batch_size=1)
    test_inputs = collate(TEST, 0, label_from=ANSWER_FROM)
    theirs = tracin.influence(test_inputs)  # (n_test, n_train)

    ours = torch.zeros_like(theirs)
    for path in paths:
        load(wrapper, path)
        feat = Featurizer(lm, GradientConfig(k_in=None, k_out=None, optimizer_norm=False, curvature="none"))
        ours += feat.features(*test_inputs) @ feat.features(*collate(TRAIN, 0)).T
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel <= 1e-4, rel.item()
    assert theirs.abs().min() > 0  # a real comparison, not of zeros
