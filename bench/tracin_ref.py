"""Reference: captum's TracInCP with full, unprojected gradients, on a product build.

    python -m bench.tracin_ref --world trap --seed 101 [--limit Q]
    python -m bench.tracin_ref --world realistic --seed 200 --out-dir /work/main/bench/out --memory-gb 6
    python -m bench.tracin_ref --world trap --seed 101 --cosine     # + the product's exact-rerank cosine
    python -m bench.tracin_ref --world trap --seed 101 --tracked    # TracInCP on the tracked layers only

Reads what `bench.product_path.run` left under `--out-dir` (default bench/out): the data dir
{world}-seed{seed}/data (SQLite db + the build) and quality-{world}-seed{seed}.json (the
per-question records). Training rows are the build's rows in row order, tokenised as the build
chunked them; checkpoints are the build's, each weighted by lr_c / Σ lr (the square of the √
weight the product puts on each side of its per-checkpoint cosine). Losses are the product's:
mean next-token cross-entropy over a row's labelled tokens for training rows, over the answer
tokens only (prompt labelled -100) for the query. Every row is scored for every correctly answered
question, ranked, and the first source document's MRR (0 beyond rank 100, as the product's traces
keep 100 hits) reported per split of `product_path.summary`, beside the product's own methods.
Writes bench/out/tracin-{world}-seed{seed}.json (always under this checkout's bench/out).

Every parameter is tracked (embeddings, norms, attention, MLP). captum's sample-wise hooks
(`sample_wise_grads_per_batch=True`) handle nn.Linear and nn.Conv2d only, not GPT-2's Conv1D, the
embeddings or the norms, so the per-example loop (`False`) is used: one autograd.grad per training
example. Memory: captum holds the query batch's jacobians (Q × checkpoints × parameters floats) and
one training batch's, never the corpus's; the query batch is sized from `--memory-gb`. Cost: every
captum call recomputes every row's gradient at every checkpoint, and each row's dot products read
the whole query batch's jacobians, so time ≈ calls × rows × checkpoints × (a backward + Q × params
reads). Trap world seed 101 (1,113 rows, 0.93M parameters, 178 questions, 2 calls): 218-254 s on the
shared cores, peak RSS 2.97 GiB (0.75 GiB with 16 questions: it follows the query batch, not the rows).
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.trap_world import stating_ids

OUT = Path("bench/out")
K = 100  # product_path keeps 100 hits per trace: a first source beyond them counts 0 there too


@dataclass
class Reference:
    """A build as captum sees it: the training rows, the checkpoints and the model they load into."""

    ckpts: list  # CheckpointInfo, in the build's order
    weights: list[float]  # lr_c / Σ lr: TracIn's learning-rate weight of checkpoint c's dot product
    tokens: list[list[int]]  # row i's token ids, as the build chunked it
    spans: list[tuple[int, int] | None]  # row i's labelled token range (packed rows), None: all
    ext: list[str]  # row i's document external id
    tokenizer: object
    model: torch.nn.Module  # bench.perf.LogitsOnly around the language model
    params: dict[str, list[torch.Tensor]]  # checkpoint path → its parameters, in model.parameters() order
    info: dict  # the build's info.json

    @property
    def paths(self) -> list[str]:
        return [str(c.path) for c in self.ckpts]

    def load(self, model: torch.nn.Module, path: str) -> float:
        """captum's checkpoints_load_func. captum calls it once per training batch and checkpoint,
        so every checkpoint's weights are read once and swapped in by reference: no disk, no copy."""
        for p, q in zip(model.parameters(), self.params[path]):
            p.data = q
        return self.weights[self.paths.index(path)]


def settings_of(out_dir: Path, world: str, seed: int):
    """Settings of the data dir `bench.product_path.run` made (its name and database URL)."""
    from service.settings import Settings
    data = out_dir / f"{world}-seed{seed}" / "data"
    if not (data / "bench.db").exists():
        raise SystemExit(f"no {data}/bench.db: run `python -m bench.quality --world {world} --seed {seed}` first")
    return Settings(data_dir=data, database_url=f"sqlite:///{data.resolve()}/bench.db")


def build_rows(settings, target, config, ckpts):
    """(tokens, label spans, external ids) of every row, re-chunked exactly as the build chunked
    them (`service.builds.chunk_documents`) and checked against the stored char spans."""
    from db import repo
    from db.engine import transaction
    from service.builds import chunk_documents

    with transaction(settings.database_url) as s:
        build = repo.get_build(s, target.build_id)
        entries = repo.entries_at(s, build.id, range(build.row_count))
        rows = [(entries[i][0].document_id, entries[i][0].char_start, entries[i][0].char_end,
                 entries[i][1].external_id, entries[i][1].text) for i in range(build.row_count)]
    docs = list({r[0]: r[4] for r in rows}.items())  # each document once, in row order
    chunks, _, _ = chunk_documents(docs, ckpts, config)
    got = [(c.document_id, c.char_start, c.char_end) for c in chunks]
    if got != [r[:3] for r in rows]:
        raise SystemExit("re-chunking the build's documents does not give its rows: the build's chunking changed")
    return [c.token_ids for c in chunks], [c.labels for c in chunks], [r[3] for r in rows]


def open_reference(settings) -> Reference:
    """The latest build of the data dir, its rows, its checkpoints loaded in float32."""
    from bench.perf import LogitsOnly
    from indexer import store
    from indexer.config import BuildConfig
    from indexer.loading import load_model
    from service import traces

    target = traces.resolve_build(settings)
    info = store.read_info(Path(target.store_path))
    ckpts = [target.by_step[c["step"]] for c in info["checkpoints"]]
    config = BuildConfig(**info["config"])
    tokens, spans, ext = build_rows(settings, target, config, ckpts)
    weights = [w * w for w in info["gradient"]["weights"]]  # the product weights each side by √(lr_c/Σlr)
    params, model, tokenizer = {}, None, None
    for c in ckpts:
        lm, tok = load_model(c.path, c.base_path, dtype="float32")  # float32: gradients to 1e-4
        if any(not p.requires_grad for p in lm.parameters()):
            raise SystemExit(f"{c.path}: some parameters are frozen (a LoRA adapter?): this reference tracks whole models")
        params[str(c.path)] = [p.detach() for p in lm.parameters()]
        model, tokenizer = model or LogitsOnly(lm), tokenizer or tok
    return Reference(ckpts, weights, tokens, spans, ext, tokenizer, model, params, info)


def train_loader(ref: Reference, batch: int):
    """(DataLoader over the rows in length order, that order): padding stays small; right padding
    is masked from attention and loss, so a row's gradient does not depend on its batch."""
    from torch.utils.data import DataLoader

    from indexer.gradients import collate
    order = sorted(range(len(ref.tokens)), key=lambda i: len(ref.tokens[i]))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    pad = ref.tokenizer.pad_token_id

    def make(rows):
        return collate([ref.tokens[i] for i in rows], pad, label_spans=[ref.spans[i] for i in rows])
    return DataLoader(range(len(order)), batch_sampler=batches, collate_fn=make), order


def query_batch_size(ref: Reference, memory_gb: float) -> int:
    """Queries per captum call: their jacobians (Q × checkpoints × parameters float32) in the budget.
    Fewer calls matter: each one recomputes every training row's gradient at every checkpoint."""
    n_params = sum(p.numel() for p in ref.model.parameters())
    return max(1, int(memory_gb * 2**30 // (4 * n_params * len(ref.ckpts))))


def tracin_scores(ref: Reference, prompts: list[str], answers: list[str], query_batch: int = 32,
                  train_batch: int = 4, log=print, layers: list[str] | None = None) -> np.ndarray:
    """captum TracInCP influence of every row on each (prompt, answer): (Q, rows) float64.
    `layers`: captum's module names (under `lm.`) to track; None, every parameter."""
    from captum.influence import TracInCP
    from torch.utils.data import DataLoader

    from attribution.tracer import encode_qa
    from indexer.gradients import collate, per_example_loss

    loader, order = train_loader(ref, train_batch)
    # per_example_loss has no `reduction`: captum warns that it then assumes a per-example loss, which it is
    warnings.filterwarnings("ignore", message="Since `loss_fn` has no", category=UserWarning)
    tracin = TracInCP(ref.model, loader, ref.paths, checkpoints_load_func=ref.load, loss_fn=per_example_loss,
                      sample_wise_grads_per_batch=False, layers=layers)
    out = np.zeros((len(prompts), len(ref.tokens)))
    for start in range(0, len(prompts), query_batch):
        t = time.perf_counter()
        encoded = [encode_qa(ref.tokenizer, p, a) for p, a in zip(prompts[start:start + query_batch],
                                                                  answers[start:start + query_batch])]
        # one query per forward: captum's per-example loop backpropagates each example through its
        # whole batch's graph, so a batch of q costs q² example-backwards (q of them one by one)
        inputs = DataLoader(encoded, batch_size=1, collate_fn=lambda b: collate(
            [b[0][0]], ref.tokenizer.pad_token_id, label_from=[b[0][1]]))
        scores = tracin.influence(inputs).double().numpy()  # (q, rows in loader order)
        out[start:start + len(encoded), order] = scores
        log(f"  queries {start + len(encoded)}/{len(prompts)}: {time.perf_counter() - t:.1f} s")
    return out


def cosine_scores(ref: Reference, prompts: list[str], answers: list[str], query_batch: int = 32,
                  train_batch: int = 8) -> np.ndarray:
    """Σ_c (lr_c/Σlr) cos(g_q,c, g_d,c) with full, unprojected gradients of the product's tracked
    layers (no embeddings, no output head) and no Adam or EK-FAC: the product's `--rerank exact`
    score (attribution.rerank), on every row. Beside raw TracInCP it separates what unit norm does
    from what the optimizer and curvature terms do. (Q, rows) float64; not captum: its hooks batch."""
    from attribution.tracer import encode_qa
    from indexer.config import BuildConfig, GradientConfig
    from indexer.gradients import Featurizer, collate

    modules = BuildConfig(**ref.info["config"]).gradient.modules
    config = GradientConfig(k_in=None, k_out=None, modules=modules, optimizer_norm=False, curvature="none")
    pad, out = ref.tokenizer.pad_token_id, np.zeros((len(prompts), len(ref.tokens)))
    encoded = [encode_qa(ref.tokenizer, p, a) for p, a in zip(prompts, answers)]
    loader, order = train_loader(ref, train_batch)
    for path, w in zip(ref.paths, ref.weights):
        ref.load(ref.model, path)
        feat = Featurizer(ref.model.lm, config)
        for start in range(0, len(encoded), query_batch):  # the query batch's gradients: the memory bound
            part = encoded[start:start + query_batch]
            q = torch.cat([feat.features(*collate([ids], pad, label_from=[f])) for ids, f in part])
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
            col = 0
            for batch in loader:
                d = feat.features(*batch)
                cos = (q @ d.T) / d.norm(dim=1).clamp_min(1e-30)
                out[start:start + len(part), order[col:col + len(d)]] += w * cos.double().numpy()
                col += len(d)
    return out


def tracked_names(ref: Reference) -> list[str]:
    """captum names of the layers the product's features track (its build's `--modules`)."""
    from indexer.adapter import tracked_layers
    from indexer.config import BuildConfig
    return ["lm." + l.name for l in tracked_layers(ref.model.lm, BuildConfig(**ref.info["config"]).gradient.modules)]


def first_rank(scores: np.ndarray, truth: set[int]) -> int | None:
    """1-based rank of the best-ranked truth row (ties by row, as the product's pools sort); None
    when no row of the build is a source."""
    order = np.argsort(-scores, kind="stable")
    hits = np.flatnonzero(np.isin(order, list(truth)))
    return int(hits[0]) + 1 if len(hits) else None


def world_questions(world: str, seed: int, out_dir: Path) -> list:
    """The questions `bench.product_path` asked, regenerated (deterministic in the seed; no training)."""
    if world == "trap":
        from bench.trap_world import make_trap_world
        return make_trap_world(seed).questions
    from bench import realistic_world
    if (out_dir / "wordnet").exists():  # the glosses cache lives beside the data dir read, not in cwd
        glosses = realistic_world.wordnet_glosses
        realistic_world.wordnet_glosses = lambda cache=out_dir / "wordnet": glosses(cache)
    return realistic_world.make_realistic_world(seed)[1]


def scored_records(records: list[dict], questions: list, limit: int | None, seed: int = 0) -> list[tuple[dict, object]]:
    """(record, question) of the correctly answered questions, checked by prompt; with `limit`, a
    seeded sample of that many in their order (the records list styles in blocks: the first N would
    be completions only)."""
    pairs = []
    for r, q in zip(records, questions):
        if r["prompt"] != q.prompt:
            raise SystemExit("the records' prompts are not this world's questions: a different world or seed?")
        if r["correct"]:
            pairs.append((r, q))
    if not limit or limit >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def run(world: str, seed: int, out_dir: Path = OUT, limit: int | None = None, memory_gb: float = 2.0,
        train_batch: int = 4, cosine: bool = False, tracked: bool = False) -> dict:
    import captum

    from bench import product_path
    from indexer import memory

    records = json.loads((out_dir / f"quality-{world}-seed{seed}.json").read_text())["records"]
    t = time.perf_counter()
    ref = open_reference(settings_of(out_dir, world, seed))
    pairs = scored_records(records, world_questions(world, seed, out_dir), limit, seed)
    load_s = time.perf_counter() - t
    q_batch = query_batch_size(ref, memory_gb)
    layers = tracked_names(ref) if tracked else None
    print(f"{len(ref.tokens)} rows, {len(ref.ckpts)} checkpoints, "
          f"{sum(p.numel() for p in ref.model.parameters())} parameters, {len(pairs)} questions, "
          f"{q_batch} per captum call, training batch {train_batch}")
    memory.reset_peak()
    rss_before, t = memory.rss(), time.perf_counter()
    scores = tracin_scores(ref, [q.prompt for _, q in pairs], [r["answer"] for r, _ in pairs], q_batch, train_batch,
                           layers=layers)
    score_s, rss_peak = time.perf_counter() - t, memory.peak_rss()
    extra, cosine_s = {}, None
    if cosine:
        t = time.perf_counter()
        extra["tracin-cosine"] = cosine_scores(ref, [q.prompt for _, q in pairs], [r["answer"] for r, _ in pairs], q_batch)
        cosine_s = round(time.perf_counter() - t, 1)
    pos_of = {}
    for i, e in enumerate(ref.ext):
        pos_of.setdefault(e, set()).add(i)
    out = []
    for j, ((r, q), s) in enumerate(zip(pairs, scores)):
        truth = set().union(*(pos_of.get(i, set()) for i in stating_ids(q)))
        full = first_rank(s, truth)
        ranks = {"tracincp": full, **{m: first_rank(v[j], truth) for m, v in extra.items()}}
        ranks = {m: x if x and x <= K else None for m, x in ranks.items()}  # as the product's 100 hits
        top10 = {m: [ref.ext[i] for i in np.argsort(-v, kind="stable")[:10]] for m, v in [("tracincp", s)] +
                 [(m, v[j]) for m, v in extra.items()]}
        out.append({**r, "ranks": {**ranks, **r["ranks"]}, "tracincp_rank": full,
                    "top10": {**top10, **r["top10"]}, "source_ids": stating_ids(q)})
    return {"world": world, "seed": seed, "captum": captum.__version__, "torch": torch.__version__,
            "rows": len(ref.tokens), "parameters": sum(p.numel() for p in ref.model.parameters()),
            "checkpoints": [{"step": c.step, "path": str(c.path), "weights_sha256": c.weights_sha256,
                             "learning_rate": c.learning_rate, "tracin_weight": w}
                            for c, w in zip(ref.ckpts, ref.weights)],
            "layers": layers or "every parameter", "build_factory": ref.info.get("faiss_factory"), "query_batch": q_batch, "train_batch": train_batch,
            "seconds": {"load": round(load_s, 1), "score": round(score_s, 1),
                        "per_question": round(score_s / max(len(pairs), 1), 2), "cosine": cosine_s},
            "rss_gib": {"before": rss_before / 2**30, "peak": rss_peak / 2**30},
            "records": out, "summary": product_path.summary(out)}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    s = report["summary"]
    table = Table(title=f"{report['world']} world, seed {report['seed']}: MRR (first source, 0 beyond {K}) over "
                        f"{s['answered']} correctly answered; captum {report['captum']} TracInCP, full gradients, "
                        f"{len(report['checkpoints'])} checkpoints")
    table.add_column("method")
    for c, n in s["n"].items():
        table.add_column(f"{c} ({n})", justify="right")
    for m, row in sorted(s["mrr"].items(), key=lambda kv: (not kv[0].startswith("tracin"), kv[0])):
        table.add_row(m if m.startswith("tracin") else f"product {m}", *("—" if v is None else f"{v:.3f}" for v in row.values()))
    Console(width=220).print(table)
    print(f"scoring {report['seconds']['score']:.0f} s ({report['seconds']['per_question']} s/question), "
          f"peak RSS {report['rss_gib']['peak']:.2f} GiB (before scoring {report['rss_gib']['before']:.2f} GiB)")


def main():
    ap = argparse.ArgumentParser(description="captum TracInCP (full gradients) on a product build, beside the product's MRRs")
    ap.add_argument("--world", choices=("trap", "realistic"), default="trap")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--limit", type=int, default=None, help="a seeded sample of Q correctly answered questions")
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where bench.quality left its data dir and records (read only)")
    ap.add_argument("--memory-gb", type=float, default=2.0, help="budget for the query batch's full jacobians")
    ap.add_argument("--train-batch", type=int, default=4,
                    help="training rows per forward pass (captum backpropagates each through the batch's graph: 4 was fastest here)")
    ap.add_argument("--cosine", action="store_true",
                    help="also full-gradient TracIn cosines of the tracked layers (the product's exact rerank score)")
    ap.add_argument("--tracked", action="store_true",
                    help="TracInCP on the product's tracked layers only (no embeddings, norms or output head): an ablation")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the bench shares 2 cores: one process, one thread
    report = run(args.world, args.seed, args.out_dir, args.limit, args.memory_gb, args.train_batch, args.cosine, args.tracked)
    print_report(report)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = (f"-limit{args.limit}" if args.limit else "") + ("-tracked" if args.tracked else "")
    (OUT / f"tracin-{args.world}-seed{args.seed}{suffix}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
