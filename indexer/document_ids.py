"""Which corpus document each training example is: the id column carried from the dataset to the
callback's forward pre-hook (`indexer.callback`), the examples of a padding-free packed row, and
the document segments of a concatenated block (`group_texts`), named by an id per token."""

from __future__ import annotations

import numpy as np
import torch

from db.errors import InputError

ID_COLUMN = "wherefrom_id"


class IdCollator:
    """Takes the id column out of each example before the user's collator and puts the ids back
    on the batch as a list; the callback's pre-hook removes them before the model sees them."""

    def __init__(self, base, column: str):
        self.base, self.column = base, column

    def __call__(self, features):
        ids = [_example_ids(f, self.column) for f in features]
        if len({isinstance(i, list) for i in ids}) > 1:
            raise InputError(f"a batch mixes examples with one {self.column!r} and with one per token: "
                             "give every example the same kind (indexer.document_ids.per_token_ids)")
        batch = self.base([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = ids
        return batch


def _example_ids(example: dict, column: str) -> str | list[str]:
    """An example's document id, or its list of ids, one per token (a concatenated block)."""
    value = example[column]
    if not isinstance(value, (list, tuple)):
        return str(value)
    tokens = example.get("input_ids")
    if tokens is None or len(value) != len(tokens):
        raise InputError(f"an example's {column!r} holds {len(value)} ids for {len(tokens or [])} tokens: give "
                         "one id per example, or one per token (indexer.document_ids.per_token_ids, before group_texts)")
    return [str(v) for v in value]


class RowIds(torch.utils.data.Dataset):
    """A map-style dataset whose examples carry their row's document id as the id column."""

    def __init__(self, dataset, column: str, ids: list[str]):
        self.dataset, self.column, self.ids = dataset, column, ids

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], self.column: self.ids[i]}


def with_ids(dataset, column: str, row_ids: list[str] | None = None):
    """`dataset` with its id column: its own, else `row_ids[i]` (default: the row index i) for row i."""
    ids = [str(x) for x in row_ids] if row_ids is not None else [str(i) for i in range(len(dataset))]
    if len(ids) != len(dataset):
        raise InputError(f"row_ids names {len(ids)} documents but the dataset has {len(dataset)} rows: "
                         "give one document id per training example")
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return dataset if column in names else dataset.add_column(column, ids)
    first = dataset[0] if len(dataset) else {}
    return dataset if column in first else RowIds(dataset, column, ids)


def packed_runs(position_ids, mask, shape: tuple[int, int], examples: int) -> tuple[list[int], torch.Tensor]:
    """Padding-free packing (`transformers.DataCollatorWithFlattening`): examples back to back in a
    row, each restarting its position ids. Returns the lengths of the runs of the B·T positions that
    are one example each, in order, and the run of every position.

    Only with position ids and no attention mask: that is when transformers' masks keep each
    example's attention to itself (`masking_utils.find_packed_sequence_indices`), so that the
    batch's sums split by position are each example's own gradient. Packing whose examples attend
    to each other (`group_texts`) has no such split: one backward pass gives their joint gradient."""
    rows = shape[0]
    if position_ids is None or mask is not None:
        raise InputError(f"a batch of {rows} row(s) carries {examples} document ids: pack examples without "
                         "padding (transformers.DataCollatorWithFlattening: position ids and no attention mask, so "
                         "each attends only to itself), or give each row one document")
    pos = position_ids.expand(shape)
    start = torch.ones(shape, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    run_of = start.flatten().cumsum(0) - 1
    if int(run_of[-1]) + 1 != examples:
        raise InputError(f"a packed batch holds {int(run_of[-1]) + 1} examples by its position ids but {examples} "
                         "document ids: the collator must keep one id per example it packs")
    return torch.bincount(run_of, minlength=examples).tolist(), run_of


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose loss term counts, position t's predicting token t + 1 (the
    causal LM's shift), so the last position never does. Summed over a run: its loss tokens."""
    return torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))


def per_token_ids(dataset, column: str = ID_COLUMN, row_ids: list[str] | None = None, tokens: str = "input_ids"):
    """`dataset` (a tokenized `datasets.Dataset`, one document a row) with its id column repeated
    over each row's tokens, so that concatenating and cutting the rows into blocks (HF run_clm's
    `group_texts`, which concatenates every column) carries each token's document along. The ids
    are the row's own `column`, else `row_ids[i]`, else the row index, as `with_ids` names them."""
    if not hasattr(dataset, "map"):
        raise InputError("per_token_ids takes a datasets.Dataset (it maps the id column over the tokens): "
                         "build one with datasets.Dataset.from_dict, or give each example one id")
    data = with_ids(dataset, column, row_ids)
    return data.map(lambda b: {column: [[i] * len(t) for i, t in zip(b[column], b[tokens])]}, batched=True)


def segment_runs(token_ids: list[list[str]], mask, shape: tuple[int, int],
                 device=None) -> tuple[list[int], torch.Tensor, list[str]]:
    """Concatenated blocks (`group_texts`): the runs of the B·T positions whose loss term predicts
    one document's token, row by row, with the run of every position and each run's document.

    Position t's loss term predicts token t + 1, so t is given the document of t + 1: a segment's
    run is its tokens shifted back by one, and a segment that is only a block's first token (never
    predicted) has no run, as `--chunking packed` has no row for it. Padding joins the run beside
    it (the attention mask zeroes it in the sums). The split is by position: a document's run holds
    the gradient at its positions, including what later documents' losses send back to them
    through attention, and misses what its own loss sends to earlier ones (docs/training.md)."""
    rows, width = shape
    real = mask.bool().cpu().numpy() if mask is not None else np.ones(shape, dtype=bool)
    codes: dict[str, int] = {}
    owner = np.full(shape, -1, dtype=np.int64)
    for b, row in enumerate(token_ids):
        at = np.flatnonzero(real[b])
        if len(at) != len(row):
            raise InputError(f"a block has {len(row)} token ids for {len(at)} tokens: the id column must be "
                             "cut into blocks with the tokens (indexer.document_ids.per_token_ids, before group_texts)")
        owner[b, at] = [codes.setdefault(i, len(codes)) for i in row]
    # padding takes the id before it (after it, for left padding), then every position its label's
    filled = np.where(owner >= 0, np.arange(width), 0)
    owner = np.take_along_axis(owner, np.maximum.accumulate(filled, axis=1), 1)
    first = np.argmax(owner >= 0, axis=1)
    owner = np.where(owner >= 0, owner, owner[np.arange(rows), first][:, None])
    owner[:, :-1] = owner[:, 1:].copy()
    start = np.ones(shape, dtype=bool)
    start[:, 1:] = owner[:, 1:] != owner[:, :-1]
    starts = np.flatnonzero(start)
    runs = np.diff(np.append(starts, rows * width)).tolist()
    names = list(codes)
    run_of = torch.as_tensor(np.cumsum(start.ravel()) - 1, device=device)
    return runs, run_of, [names[c] for c in owner.ravel()[starts]]
