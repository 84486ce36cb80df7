"""Paths the embedding job writes inside OUT_DIR, which anyone with access to the folder may have planted.

Every file the job writes (the stats in `_stats/`, each shard's NAME.json and data, the tables,
the arrays, the embedding-reader folders, pca.npy, and the files aside) takes its path from
`writable`: each folder on the way must be missing or a real folder, and the name itself missing
or a regular file. A link there is refused in one sentence, whether it leads inside OUT_DIR or
out of it, as is a FIFO, a device or a socket: a write through a link lands wherever the link
points, which the job does not own, and a FIFO would block it. What the job deletes there (an
older shard's files, stats it replaces) takes its path from `removable`: each folder on the way
is checked the same way, since a link there would make the delete land outside OUT_DIR; the
entry itself may be a link or a FIFO, which deleting removes without following. So nothing the reader
(serve/safe_read.py) refuses is ever written through, and the closing summary describes files
the job really wrote. The names a job writes whatever its shards are called are checked before
any work (serve/job/out_dir.py, `prepare_out_dir`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from dmt_jepa.serve.safe_read import kind_of


class OutputDirError(ValueError):
    """OUT_DIR cannot hold the outputs; the message is one sentence for the user."""


def checked(out_dir: Path, relative: str, *, folder: bool = False) -> Path:
    """out_dir / relative, where every entry on the way is missing or a real folder and the last is missing or
    a regular file (a real folder with `folder`); OutputDirError otherwise. Nothing is made."""
    path, parts = out_dir, PurePosixPath(relative).parts
    for depth, part in enumerate(parts, start=1):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):  # the latter: OUT_DIR itself is not a folder (said when made)
            return out_dir / relative  # nothing lies below a missing entry
        want_file = depth == len(parts) and not folder
        if not (stat.S_ISREG(mode) if want_file else stat.S_ISDIR(mode)):
            raise OutputDirError(
                f"{path} is {kind_of(mode)}, where `dmtjepa embed` writes {'a file' if want_file else 'a folder'} "
                "of its own; move it away or choose another OUT_DIR."
            )
    return path


def writable(out_dir: Path, relative: str) -> Path:
    """out_dir / relative, checked as `checked` does, with the folders on the way made where missing."""
    path = checked(out_dir, relative)
    if path.parent != out_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def removable(out_dir: Path, relative: str) -> Path:
    """out_dir / relative, to delete: every folder on the way checked as `checked` does; the entry itself may be
    anything but a folder (deleting a link or a FIFO removes that entry, never what a link leads to)."""
    parent = PurePosixPath(relative).parent
    if parent != PurePosixPath("."):
        checked(out_dir, str(parent), folder=True)
    path = out_dir / relative
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            checked(out_dir, relative)  # refused in its words
    except (FileNotFoundError, NotADirectoryError):
        pass
    return path


def remove(out_dir: Path, relative: str) -> None:
    """Delete out_dir / relative where it exists, checked as `removable` says (OutputDirError, nothing deleted)."""
    removable(out_dir, relative).unlink(missing_ok=True)
