"""The hooks' shortcuts change no feature: layers that share an input are projected together from
the second batch on, layers of several projection shapes are stacked apart, and hooks that stay
registered record only the batches marked for recording."""

import pytest
import torch

from indexer.config import GradientConfig
from indexer.curvature import Stats
from indexer.gradients import Featurizer
from tests.indexer.test_gradients import SEQS, explicit_projected, padded_batch, tiny_gpt2, tiny_llama


# k_out=None keeps each layer's full output width: under grouped-query attention q (16 wide) and
# k/v (8 wide) then fall in different projection groups, and the q/k/v set's product is cut apart
@pytest.mark.parametrize("k_out", [4, None])
def test_shared_inputs_are_projected_together_with_the_same_features(k_out):
    model = tiny_llama()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=k_out, seed=3))
    feat.stats = Stats()
    first = feat.features(*padded_batch(SEQS))  # each layer projected alone; the sets found
    leads = {names[0].rsplit(".", 1)[1]: [n.rsplit(".", 1)[1] for n in names] for names in feat._leads.values()}
    assert leads == {"q_proj": ["q_proj", "k_proj", "v_proj"], "gate_proj": ["gate_proj", "up_proj"]}
    alone = {n: (s.a_sum.copy(), s.tokens) for n, s in feat.stats.layers.items()}
    feat.stats = Stats()
    second = feat.features(*padded_batch(SEQS))  # projected by the sets' first layers
    torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-7)
    for name, (a_sum, tokens) in alone.items():
        assert abs(feat.stats.layers[name].a_sum - a_sum).max() <= 1e-6 * abs(a_sum).max()
        assert feat.stats.layers[name].tokens == tokens
    want = explicit_projected(model, feat, SEQS[0])
    assert (second[0] - want).norm() / want.norm() <= 1e-4


def test_gpt2_layers_share_no_input():
    feat = Featurizer(tiny_gpt2(), GradientConfig(k_in=4, k_out=4))
    feat.features(*padded_batch(SEQS))
    assert feat._leads == {}


def test_sums_on_the_device_equal_the_stats():
    model = tiny_gpt2()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=3))
    feat.stats, feat.sums = Stats(), torch.zeros(feat.sums_width(), dtype=torch.float64)
    feat.features(*padded_batch(SEQS))
    feat.features(*padded_batch(SEQS[:2]))
    flat = torch.cat([torch.cat([torch.as_tensor(s.a_sum).flatten(), torch.as_tensor(s.s_sum).flatten(),
                                 torch.tensor([s.tokens], dtype=torch.float64)]) for s in feat.stats.layers.values()])
    torch.testing.assert_close(feat.sums, flat, rtol=0, atol=0)


def test_registered_hooks_record_only_marked_batches():
    model = tiny_gpt2()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4))
    handles = feat.register()
    try:
        feat.recording = False
        ids, mask, labels = padded_batch(SEQS)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert not feat._x and not feat._d
    finally:
        for h in handles:
            h.remove()
