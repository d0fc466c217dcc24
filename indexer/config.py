"""Help of config dataclass fields: each field declares its one line in `metadata={"help": ...}`.

Stdlib only, so a command line can read the help without importing the models' libraries.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass


def config_help(cls, name: str) -> str:
    """The one-line help of field `name` of the config dataclass `cls` (or of an instance)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{getattr(cls, '__name__', cls)} has no field {name!r}")
