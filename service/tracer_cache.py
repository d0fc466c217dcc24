"""Loaded tracers, one build at a time per process (the demo, the API and workers trace many questions).

A tracer's featurizer hooks hold per-call state: every use of a tracer, in the API's threads and
background jobs alike, happens under `model_lock`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from indexer.modelio import CheckpointInfo, check_unchanged

_tracers: dict[str, object] = {}
model_lock = threading.RLock()


def tracer_for(store_path: str, ckpts: list[CheckpointInfo]):
    """The tracer of a store, loaded once; hold `model_lock` while using it."""
    from attribution.tracer import Tracer
    if store_path not in _tracers:
        _tracers.clear()  # one build's models in memory at a time
        _tracers[store_path] = Tracer(Path(store_path), ckpts)
    return _tracers[store_path]


def build_tracer(store_path: str, by_step: dict[int, CheckpointInfo]):
    """The tracer of a build, refused when its checkpoints' weights changed since it was built."""
    from indexer.store import read_info

    info = read_info(Path(store_path))
    check_unchanged(info["checkpoints"])
    return tracer_for(store_path, [by_step[c["step"]] for c in info["checkpoints"]])
