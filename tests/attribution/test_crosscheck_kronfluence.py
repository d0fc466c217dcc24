"""Cross-check: our EK-FAC influence (projection off) agrees with kronfluence's EK-FAC.

kronfluence is a yardstick only: installed `--no-deps` by the README's test command, never a
runtime dependency. It tracks `nn.Linear` only, so the model is a tiny Llama.
"""

import kronfluence
import numpy as np
import torch
from torch.utils.data import Dataset

from indexer.adapter import tracked_layers
from indexer.curvature import Stats, fit
from indexer.gradients import Featurizer, collate, per_example_loss
from indexer.config import GradientConfig
from tests.indexer.test_gradients import tiny_llama


GEN = np.random.default_rng(0)
TRAIN = [list(GEN.integers(1, 40, size=n)) for n in GEN.integers(5, 12, size=24)]
QUERY = [list(GEN.integers(1, 40, size=8)) for _ in range(3)]
ANSWER_FROM = [5, 5, 5]


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class Rows(Dataset):
    def __init__(self, seqs, label_from=None):
        self.ids, self.mask, self.labels = collate([[int(t) for t in s] for s in seqs], 0, label_from)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class LMTask(kronfluence.Task):
    """Per-example loss = mean token loss, as in our featurizer; the measurement is the query loss."""

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_loss(logits, batch["labels"]).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch["attention_mask"]

    def get_influence_tracked_modules(self):
        return [l.name for l in tracked_layers(tiny_llama())]  # ours: every linear layer but the head


def test_ekfac_influence_agrees_with_kronfluence(tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.3, generator=gen)
    # ours: exact gradients, EK-FAC fitted on the training set, damping 0.1 × mean eigenvalue
    feat = Featurizer(model, GradientConfig(k_in=None, k_out=None, optimizer_norm=False))
    feat.stats = Stats()
    train_g = feat.features(*collate(TRAIN, 0)).numpy()
    curv = fit(feat.stats, [train_g], damping=0.1)
    feat.stats = None
    query_g = feat.features(*collate(QUERY, 0, label_from=ANSWER_FROM)).numpy()
    ours = curv.apply(query_g) @ curv.apply(train_g).T  # (n_query, n_train)

    task = LMTask()
    copy = tiny_llama()
    copy.load_state_dict(model.state_dict())
    theirs_model = prepare_model(copy, task)
    analyzer = Analyzer("x", theirs_model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    analyzer.fit_all_factors("ekfac", Rows(TRAIN), per_device_batch_size=len(TRAIN),
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    analyzer.compute_pairwise_scores("s", "ekfac", Rows(QUERY, ANSWER_FROM), Rows(TRAIN),
                                     per_device_query_batch_size=len(QUERY), per_device_train_batch_size=len(TRAIN),
                                     score_args=ScoreArguments(damping_factor=None))
    theirs = analyzer.load_pairwise_scores("s")["all_modules"].double().numpy()
    rhos = [spearman(a, b) for a, b in zip(ours, theirs)]
    print("spearman per query:", [round(r, 4) for r in rhos])
    assert min(rhos) >= 0.9, rhos
