"""File modes for what the package writes: readable by others as the umask allows.

safetensors writes its files with mode 0600 whatever the umask, so weights written by one user
could not be read by a service running as another. Every weight file the package writes goes
through `as_umask_allows` before it is renamed into place.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no other way)."""
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike) -> None:
    """Give the file at `path` the mode a plain `open(path, "w")` would have: 0666 less the umask."""
    os.chmod(Path(path), 0o666 & ~current_umask())
