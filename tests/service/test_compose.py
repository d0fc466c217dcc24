"""docker-compose.yml, checked without a Docker engine: it parses, every command is one of our CLI's
(with options it knows), every WHEREFROM_* variable is one our code reads, and the topology holds
(health checks, a one-shot migration before the workers, one stores volume, scalable workers).
The same topology runs natively in test_workers.py."""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from service.cli import app

ROOT = Path(__file__).parents[2]
@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services(compose):
    return compose["services"]


def resolve(tokens: list[str]):
    """The click command that `wherefrom TOKENS…` runs, and the options given to it (None: unknown)."""
    command = typer.main.get_command(app)
    args = list(tokens)
    while hasattr(command, "commands") and args and not args[0].startswith("-"):  # a group
        command = command.commands.get(args.pop(0))
        if command is None:
            return None, []
    return command, [a.split("=")[0] for a in args if a.startswith("--")]


def test_every_service_command_is_one_of_our_cli(compose):
    checked = 0
    for name, svc in services(compose).items():
        cmd = svc.get("command")
        if cmd is None:
            continue
        tokens = cmd if isinstance(cmd, list) else shlex.split(cmd)
        if tokens[0] != "wherefrom":
            continue
        command, options = resolve(tokens[1:])
        assert command is not None, f"service {name}: `{' '.join(tokens)}` is not a wherefrom command"
        known = {o for p in command.params for o in p.opts}
        assert set(options) <= known, f"service {name}: unknown options {set(options) - known}"
        checked += 1
    health = services(compose)["worker"]["healthcheck"]["test"]
    assert resolve(health[2:])[0] is not None and "--check" in health
    assert checked == 3  # migrate, worker, api


def read_variables() -> set[str]:
    """WHEREFROM_* names that appear as string literals in our packages' code."""
    found = set()
    for package in ("db", "indexer", "attribution", "service"):
        for path in (ROOT / package).rglob("*.py"):
            found |= set(re.findall(r"""["'](WHEREFROM_[A-Z_]+)["']""", path.read_text()))
    return found


def test_every_wherefrom_variable_is_read_by_our_settings(compose):
    used = set()
    for svc in services(compose).values():
        used |= {k for k in (svc.get("environment") or {}) if k.startswith("WHEREFROM_")}
    assert {"WHEREFROM_DATABASE_URL", "WHEREFROM_BROKER_URL", "WHEREFROM_DATA_DIR"} <= used
    unknown = used - read_variables()
    assert not unknown, f"docker-compose.yml sets variables nothing reads: {sorted(unknown)}"


def test_the_topology(compose):
    svc = services(compose)
    assert {"postgres", "redis", "migrate", "worker", "api"} <= set(svc)
    for name in ("postgres", "redis", "worker", "api"):
        assert svc[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert svc["migrate"]["restart"] == "no"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "api"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        env = svc[name]["environment"]
        assert "@postgres:" in env["WHEREFROM_DATABASE_URL"] and env["WHEREFROM_BROKER_URL"].startswith("redis://redis:")
        assert f"data:{env['WHEREFROM_DATA_DIR']}" in svc[name]["volumes"]  # one stores volume, one path
    assert "data" in compose["volumes"]
    # `--scale worker=N` needs workers without fixed names or host ports
    assert "container_name" not in svc["worker"] and "ports" not in svc["worker"]


def test_postgres_creates_the_analyst_login(compose):
    mount = next(v for v in services(compose)["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    folder = ROOT / mount.split(":")[0]
    script = (folder / "10-analyst.sh").read_text()
    assert "CREATE ROLE wherefrom_analyst LOGIN PASSWORD" in script
    assert "ANALYST_PASSWORD" in services(compose)["postgres"]["environment"]
    assert "torch==2.13.0" in (ROOT / "Dockerfile").read_text()


def test_no_default_passwords_and_the_api_on_this_host_only(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    for name in ("POSTGRES_PASSWORD", "ANALYST_PASSWORD"):
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?set " + name) for u in uses), (name, uses)  # unset: compose refuses
    published = {name: svc["ports"] for name, svc in services(compose).items() if "ports" in svc}
    assert {"postgres", "api"} <= set(published)
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports), published


def run_analyst_script(pg_url, password: str, role: str = "wherefrom_analyst"):
    """deploy/postgres/10-analyst.sh as the postgres image runs it (`role` renamed: the real one exists)."""
    import os
    import subprocess

    from sqlalchemy.engine import make_url
    url = make_url(pg_url)
    script = (ROOT / "deploy/postgres/10-analyst.sh").read_text().replace("wherefrom_analyst", role)
    env = {**os.environ, "POSTGRES_USER": url.username, "POSTGRES_DB": url.database, "PGHOST": url.host,
           "PGPORT": str(url.port), "ANALYST_PASSWORD": password}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)


def test_the_analyst_script_wants_a_real_password_and_keeps_it_off_the_command_line(pg_url):
    import uuid

    from sqlalchemy import text

    from db.engine import get_engine
    role = f"wherefrom_analyst_{uuid.uuid4().hex[:8]}"
    short = run_analyst_script(pg_url, "analyst", role)
    assert short.returncode == 1 and "set ANALYST_PASSWORD to 16 characters or more" in short.stderr
    owner = get_engine(pg_url)
    with owner.connect() as c:
        assert c.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar() == 0
    psql = next(line for line in (ROOT / "deploy/postgres/10-analyst.sh").read_text().splitlines()
                if line.startswith("psql "))
    assert "ANALYST_PASSWORD" not in psql  # argv is public to every process on the host
    try:
        done = run_analyst_script(pg_url, "s3cret-" + "x" * 20, role)
        assert done.returncode == 0, done.stderr
        with owner.connect() as c:
            login, hashed = c.execute(text("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = :r"),
                                      {"r": role}).one()
        assert login and hashed.startswith("SCRAM-SHA-256$")  # the password was set, and stored hashed
    finally:
        with owner.begin() as c:
            c.execute(text(f"DROP ROLE IF EXISTS {role}"))
