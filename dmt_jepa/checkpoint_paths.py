"""Where a run keeps its checkpoints: found without torch, so `pretrain --resume` answers a wrong path at once."""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message is one sentence for the user."""


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a save in progress has another name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or one of its checkpoints/step-* folders.")
    if (path / "state.pt").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint; pass a run directory or one of its checkpoints/step-* folders.")
    return found[-1]
