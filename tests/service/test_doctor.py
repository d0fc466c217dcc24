"""`wherefrom doctor` against real parts: the indexed world, Redis, a database that is not there."""

import json
import shutil
import sys

import pytest

from service import catalog
from service.cli import main
from service.settings import Settings


@pytest.fixture
def doctor(monkeypatch, capsys):
    def run(settings: Settings, *extra, broker=None):
        monkeypatch.setenv("WHEREFROM_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("WHEREFROM_DATABASE_URL", settings.database_url)
        if broker:
            monkeypatch.setenv("WHEREFROM_BROKER_URL", broker)
        else:
            monkeypatch.delenv("WHEREFROM_BROKER_URL", raising=False)
        monkeypatch.setattr(sys, "argv", ["wherefrom", "doctor", *extra])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr().out
        return e.value.code or 0, out
    return run


def test_a_healthy_setup_with_a_live_broker(doctor, indexed):
    code, out = doctor(indexed.settings, "--json", broker="redis://127.0.0.1:6379/0")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0 and {c["status"] for c in checks.values()} == {"ok"}
    assert checks["broker"]["detail"] == "redis://127.0.0.1:6379/0"
    assert f"build {indexed.build.build_id}" in checks
    assert sum(name.startswith("model tiny step") for name in checks) == 3
    code, table = doctor(indexed.settings)
    assert code == 0 and "all good" in table


def test_an_unreachable_broker_and_database_say_what_to_fix(doctor, tmp_path):
    settings = Settings(tmp_path / "data", "postgresql+psycopg://postgres:secret@127.0.0.1:1/nope")
    code, out = doctor(settings, "--json", broker="redis://127.0.0.1:1/0")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 2 and set(checks) == {"database", "broker"}
    assert checks["database"]["status"] == "problem" and "WHEREFROM_DATABASE_URL" in checks["database"]["fix"]
    assert "secret" not in out and ":***@" in checks["database"]["detail"]
    assert checks["broker"]["status"] == "problem" and "WHEREFROM_BROKER_URL" in checks["broker"]["fix"]


def test_a_broken_store_and_changed_weights_are_found(doctor, indexed, tmp_path):
    """A copy of the indexed data dir with a store file removed, plus a model whose weights changed."""
    data = tmp_path / "data"
    shutil.copytree(indexed.settings.data_dir, data)
    settings = Settings(data, f"sqlite:///{data}/wherefrom.db")  # its stores are named relative to it
    store = next(p for p in (data / "stores").iterdir() if p.is_dir())
    (store / "dense.faiss").unlink()
    (data / "stores" / "x.partial").mkdir()
    model = tmp_path / "model"
    shutil.copytree(indexed.model_dir, model)
    catalog.add_model(settings, model, "copy")
    last = sorted(model.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    with open(last / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))

    code, out = doctor(settings, "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 2
    broken = checks[f"build {indexed.build.build_id}"]
    assert broken["status"] == "problem" and "dense.faiss" in broken["detail"] and "wherefrom index" in broken["fix"]
    assert checks["stores"]["status"] == "warn" and "partial" in checks["stores"]["detail"]
    changed = [c for n, c in checks.items() if n.startswith("model copy") and c["status"] == "problem"]
    assert len(changed) == 1 and "changed since registration" in changed[0]["detail"]
    assert "model add" in changed[0]["fix"]
    assert all(c["status"] == "ok" for n, c in checks.items() if n.startswith("model tiny"))
