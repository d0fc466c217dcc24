"""`wherefrom index --plan` and the check before every build; `wherefrom worker --device`.

The planner's predicted peak is compared with the peak the real build records (both read the
kernel's VmHWM in a fresh `wherefrom` process); a build that will not fit is refused in one line
before anything is written.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from indexer.config import Runtime
from service import catalog, tracer_cache
from service.settings import Settings
from service.worker import use_device
from tests.service.test_hostile_input import state


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained, tiny_world):
    """A private data dir: the tiny world ingested as `w`, a private model copy `m`, no build yet."""
    root = tmp_path_factory.mktemp("planner")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    catalog.ingest(settings, tiny_world.write(root / "world")[0], "w")
    catalog.add_model(settings, shutil.copytree(trained[0], root / "model"), "m")
    return SimpleNamespace(settings=settings)


def wherefrom(world, *args, **env):
    """`wherefrom ARGS` in a fresh process (its peak memory is its own)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WHEREFROM_")}
    environ.update(WHEREFROM_DATA_DIR=str(world.settings.data_dir), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], env=environ,
                          capture_output=True, text=True, timeout=600)


def written(settings) -> dict:
    """`state` but SQLite's shared-memory index, which another process's mere reading rewrites."""
    out = state(settings)
    out["files"] = {k: v for k, v in out["files"].items() if not k.endswith("-shm")}
    return out


def test_the_plan_predicts_the_builds_peak_within_20_percent(world):
    before = written(world.settings)
    plan = wherefrom(world, "index", "-c", "w", "-m", "m", "--plan", "--batch-size", 32)
    assert plan.returncode == 0, plan.stderr
    assert written(world.settings) == before  # a plan writes nothing
    number, unit = re.search(r"peak host memory ([\d.]+) (GiB|MiB)", plan.stdout).groups()
    predicted = float(number) * (2**30 if unit == "GiB" else 2**20)
    assert re.search(r"tokens/s: [\d,]+ s per checkpoint", plan.stdout) and "fits" in plan.stdout
    built = wherefrom(world, "index", "-c", "w", "-m", "m", "--batch-size", 32)
    assert built.returncode == 0, built.stderr
    info = json.loads(next(p for p in world.settings.stores.iterdir() if p.is_dir()).joinpath("info.json").read_text())
    measured = info["runtime"]["peak_rss_bytes"]
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)
    assert info["runtime"]["device"] == ["cpu"] and info["runtime"]["batch_rows"] == 32


def test_a_build_that_will_not_fit_is_refused_in_one_line_with_nothing_written(world, run_cli, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    before = state(world.settings)
    code, _, err = run_cli("index", "-c", "w", "-m", "m",
                           env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir), "WHEREFROM_MEMORY_LIMIT": "100M"})
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "of host memory and may use 100.0 MiB" in err and "--max-tokens-per-batch" in err
    code, _, err = run_cli("index", "-c", "w", "-m", "m", env={"WHEREFROM_MEMORY_LIMIT": "64K"})
    assert code == 2 and err.count("\n") == 1 and "weights alone take" in err, err  # before any model loads
    assert state(world.settings) == before
    assert state(world.settings) == before


def test_a_worker_takes_its_device_or_says_in_one_line_why_not(run_cli, monkeypatch):
    code, _, err = run_cli("worker", "--device", "cuda:3")
    assert code == 2 and err.count("\n") == 1 and "CUDA device" in err and "--device cpu" in err
    runtime = Runtime(device="cpu", dtype="bfloat16")
    for key in runtime.environ():  # setenv first: delenv of an unset key records nothing to restore,
        monkeypatch.setenv(key, "")  # and use_device's WHEREFROM_DTYPE would outlive this test
        monkeypatch.delenv(key)
    use_device(runtime)
    assert Runtime.from_env() == runtime  # what its tasks read


def test_trace_runs_on_the_device_and_dtype_asked_for(indexed, run_cli, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    monkeypatch.setattr(tracer_cache, "_tracers", {})
    env = {"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)}
    question = indexed.world.questions[0]
    before = state(indexed.settings)
    code, _, err = run_cli("trace", question.prompt, "--device", "cuda:5", env=env)
    assert code == 2 and err.count("\n") == 1 and "CUDA device" in err, err
    assert state(indexed.settings) == before
    code, _, err = run_cli("trace", question.prompt, "--answer", question.answer, "--device", "cpu", env=env)
    assert code == 0, err  # a float32 tracer is cached now: the next runtime must not reuse it
    code, out, err = run_cli("trace", question.prompt, "--answer", question.answer, "--device", "cpu",
                             "--dtype", "bfloat16", "--json", env=env)
    assert code == 0, err
    (tracer,) = tracer_cache._tracers.values()
    assert tracer.featurizer(0)[2].dtype == torch.bfloat16 and json.loads(out)["hits"]
    assert "WHEREFROM_DTYPE" not in os.environ  # the option lasted for its command only
