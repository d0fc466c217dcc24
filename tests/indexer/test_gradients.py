"""Projected per-example gradients from one batched pass equal the explicit ones, projected."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from indexer.adapter import tracked_layers
from indexer.gradients import Featurizer, per_example_loss
from indexer.config import GradientConfig


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=16)).eval()


SEQS = [[5, 7, 9, 11, 3, 2], [4, 8, 15], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


def padded_batch(seqs, pad=0, answer_from=None):
    """Right-padded batch; labels -100 on padding (and before `answer_from`, if given)."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    if answer_from is not None:
        labels[:, :answer_from] = -100
    return ids, mask, labels


def explicit_projected(model, feat, seq, answer_from=None):
    """One example at a time: the full weight gradient, then P_out G P_inᵀ."""
    ids, mask, labels = padded_batch([seq], answer_from=answer_from)
    layers = tracked_layers(model)
    weights = [l.module.weight for l in layers]
    loss = per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels).sum()
    grads = torch.autograd.grad(loss, weights)
    parts = []
    for layer, g in zip(layers, grads):
        g = g.T if layer.transposed else g  # (out, in)
        parts.append((feat.p_out[layer.name] @ g @ feat.p_in[layer.name].T).flatten())
    return torch.cat(parts)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["conv1d", "linear"])
@pytest.mark.parametrize("k", [4, None], ids=["projected", "exact"])
def test_batched_equals_explicit(make_model, k):
    model = make_model()
    feat = Featurizer(model, GradientConfig(k_in=k, k_out=k, seed=3))
    batched = feat.features(*padded_batch(SEQS))
    for i, seq in enumerate(SEQS):
        want = explicit_projected(model, feat, seq)
        rel = (batched[i] - want).norm() / want.norm()
        assert rel <= 1e-4, (i, rel.item())


def test_answer_only_labels_and_padding():
    model = tiny_gpt2()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4))
    seqs = [[5, 7, 9, 11, 3, 2], [4, 8, 15, 16]]
    batched = feat.features(*padded_batch(seqs, answer_from=2))
    for i, seq in enumerate(seqs):
        want = explicit_projected(model, feat, seq, answer_from=2)
        assert (batched[i] - want).norm() / want.norm() <= 1e-4
    # Answer-only gradients differ from whole-sequence ones: the prompt really is excluded.
    whole = feat.features(*padded_batch(seqs))
    assert (whole[0] - batched[0]).norm() / whole[0].norm() > 1e-2


def test_factored_adam_normalisation_folds_into_projections():
    """With a rank-1 second moment v = r cᵀ / mean(v), the fold is exact: P_out (G / √v) P_inᵀ."""
    model = tiny_gpt2()
    layers = tracked_layers(model)
    gen = torch.Generator().manual_seed(1)
    moments, explicit = {}, {}
    for l in layers:
        r = torch.rand(l.out_features, generator=gen) + 0.1
        c = torch.rand(l.in_features, generator=gen) + 0.1
        v = torch.outer(r, c)  # rank one, so the row × column estimate is exact
        moments[l.name + ".weight"] = v.T if l.transposed else v
        explicit[l.name] = v
    plain = Featurizer(model, GradientConfig(k_in=4, k_out=4, optimizer_norm=False))
    normed = Featurizer(model, GradientConfig(k_in=4, k_out=4), second_moments=moments)
    assert normed.normalised == [l.name for l in layers]
    ids, mask, labels = padded_batch(SEQS[:1])
    got = normed.features(ids, mask, labels)[0]
    weights = [l.module.weight for l in layers]
    loss = per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels).sum()
    parts = []
    for l, g in zip(layers, torch.autograd.grad(loss, weights)):
        g = (g.T if l.transposed else g) / (explicit[l.name] + 1e-8).sqrt()
        parts.append((plain.p_out[l.name] @ g @ plain.p_in[l.name].T).flatten())
    want = torch.cat(parts)
    assert (got - want).norm() / want.norm() <= 1e-4


def test_kfac_statistics_ignore_padding():
    """Factor sums from a padded batch equal the sums over examples run one at a time."""
    from indexer.curvature import Stats
    model = tiny_gpt2()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4))
    feat.stats = Stats()
    feat.features(*padded_batch(SEQS))
    batched = feat.stats
    feat.stats = Stats()
    for seq in SEQS:
        feat.features(*padded_batch([seq]))
    for name, s in batched.layers.items():
        one = feat.stats.layers[name]
        assert s.tokens == one.tokens == sum(map(len, SEQS))
        assert abs(s.a_sum - one.a_sum).max() <= 1e-4 * abs(one.a_sum).max()
        assert abs(s.s_sum - one.s_sum).max() <= 1e-4 * abs(one.s_sum).max()


def test_per_token_terms_sum_to_the_feature():
    """The report's token highlights split a feature into per-position terms; they must add up."""
    model = tiny_gpt2()
    feat = Featurizer(model, GradientConfig(k_in=4, k_out=4, seed=1))
    batch = padded_batch(SEQS)
    whole = feat.features(*batch)
    terms = feat.features(*batch, per_token=True)
    assert terms.shape == (len(SEQS), batch[0].shape[1], whole.shape[1])
    torch.testing.assert_close(terms.sum(1), whole, rtol=1e-4, atol=1e-6)
    padding = batch[1] == 0
    assert terms[padding].abs().max() == 0  # padded positions carry nothing
