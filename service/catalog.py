"""What wherefrom knows about: corpora and their documents, models and their checkpoints.

One transaction per call; the CLI, the API and the demo call these.
"""

from __future__ import annotations

from pathlib import Path

from db import job_repo, repo
from db.engine import transaction
from db.errors import InputError
from indexer.corpus import MAX_DOC_BYTES, check_size, read_corpus
from indexer.modelio import CheckpointInfo, discover_checkpoints
from service.settings import Settings


def ingest(settings: Settings, path: Path, corpus: str, fmt: str = "auto", id_field: str = "id",
           text_field: str = "text", max_doc_bytes: int = MAX_DOC_BYTES, root: Path | None = None) -> repo.IngestResult:
    """Ingest a corpus file or folder; `root`: what its symlinks may point into (default: `path` itself)."""
    repo.check_corpus_name(corpus)  # before reading: a bad name should not cost a read of the whole corpus
    docs = read_corpus(Path(path), fmt, id_field, text_field, max_doc_bytes, root)
    with transaction(settings.database_url) as s:
        return repo.ingest_documents(s, repo.get_or_create_corpus(s, corpus, str(Path(path).resolve())), docs)


def ingest_records(settings: Settings, corpus: str, docs: list[tuple[str, str, dict]]) -> repo.IngestResult:
    """Ingest documents given in memory (the API's JSON body), with the file path's checks."""
    repo.check_corpus_name(corpus)
    for ext_id, text, _ in docs:
        check_size(text, f"document {ext_id!r}")
    with transaction(settings.database_url) as s:
        return repo.ingest_documents(s, repo.get_or_create_corpus(s, corpus), docs)


def add_model(settings: Settings, path: Path, name: str, base: Path | None = None,
              job_id: int | None = None) -> tuple[int, int, bool]:
    """Register a model folder; returns (model id, checkpoint count, created).

    `base`: for LoRA adapters, the local base model folder when adapter_config.json names another.
    `job_id`: a model job, finished in the transaction that registers the model.
    """
    ckpts = discover_checkpoints(Path(path), Path(base) if base else None)
    for c in {c.tokenizer_hash: c for c in ckpts}.values():
        check_tokenizer_fits(c.path, c.base_path)
    rows = [{"step": c.step, "path": str(c.path), "weights_sha256": c.weights_sha256,
             "tokenizer_hash": c.tokenizer_hash, "learning_rate": c.learning_rate,
             "optimizer_state_path": str(c.optimizer_state_path) if c.optimizer_state_path else None,
             "base_path": str(c.base_path) if c.base_path else None}
            for c in ckpts]
    with transaction(settings.database_url) as s:
        job = job_repo.lock_open_job(s, job_id) if job_id is not None else None  # JobFinished once cancelled
        model, created = repo.add_model(s, name, str(Path(path).resolve()), rows)
        if job is not None:
            job_repo.finish_job(s, job, {"model_id": model.id, "checkpoints": len(rows), "created": created})
        return model.id, len(rows), created


def training_store(path: Path) -> dict | None:
    """The store a `WherefromCallback` recorded into a Trainer output folder: {"path", "saves", "rows",
    "ids"}; None when there is none. Which saves are registered checkpoints is checked when it is indexed."""
    import json

    from indexer.callback import STORE, recorded_ids, written_units
    from indexer.store import read_info
    root = Path(path) / STORE
    if not (root / "info.json").exists():
        return None
    info = read_info(root)
    units = written_units(root)
    if not units:
        raise InputError(f"the training store {root} holds no rows yet: it is written at each save of the run")
    rows = sum(json.loads((u / "unit.json").read_text())["rows"] for u in units)
    return {"path": root, "saves": [s["step"] for s in info["saves"]], "rows": rows, "ids": recorded_ids(root)}


def check_corpus(settings: Settings, corpus: str) -> None:
    """NotFound unless the corpus exists."""
    with transaction(settings.database_url) as s:
        repo.corpus_by_name(s, corpus)


def check_tokenizer_fits(folder: Path, base: Path | None = None) -> None:
    """Refuse a tokenizer that is not the model's: ids past its embedding rows, or another eos.

    `base`: a LoRA adapter's base model folder, which holds the config (and maybe the tokenizer).
    """
    from transformers import AutoConfig

    from indexer.loading import load_tokenizer
    fix = "save the tokenizer the model was trained with into the folder (tokenizer.save_pretrained)"
    tokenizer = load_tokenizer(folder, base)  # InputError with the reason when the files are broken
    try:
        config = AutoConfig.from_pretrained(base or folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"the model or tokenizer in {folder} does not load ({e.__class__.__name__}): {fix}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(config, "vocab_size", None)
    if rows and len(tokenizer) > rows:
        raise InputError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's embeddings have "
                         f"{rows} rows, so it is another model's tokenizer: {fix}")
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if None not in eos and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        raise InputError(f"the tokenizer in {folder} ends text with token {tokenizer.eos_token_id} but the model with "
                         f"{eos[0]}, so it is another model's tokenizer: {fix}")


def checkpoints_by_step(model) -> dict[int, CheckpointInfo]:
    """A `db.models.Model` row's checkpoints, by training step."""
    return {c.step: CheckpointInfo.from_row(c) for c in model.checkpoints}


def model_checkpoints(settings: Settings, model_id: int) -> dict[int, CheckpointInfo]:
    with transaction(settings.database_url) as s:
        return checkpoints_by_step(repo.get_model(s, model_id))


def ping_database(settings: Settings) -> None:
    with transaction(settings.database_url) as s:
        repo.ping(s)


def schema_revision(settings: Settings) -> str:
    """Migrates the database to head on first use, then says where it is."""
    with transaction(settings.database_url) as s:
        return repo.schema_revision(s)
