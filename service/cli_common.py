"""What every `wherefrom` command module shares: the data-dir option, settings, atomic writes."""

from __future__ import annotations

from pathlib import Path

import typer

DataDir = typer.Option(None, "--data-dir", envvar="WHEREFROM_DATA_DIR",
                       help="Folder for stores and the SQLite database (default ./wherefrom-data).")


def settings(data_dir):
    from service.settings import Settings
    return Settings.from_env(data_dir)


def write_atomically(path: Path, text: str) -> None:
    """Write next to `path` and rename: a reader never sees half a file."""
    if not path.parent.is_dir():
        from db.errors import InputError
        raise InputError(f"folder {path.parent} does not exist: create it or choose another --output")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
