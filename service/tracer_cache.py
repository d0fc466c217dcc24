"""Loaded tracers, one build at a time per process (the demo, the API and workers trace many questions).

A tracer's featurizer hooks hold per-call state: every use of a tracer, in the API's threads and
background jobs alike, happens under `model_lock`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from db.errors import Conflict, WherefromError
from indexer.modelio import CheckpointInfo, check_tokenizer_unchanged, check_unchanged

_tracers: dict[tuple[str, str], object] = {}
model_lock = threading.RLock()


def tracer_for(store_path: str, ckpts: list[CheckpointInfo]):
    """The tracer of a store under this process's runtime, loaded once; hold `model_lock` while using it.

    Keyed on the runtime too (`trace --device`/`--dtype`, WHEREFROM_DEVICE, …): the models a tracer
    loads are on its device in its dtype, so one loaded for another runtime is not this one's.
    """
    from attribution.tracer import Tracer
    from indexer.config import Runtime
    runtime = Runtime.from_env()
    key = (store_path, repr(runtime))
    if key not in _tracers:
        _tracers.clear()  # one build's models in memory at a time
        _tracers[key] = Tracer(Path(store_path), ckpts, runtime)
    return _tracers[key]


@contextmanager
def _readable(folder: Path):
    """A store file that is missing, truncated or garbage becomes one line saying what to do."""
    from indexer.store import UNREADABLE, describe

    try:
        yield
    except WherefromError:
        raise
    except UNREADABLE as e:
        raise Conflict(f"the store at {folder} cannot be read ({describe(e)}): run `wherefrom doctor` to see "
                       "what is wrong, then rebuild with `wherefrom index`") from None


def build_tracer(store_path: str, by_step: dict[int, CheckpointInfo]):
    """The tracer of a build, refused when its checkpoints' weights or tokenizer changed since it was
    built, or when its store cannot be read."""
    from indexer.store import missing, read_info

    folder = Path(store_path)
    with _readable(folder):
        lacking = missing(folder)
        if lacking:  # named here: FAISS's own message buries the file name after 150 characters
            raise FileNotFoundError(f"no {', '.join(lacking)}")
        info = read_info(folder)
        ckpts = [by_step[c["step"]] for c in info["checkpoints"]]
    check_unchanged(info["checkpoints"])
    check_tokenizer_unchanged(ckpts)
    with _readable(folder):
        return tracer_for(store_path, ckpts)
