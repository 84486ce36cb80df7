"""The output folder of an export: refused when it already holds files, unless told to replace them.

An export writes into a scratch folder and renames each checked file into `--out`. Without
`--overwrite` a folder that already holds anything is refused before any work, so an earlier
export is never mixed with a new one (an `encoder.onnx` from today beside an `encoder_fp16.onnx`
from last week). With `--overwrite`, once the export has succeeded, every entry it did not
(re)write is removed: the folder then holds exactly this export. What was written is told apart
by identity (device, inode, mtime): a renamed-in file is a new inode, an untouched one is not.
A failed export removes nothing. Every file written is given the mode the umask allows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmt_jepa.export.errors import ExportError
from dmt_jepa.file_modes import as_umask_allows

Identity = tuple[int, int, int]


def _is_scratch(name: str) -> bool:
    """The hidden `.NAME.partial` folders exports write into; each export clears its own."""
    return name.startswith(".") and name.endswith(".partial")


def _snapshot(out_dir: Path) -> dict[str, Identity]:
    """Each entry of `out_dir` (links not followed) by its identity; empty where the folder does not exist."""
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        raise ExportError(f"--out {out_dir} is a file, not a folder; choose a folder.") from None
    except OSError as err:
        raise ExportError(f"cannot read the output folder {out_dir} ({err.strerror}); choose a readable --out.") from err
    snapshot = {}
    for entry in entries:
        if _is_scratch(entry.name):
            continue
        st = entry.stat(follow_symlinks=False)
        snapshot[entry.name] = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return snapshot


def remove_entry(path: Path) -> None:
    """Delete one entry; a link goes as a link, never what it points at."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def make_readable(path: Path) -> None:
    """Regular files under `path` (itself included; links not followed) get the umask's mode."""
    if path.is_symlink():
        return
    if path.is_file():
        as_umask_allows(path)
    elif path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                file = Path(root) / name
                if not file.is_symlink():
                    as_umask_allows(file)


@contextmanager
def replacing(out_dir: str | os.PathLike, *, overwrite: bool, sources: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Guard one export into `out_dir`: refuse a non-empty folder without `overwrite`; on success make what
    was written readable as the umask allows and, with `overwrite`, remove every entry not rewritten.

    `sources` (the files the export reads) must not be among what an overwrite would remove.
    """
    out_dir = Path(out_dir)
    before = _snapshot(out_dir)
    if before and not overwrite:
        shown = ", ".join(sorted(before)[:5]) + (" ..." if len(before) > 5 else "")
        raise ExportError(
            f"{out_dir} already holds files ({shown}); choose an empty --out, or add --overwrite to replace them "
            "(what this export does not rewrite is then removed)."
        )
    for source in sources:
        try:
            inside = Path(source).resolve().relative_to(out_dir.resolve()).parts
        except ValueError:
            continue
        if inside and inside[0] in before:
            raise ExportError(
                f"--out {out_dir} holds the input {Path(source).name}, which --overwrite would remove; "
                "choose another --out."
            )
    yield out_dir
    after = _snapshot(out_dir)
    for name, identity in after.items():
        if before.get(name) != identity:
            make_readable(out_dir / name)
    if overwrite:
        for name, identity in before.items():
            if after.get(name) == identity:
                remove_entry(out_dir / name)
