"""Index while training: a `transformers.TrainerCallback` that records the gradient store as the model learns.

The Trainer already runs every example's forward and backward pass; the `Featurizer`'s hooks ride
on them and keep, per example, the same LoGra projection Σ_t (P_out δ_t)(P_in x_t)ᵀ the offline
build computes (same seed and matrices, padding masked, Adam's √v folded in from the live
optimizer at that step). The Trainer's loss is Σ tokens / N over a batch (N: its tokens, × the
accumulation steps, or the Trainer's `num_items_in_batch`), so each example's δ is rescaled by
N / n_b to the gradient of its own mean-token loss, as offline.

On disk, under `<output_dir>/wherefrom/` (see `STORE`): one row per (document, exposure), in
units of the steps between two saves, `rank-RRRRR/unit-SSSSSSSS/` (raw.f32 (n × D), the ids and
weight-version steps of its rows, per-step K-FAC sums). A unit is written when its save is, so a
run resumed from checkpoint-S keeps exactly the units up to S and recomputes the rest. Publishing
(`wherefrom index --from-training`) turns the units into one build shard: one row per document,
one block per saved checkpoint, block c = Σ lr_t g_t over the exposures whose weights are nearest
checkpoint c — TracIn's sum over steps with the query gradient taken at that checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from db.errors import InputError
from indexer.config import GradientConfig
from indexer.curvature import LayerStats, Stats
from indexer.document_ids import (ID_COLUMN, IdCollator, loss_positions, packed_runs, per_token_ids,
                                  segment_runs, with_ids)
from indexer.gradients import Factored, Featurizer, factored
from indexer.modelio import bias_correction, tokenizer_hash, weights_digest
from indexer.store import BLOCK, INFO, read_info, save_npz, write_info

__all__ = ["WherefromCallback", "per_token_ids"]

STORE = "wherefrom"  # the callback's store, inside the Trainer's output_dir
OPEN = "open"  # the unit being recorded: discarded by a resumed run
BLOCKS_WARNING = ("concatenated blocks are recorded split by position, an approximation of each document "
                  "segment's own gradient (median cosine 0.71 on bench/callback_blocks.py's trained model): "
                  "for exact rows index the corpus offline with --chunking packed (docs/training.md)")


class WherefromCallback(TrainerCallback):
    """Records the gradient store while a `transformers.Trainer` trains; add it with `attach(trainer)`."""

    def __init__(self, config: GradientConfig | None = None, id_column: str = ID_COLUMN,
                 store_dir: Path | str | None = None, row_ids: list[str] | None = None, refold_every: int = 10):
        """`id_column`: the dataset column naming each example's corpus document (ingested under that
        id); a dataset without it uses `row_ids[i]` for row i, by default the row index itself.
        `refold_every`: steps between refolds of Adam's live √v into the projections, and always on
        the step after a save (the weights and moments a checkpoint holds). Adam's β2 = 0.999
        averages v over ~1000 steps, so 10 steps move it by about 1 %; refolding costs ~4 % of a
        step of a 1M-parameter model."""
        if refold_every < 1:
            raise InputError(f"refold_every is a number of steps, 1 or more, not {refold_every}")
        self.config, self.id_column, self.row_ids = config or GradientConfig(), id_column, row_ids
        self.refold_every = refold_every
        self.store_dir = Path(store_dir) if store_dir else None
        self.feat: Featurizer | None = None
        self._handles = []

    def attach(self, trainer) -> WherefromCallback:
        """Add the callback to `trainer` and carry the id column from the dataset to the model.

        `remove_unused_columns` keeps only columns the model's forward names: the id column is
        added to the Trainer's kept columns (`_signature_columns`), and the collator is wrapped so
        that the user's collator never sees it.
        """
        trainer.train_dataset = with_ids(trainer.train_dataset, self.id_column, self.row_ids)
        trainer._set_signature_columns_if_needed()
        if self.id_column not in trainer._signature_columns:
            trainer._signature_columns.append(self.id_column)
        trainer.data_collator = IdCollator(trainer.data_collator, self.id_column)
        trainer.add_callback(self)
        return self

    # --- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.root = self.store_dir or Path(args.output_dir) / STORE
        self.rank_dir = self.root / f"rank-{args.process_index:05d}"  # DDP: one unit set per rank
        self.accumulation = args.gradient_accumulation_steps
        # with tokens averaged across ranks the Trainer multiplies each rank's loss by the world size
        self.world = args.world_size if args.average_tokens_across_devices else 1
        self.is_zero = state.is_world_process_zero
        self._restart(state.global_step)
        self.feat = Featurizer(model, self.config)
        self.feat.sums = self._zero_sums()
        self._names = [layer.name for layer in self.feat.layers]
        self._rows, self._step_stats, self.lrs, self._refold = [], [], {}, True
        self._keep, self._warned = None, False  # a batch of blocks' runs with a loss token; BLOCKS_WARNING given
        # the layers' hooks stay for the run (16 registrations and removals a step cost 0.3 % of
        # it) and record the batches `_pre_forward` marks
        self.feat.recording = False
        self._handles = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True), *self.feat.register()]
        self._raw = open(self.rank_dir / OPEN / "raw.f32", "wb")

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.step = state.global_step  # the weights' version: what the model had learned so far
        if self._refold or self.step % self.refold_every == 0:
            self.feat.fold(live_second_moments(optimizer, self.feat))
            self._refold = not self.feat.normalised  # until the optimizer has moments

    def on_substep_end(self, args, state, control, **kwargs):
        self._collect()

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        self._collect()
        self.lrs[self.step] = float(lr_scheduler.get_last_lr()[0])  # the rate this step's update uses
        # one flat float64 row per step (16 KB at 16 layers of 8×8), summed on the device by the
        # Featurizer: a list of Stats objects, ~100 small arrays per step, fragmented the heap to
        # +80 MB of RSS over a 410-step unit, and per-hook float64 copies cost a host sync each
        self._step_stats.append((self.step, self.feat.sums.cpu().numpy()))
        self.feat.sums = self._zero_sums()

    def on_save(self, args, state, control, **kwargs):
        self._close_unit(state.global_step)
        if self.is_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            info = read_info(self.root)
            info["saves"].append({"step": state.global_step, "path": str(ckpt.resolve()),
                                  "weights_sha256": weights_digest(ckpt), "tokenizer_hash": _tokenizer(ckpt)})
            info["learning_rates"].update({str(k): v for k, v in self.lrs.items()})
            _write_info(self.root, info)
        self.lrs, self._refold = {}, True
        self._raw = open(self.rank_dir / OPEN / "raw.f32", "wb")

    def on_train_end(self, args, state, control, **kwargs):
        if self._rows:  # the steps after the last save: their rows go to the last checkpoint
            self._close_unit(state.global_step)
            if self.is_zero:
                info = read_info(self.root)
                info["learning_rates"].update({str(k): v for k, v in self.lrs.items()})
                _write_info(self.root, info)
        self._raw.close()
        shutil.rmtree(self.rank_dir / OPEN, ignore_errors=True)
        for h in self._handles:
            h.remove()

    # --- recording ---------------------------------------------------------------------------

    def _pre_forward(self, module, args, kwargs):
        ids = kwargs.pop(self.id_column, None)
        if not (module.training and torch.is_grad_enabled()):
            return args, kwargs  # evaluation: nothing recorded
        labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
        if ids is None or labels is None:
            raise InputError(f"a training batch has no {'labels' if ids is not None else repr(self.id_column)}: "
                             "add the callback with WherefromCallback(...).attach(trainer), and train a causal LM "
                             "whose collator gives labels")
        loss_at = loss_positions(labels)  # (B, T)
        self._keep, per_token = None, bool(ids) and isinstance(ids[0], list)
        if per_token:  # concatenated blocks (group_texts): an id per token, a row per document segment
            self.feat._runs, run_of, ids = segment_runs(ids, mask, labels.shape, labels.device)
            if not self._warned:
                self._warned = True
                warnings.warn(BLOCKS_WARNING, stacklevel=2)
        elif len(ids) == labels.shape[0]:
            self.feat._runs, counts = None, loss_at.sum(1)  # (B,) tokens of each example's loss
        else:  # padding-free packing: several examples to a row, cut where the position ids restart
            self.feat._runs, run_of = packed_runs(kwargs.get("position_ids"), mask, labels.shape, len(ids))
        if self.feat._runs is not None:  # each position's example, and each example's loss tokens
            counts = torch.zeros(len(ids), dtype=torch.long, device=labels.device).index_add_(
                0, run_of, loss_at.flatten().long())
            if per_token and not bool((counts > 0).all()):  # a segment none of whose tokens is in the loss
                self._keep = (counts > 0).cpu().numpy()
                ids = [i for i, k in zip(ids, self._keep) if k]
        items = kwargs.get("num_items_in_batch")
        total = counts.sum() * self.accumulation if items is None else torch.as_tensor(items) / self.world
        self.feat._mask = (mask if mask is not None else torch.ones_like(labels)).to(torch.float32)
        scale = total.to(torch.float32) / counts.clamp_min(1).to(torch.float32)
        self.feat._scale = scale if self.feat._runs is None else scale[run_of].view(labels.shape)
        self._ids = ids
        self.feat.recording = True
        return args, kwargs

    def _collect(self) -> None:
        self.feat.recording = False
        rows = self.feat.collect().detach().to("cpu", torch.float32).numpy()  # (B, D)
        if self._keep is not None:
            rows = rows[self._keep]
        self._raw.write(np.ascontiguousarray(rows).data)  # the array's buffer: no bytes copy
        self._rows += [(i, self.step) for i in self._ids]

    def _close_unit(self, end: int) -> None:
        """Move the open unit to `unit-{end}`: its rows, their ids and steps, per-step K-FAC sums."""
        self._raw.close()
        folder = self.rank_dir / OPEN
        np.save(folder / "ids.npy", np.array([i for i, _ in self._rows], dtype=str))
        np.save(folder / "steps.npy", np.array([s for _, s in self._rows], dtype=np.int64))
        save_npz(folder / "stats.npz", stacked_stats(self._step_stats, self._names, self.feat.shapes()))
        meta = {"rows": len(self._rows), "dim": self.feat.dim, "end": end,
                "layers": [layer.name for layer in self.feat.layers],
                "adam_normalised_layers": len(self.feat.normalised)}
        (folder / "unit.json").write_text(json.dumps(meta))
        folder.rename(self.rank_dir / f"unit-{end:08d}")
        (self.rank_dir / OPEN).mkdir()
        self._rows, self._step_stats = [], []

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(self.feat.sums_width(), dtype=torch.float64, device=self.feat.device)

    def _restart(self, resumed_at: int) -> None:
        """Keep the units up to the step training (re)starts from; drop the rest and any open unit."""
        config = asdict(self.config)
        if self.root.exists() and resumed_at and (self.root / INFO).exists():
            if read_info(self.root)["config"] != config:
                raise InputError(f"{self.root} was recorded with another gradient config: resume with the same "
                                 "WherefromCallback config, or record into a fresh store_dir")
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        for unit in self.rank_dir.iterdir():
            if unit.name == OPEN or int(unit.name.split("-")[1]) > resumed_at:
                shutil.rmtree(unit)
        (self.rank_dir / OPEN).mkdir()
        if self.is_zero:
            old = read_info(self.root) if resumed_at and (self.root / INFO).exists() else {}
            _write_info(self.root, {
                "kind": "training", "config": config, "id_column": self.id_column, "projection_seed": self.config.seed,
                "saves": [s for s in old.get("saves", []) if s["step"] <= resumed_at],
                "learning_rates": {k: v for k, v in old.get("learning_rates", {}).items() if int(k) < resumed_at},
                "world_size": int(os.environ.get("WORLD_SIZE", 1))})


def live_second_moments(optimizer, feat: Featurizer) -> dict[str, Factored]:
    """Adam's bias-corrected second moment of each tracked weight, as the means the fold reads
    (`Factored`), from the optimizer object itself (none before step 1), as the offline build reads
    a checkpoint's (`bias_corrected`): the correction divides the means, not a copy of v."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    state = getattr(inner, "state", {})
    group_of = {id(p): group for group in getattr(inner, "param_groups", []) for p in group["params"]}
    out = {}
    for layer in feat.layers:
        weight = layer.module.weight
        entry = state.get(weight, {})
        if entry.get("exp_avg_sq") is not None:
            divisor = bias_correction(entry, group_of.get(id(weight), {}))
            out[layer.name + ".weight"] = factored(entry["exp_avg_sq"], layer.transposed, divisor)
    return out


def stacked_stats(per_step: list[tuple[int, np.ndarray]], names: list[str],
                  shapes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per-step K-FAC sums as stacked arrays (steps, k, k) per layer: publishing sums them per checkpoint.

    `per_step`: (step, flat row) with each layer's a_sum, s_sum and token count in turn."""
    width = sum(a * a + b * b + 1 for a, b in shapes)
    flat = np.stack([row for _, row in per_step]) if per_step else np.zeros((0, width))
    arrays = {"steps": np.array([s for s, _ in per_step], dtype=np.int64), "names": np.array(names, dtype=str)}
    col = 0
    for i, (k_out, k_in) in enumerate(shapes):
        arrays[f"{i}.a"] = flat[:, col:col + k_in * k_in].reshape(-1, k_in, k_in)
        col += k_in * k_in
        arrays[f"{i}.s"] = flat[:, col:col + k_out * k_out].reshape(-1, k_out, k_out)
        col += k_out * k_out
        arrays[f"{i}.t"] = flat[:, col]
        col += 1
    return arrays


def _tokenizer(ckpt: Path) -> str | None:
    try:
        return tokenizer_hash(ckpt)
    except InputError:  # the Trainer saves the tokenizer only when it was given one
        return None


def _write_info(root: Path, info: dict) -> None:
    """info.json replaced in one rename: a run killed mid-write leaves the previous one."""
    tmp = root / ".info.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    write_info(tmp, info)
    (tmp / INFO).replace(root / INFO)
    tmp.rmdir()


# --- publishing: units → one build shard ---------------------------------------------------------

def written_units(root: Path) -> list[Path]:
    """Every unit of every rank, by rank then end step."""
    return sorted(Path(root).glob("rank-*/unit-*"))


def recorded_ids(root: Path) -> set[str]:
    """The document id of every recorded row."""
    return {str(i) for unit in written_units(root) for i in np.load(unit / "ids.npy")}


def nearest(steps, ckpt_steps: list[int]) -> np.ndarray:
    """Index of the checkpoint nearest each weight-version step; a tie goes to the later one."""
    d = np.abs(np.asarray(steps, dtype=np.int64)[:, None] - np.asarray(ckpt_steps)[None, :])
    return d.shape[1] - 1 - np.argmin(d[:, ::-1], axis=1)


def _unit_stats(unit: Path, ckpt_steps: list[int], stats: list[Stats]) -> None:
    """Add each step's K-FAC sums of `unit` to the stats of its nearest checkpoint."""
    with np.load(unit / "stats.npz") as z:
        arrays = {key: z[key] for key in z.files}  # an npz re-reads its member on every access
    names, target = [str(n) for n in arrays["names"]], nearest(arrays["steps"], ckpt_steps)
    for c in np.unique(target):
        pick = target == c
        stats[c].add(Stats({n: LayerStats(arrays[f"{i}.a"][pick].sum(0), arrays[f"{i}.s"][pick].sum(0),
                                          float(arrays[f"{i}.t"][pick].sum())) for i, n in enumerate(names)}))


def _add_rows(out: np.ndarray, rows: np.ndarray, block: np.ndarray) -> None:
    """out[rows] += block with repeated rows summed (a document seen in several epochs): sorted
    and reduced, as np.add.at took half of publishing's time on the demo world."""
    if not len(rows):
        return
    order = np.argsort(rows, kind="stable")
    unique, starts = np.unique(rows[order], return_index=True)
    out[unique] += np.add.reduceat(block[order], starts, axis=0)


def write_training_shard(root: Path, folder: Path, row_of: dict[str, int], ckpt_steps: list[int]) -> dict:
    """A build shard from the recorded units: `raw-c{c}.npy` (rows × D) holds Σ lr_t g_t of each
    document's exposures whose weights are nearest checkpoint c, `stats-c{c}.npz` those steps' K-FAC
    sums. Returns the shard's gradient meta and each block's learning-rate mass (Σ lr_t of its steps)."""
    lrs = {int(k): v for k, v in read_info(root)["learning_rates"].items()}
    units = written_units(root)
    metas = [json.loads((u / "unit.json").read_text()) for u in units]
    dim = metas[0]["dim"]
    raws = [np.lib.format.open_memmap(folder / f"raw-c{c}.npy", mode="w+", dtype=np.float32,
                                      shape=(len(set(row_of.values())), dim)) for c in range(len(ckpt_steps))]
    stats = [Stats() for _ in ckpt_steps]
    for unit, meta in zip(units, metas):
        ids, steps = np.load(unit / "ids.npy"), np.load(unit / "steps.npy")
        rows, target = np.array([row_of[str(i)] for i in ids], dtype=np.int64), nearest(steps, ckpt_steps)
        weight = np.array([lrs[int(s)] for s in steps], dtype=np.float32)
        raw = np.memmap(unit / "raw.f32", dtype=np.float32, mode="r", shape=(meta["rows"], dim))
        for start in range(0, meta["rows"], BLOCK):
            part = slice(start, start + BLOCK)
            block = np.array(raw[part]) * weight[part, None]
            for c, out in enumerate(raws):
                _add_rows(out, rows[part][target[part] == c], block[target[part] == c])
        _unit_stats(unit, ckpt_steps, stats)
    for out, st, c in zip(raws, stats, range(len(raws))):
        out.flush()
        st.save(folder / f"stats-c{c}.npz")
    mass = [0.0] * len(ckpt_steps)
    for step, c in zip(lrs, nearest(list(lrs), ckpt_steps)):
        mass[c] += lrs[step]
    n = len(ckpt_steps)
    return {"dims": [dim] * n, "adam_normalised_layers": [metas[-1]["adam_normalised_layers"]] * n,
            "layers": [metas[-1]["layers"]] * n, "learning_rate_mass": mass,
            "exposures": sum(m["rows"] for m in metas)}
