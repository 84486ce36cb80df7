"""The user's cache folder for what dmt-jepa can make again but would rather not: $DMT_JEPA_CACHE_DIR,
else $XDG_CACHE_HOME/dmt-jepa, else ~/.cache/dmt-jepa."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    if env.get("DMT_JEPA_CACHE_DIR"):
        return Path(env["DMT_JEPA_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "dmt-jepa"
