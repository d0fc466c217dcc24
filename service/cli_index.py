"""`wherefrom index` and `wherefrom delete`: build, extend and prune a corpus's stores.

The index options are config fields (`indexer.config`), so their help and defaults come from there.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from indexer.config import BuildConfig, GradientConfig, Runtime, config_help  # torch-free: --help stays instant
from service.cli_common import DataDir
from service.cli_common import settings as _settings


# `wherefrom index`'s build options are config fields: parameter -> (config class, field). Help and
# default come from the field, so the two cannot drift (tests/service/test_cli.py checks every field).
INDEX_OPTIONS = {"proj": (GradientConfig, "k_in"), "seed": (GradientConfig, "seed"),
                 "modules": (GradientConfig, "modules"), "no_adam": (GradientConfig, "optimizer_norm"),
                 "batch_size": (BuildConfig, "batch_size"), "shard_size": (BuildConfig, "shard_size"),
                 "chunking": (BuildConfig, "chunking"), "stride": (BuildConfig, "stride"),
                 "faiss_factory": (BuildConfig, "factory"), "nprobe": (BuildConfig, "nprobe")}
NEGATED = {"no_adam"}  # a flag that turns its boolean field off


def _config_option(param: str, *flags: str, help_prefix: str = ""):
    cls, name = INDEX_OPTIONS[param]
    f = next(f for f in fields(cls) if f.name == name)
    text = help_prefix + f.metadata["help"]
    return typer.Option(not f.default if param in NEGATED else f.default, *flags,
                        help=text[:1].upper() + text[1:] + ".")


def build_config(**values) -> BuildConfig:
    """The BuildConfig of `wherefrom index`'s options (`--proj` sets both projection sides)."""
    by_class = {GradientConfig: {}, BuildConfig: {}}
    for param, value in values.items():
        cls, name = INDEX_OPTIONS[param]
        by_class[cls][name] = not value if param in NEGATED else value
    by_class[GradientConfig]["k_out"] = by_class[GradientConfig]["k_in"]
    return BuildConfig(gradient=GradientConfig(**by_class[GradientConfig]), **by_class[BuildConfig])


def _runtime_option(name: str, *flags: str):  # None: WHEREFROM_<NAME> or the field's default decides
    text = config_help(Runtime, name)
    return typer.Option(False if name == "checkpointing" else None, *flags, help=text[:1].upper() + text[1:] + ".")


Device, Dtype = _runtime_option("device", "--device"), _runtime_option("dtype", "--dtype")  # index, trace


def runtime_of(**values) -> Runtime:
    """The environment's runtime (WHEREFROM_DEVICE, …) under the options given."""
    return Runtime.from_env(**{k: v for k, v in values.items() if v not in (None, False)})


def index(corpus: str = typer.Option(..., "--corpus", "-c"), model: str = typer.Option(..., "--model", "-m"),
          checkpoints: str = typer.Option("all", help="all | last | comma-separated steps"),
          proj: int = _config_option("proj", help_prefix="per side (features k×k per layer): "),
          seed: int = _config_option("seed"),
          batch_size: int = _config_option("batch_size"),
          modules: Optional[str] = _config_option("modules"),
          no_adam: bool = _config_option("no_adam", "--no-adam", help_prefix="turn off: "),
          shard_size: int = _config_option("shard_size"),
          chunking: str = _config_option("chunking"),
          stride: Optional[int] = _config_option("stride"),
          faiss_factory: Optional[str] = _config_option("faiss_factory"),
          nprobe: int = _config_option("nprobe"),
          update: bool = typer.Option(False, "--update", help="Add the documents ingested since the latest "
                                      "build to it (its own config; the options above are ignored)."),
          refit: bool = typer.Option(False, "--refit-curvature", help="With --update: refit EK-FAC over all "
                                     "rows, which rewrites every row's features (default: keep the curvature)."),
          from_training: bool = typer.Option(False, "--from-training", help="Publish the store the training "
                                             "callback recorded (its own gradient config; of the options above "
                                             "only --faiss-factory and --nprobe apply): no pass over the corpus."),
          device: Optional[str] = Device, dtype: Optional[str] = Dtype,
          max_tokens_per_batch: Optional[int] = _runtime_option("max_tokens_per_batch", "--max-tokens-per-batch"),
          checkpointing: bool = _runtime_option("checkpointing", "--checkpointing"),
          plan: bool = typer.Option(False, "--plan", help="Probe one batch, print predicted memory, time and "
                                    "store size, and stop (every build here runs the same check first)."),
          data_dir: Optional[Path] = DataDir):
    """Build gradient, dense and BM25 indexes of a corpus for a model: queued for the workers when
    WHEREFROM_BROKER_URL is set, else built right here. With --update, extend the latest build here."""
    if refit and not update:
        from db.errors import InputError
        raise InputError("--refit-curvature goes with --update")
    from indexer.config import applied
    runtime = runtime_of(device=device, dtype=dtype, max_tokens_per_batch=max_tokens_per_batch,
                         checkpointing=checkpointing)
    if update:
        if from_training:
            from db.errors import InputError
            raise InputError("--from-training publishes a new build: leave --update out")
        with applied(runtime):  # the new rows' shards run where and how the options say
            _update(_settings(data_dir), corpus, model, refit)
        return
    if from_training:
        if plan:
            from db.errors import InputError
            raise InputError("--plan predicts a gradient pass over the corpus, which --from-training skips: "
                             "leave --plan out")
        _from_training(_settings(data_dir), corpus, model, faiss_factory, nprobe)
        return
    from service import builds, jobs
    from service.render import progress_bars
    config = build_config(proj=proj, seed=seed, batch_size=batch_size, modules=modules, no_adam=no_adam,
                          shard_size=shard_size, chunking=chunking, stride=stride, faiss_factory=faiss_factory,
                          nprobe=nprobe)
    settings = _settings(data_dir)
    spec = builds.index_job(settings, corpus, model, config, checkpoints)
    if settings.broker_url and not plan:  # the workers' own devices and memory decide (`worker --device`)
        typer.echo(f"job {jobs.submit(settings, spec)} queued on {settings.queue}: follow it with `wherefrom jobs`")
        return
    with applied(runtime):
        prediction = builds.plan_build(settings, spec, config, runtime)
        if plan:
            typer.echo(prediction.describe())
            return
        with progress_bars() as progress:
            out = builds.outcome(settings, jobs.submit(settings, spec, progress, inline=True))
    typer.echo(f"build {out.build_id} (job {out.job_id}): {out.rows} rows, {len(out.info['checkpoints'])} "
               f"checkpoint(s), {sum(out.info['gradient']['dims'])} gradient dims, "
               f"{out.skipped_empty} empty document(s) skipped")


def _from_training(settings, corpus: str, model: str, factory: Optional[str], nprobe: int) -> None:
    from service.render import progress_bars
    from service.training_builds import index_from_training
    with progress_bars() as progress:
        out = index_from_training(settings, corpus, model, BuildConfig(factory=factory, nprobe=nprobe), progress)
    typer.echo(f"build {out.build_id} (from training): {out.rows} rows, {len(out.info['checkpoints'])} checkpoint(s), "
               f"{sum(out.info['gradient']['dims'])} gradient dims, no gradient pass over the corpus")


def _update(settings, corpus: str, model: str, refit: bool) -> None:
    from service.render import progress_bars
    from service.update import update
    with progress_bars() as progress:
        out = update(settings, corpus, model, refit, progress)
    if not out.added_rows:
        typer.echo(f"build {out.build_id} is up to date: no new document with tokens in corpus {corpus}")
        return
    note = {"refitted": "curvature refitted, every row rewritten", "kept": "curvature kept",
            "none": "no curvature"}[out.curvature]
    typer.echo(f"build {out.build_id}: {out.added_documents} document(s) added as {out.added_rows} rows, "
               f"{out.rows} rows in all ({note})")


def delete(ids: list[str] = typer.Argument(..., help="Document ids, as in the ingested file."),
           corpus: str = typer.Option(..., "--corpus", "-c", help="The corpus they belong to."),
           data_dir: Optional[Path] = DataDir):
    """Delete documents: tombstone them and remove their rows from every build of the corpus."""
    from service.update import delete as delete_documents
    out = delete_documents(_settings(data_dir), corpus, ids)
    builds = ", ".join(map(str, out.builds)) or "none needed changes"
    typer.echo(f"corpus {corpus}: {out.deleted} deleted, {out.already} already deleted; builds updated: {builds}")
