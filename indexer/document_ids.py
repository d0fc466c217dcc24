"""Which corpus document each training example is: the id column carried from the dataset to the
callback's forward pre-hook (`indexer.callback`), and the examples of a padding-free packed row."""

from __future__ import annotations

import torch

from db.errors import InputError

ID_COLUMN = "wherefrom_id"


class IdCollator:
    """Takes the id column out of each example before the user's collator and puts the ids back
    on the batch as a list; the callback's pre-hook removes them before the model sees them."""

    def __init__(self, base, column: str):
        self.base, self.column = base, column

    def __call__(self, features):
        ids = []
        for f in features:
            value = f[self.column]
            if isinstance(value, (list, tuple)):
                raise InputError(f"an example's {self.column!r} holds {len(value)} ids (a packed example): "
                                 "give each example one document (transformers.DataCollatorWithFlattening packs "
                                 "such examples), or index the corpus offline with --chunking packed")
            ids.append(str(value))
        batch = self.base([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = ids
        return batch


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
