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
_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process umask, read from /proc/self/status where Linux offers it.

    Elsewhere it is read by setting and restoring it (POSIX offers no other way), which a file
    created by another thread in between would see: the lock only orders callers of this function.
    """
    try:
        status = _STATUS.read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split(":", 1)[1], 8)
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike) -> None:
    """Give the file at `path` the mode a plain `open(path, "w")` would have: 0666 less the umask."""
    os.chmod(Path(path), 0o666 & ~current_umask())
