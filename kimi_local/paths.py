"""User directories (XDG): cache for the demo model, data for REPL history."""
from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, default: str) -> Path:
    p = Path(os.environ.get(var) or Path.home() / default) / "kimi-local"
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache")


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share")
