"""Deployment settings of the CLI, read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path  # WHEREFROM_DATA_DIR: stores, the SQLite file, demo models
    database_url: str  # WHEREFROM_DATABASE_URL: defaults to SQLite inside data_dir

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> "Settings":
        folder = Path(data_dir or os.environ.get("WHEREFROM_DATA_DIR", "wherefrom-data")).resolve()
        url = os.environ.get("WHEREFROM_DATABASE_URL") or f"sqlite:///{folder}/wherefrom.db"
        return cls(data_dir=folder, database_url=url)

    @property
    def stores(self) -> Path:
        return self.data_dir / "stores"
