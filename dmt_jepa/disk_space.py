"""A full disk or an exceeded quota, told apart from other write failures, and sizes in words.

Exports and the embedding job turn such a failure into one sentence that names the folder and
about how much space the write needs, rather than a library's traceback; this module is what
they share. Libraries report it differently: Python raises OSError with the errno, safetensors
(Rust) puts the system's error inside its message ("... (os error 28)").
"""

from __future__ import annotations

import errno
import os
import shutil

_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def out_of_space(err: BaseException) -> str | None:
    """What ran out when `err` is a full disk or an exceeded quota, in words; None for any other failure."""
    if isinstance(err, OSError):
        return None if err.errno is None else _OUT_OF_SPACE.get(err.errno)
    return next((words for code, words in _OUT_OF_SPACE.items() if f"(os error {code})" in str(err)), None)


def size_in_words(n: float) -> str:
    """Bytes as KB below a megabyte, else MB (or GB from ten thousand MB)."""
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    if n < 1e10:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e9:,.1f} GB"


def free_space(folder: str | os.PathLike) -> str:
    """The space free in `folder` (or the nearest folder above it that exists), in words; `unknown` where unreadable."""
    path = os.path.abspath(folder)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return size_in_words(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
