"""Reading files of an OUT_DIR, which anyone with access to the folder may have replaced.

Every read of an OUT_DIR file goes through here and follows the same rules:
  1. the path is resolved (symbolic links followed) and must stay inside OUT_DIR;
  2. only a regular file is opened: a FIFO, device, socket or folder is refused from its lstat,
     before any open that could block or have an effect, and the descriptor is checked again
     after opening (O_NONBLOCK, O_NOFOLLOW), so a file swapped in between is refused too;
  3. what is read is bounded: JSON by MAX_JSON_BYTES, a .npy by the size its header declares,
     checked against the file's size before mapping;
  4. every failure of a library (json, numpy, pyarrow) is one sentence naming the file.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import numpy as np

# A done record lists one failure per input sample: ~100 000 failures fit, far more than a shard holds.
MAX_JSON_BYTES = 16 << 20
# What a file of OUT_DIR that cannot be used comes with, unless the caller knows better.
DEFAULT_REMEDY = "restore it from a good copy or remove it"


class FileRefused(ValueError):
    """A file of OUT_DIR that is not safe to open or not readable as what it should be; one sentence."""


def kind_of(mode: int) -> str:
    """What an entry of this (l)stat mode is, in words."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a link"), (stat.S_ISREG, "a file"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def local_folder(location: str | os.PathLike) -> Path | None:
    """A local path, or a file:// URL, as a Path; None for any other URL (s3://, memory://, ...)."""
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    parsed = urlsplit(text)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parsed.path))


def resolve_inside(root: Path, relative: str, remedy: str = DEFAULT_REMEDY) -> Path:
    """root / relative with every link resolved; FileRefused where that leaves root."""
    path = root / relative
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise FileRefused(f"{path} leads outside {root} (to {real}); {remedy}.")
    return Path(real)


def exists_regular(root: Path, relative: str, remedy: str = DEFAULT_REMEDY) -> bool:
    """False where root / relative does not exist; True for a regular file inside root; FileRefused otherwise."""
    path = root / relative
    if not os.path.lexists(path):
        return False
    real = resolve_inside(root, relative, remedy)
    try:
        mode = os.stat(real).st_mode
    except OSError as err:
        raise FileRefused(f"cannot open {path} ({err.strerror or err}); {remedy}.") from err
    if not stat.S_ISREG(mode):
        raise FileRefused(f"{path} is {kind_of(mode)}, not a regular file; {remedy}.")
    return True


def open_regular(root: Path, relative: str, remedy: str = DEFAULT_REMEDY) -> BinaryIO:
    """root / relative opened for reading, under rules 1 and 2 of the module docstring."""
    path = root / relative
    real = resolve_inside(root, relative, remedy)
    try:
        mode = os.lstat(real).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(f"{path} is {kind_of(mode)}, not a regular file; {remedy}.")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise FileRefused(f"cannot open {path} ({err.strerror or err}); {remedy}.") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between the lstat and the open
        os.close(fd)
        raise FileRefused(f"{path} is {kind_of(mode)}, not a regular file; {remedy}.")
    return os.fdopen(fd, "rb")


def read_json(root: Path, relative: str, remedy: str = DEFAULT_REMEDY, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value of root / relative, read up to max_bytes."""
    data = read_bytes(root, relative, max_bytes, remedy)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # bad syntax or UTF-8, or nesting deeper than the parser goes
        raise FileRefused(f"{root / relative} is not valid JSON ({err}); {remedy}.") from err


def _npy_header(f: BinaryIO, size: int) -> tuple[tuple[int, ...], str, np.dtype, int]:
    """(shape, order, dtype, data offset) of the .npy file `f` of `size` bytes; ValueError if it cannot be used.

    Parsed here rather than by np.load, so that the dtype (no Python objects, hence no pickles) and
    the size the header declares are checked before anything is mapped or read.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"format version {version} is not one numpy writes for plain arrays")
    if dtype.hasobject:
        raise ValueError("it holds Python objects (a pickle), which are never loaded")
    offset = f.tell()
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        raise ValueError(f"its header declares {need} bytes, the file has {size}")
    return shape, "F" if fortran else "C", dtype, offset


def load_npy(root: Path, relative: str, remedy: str = DEFAULT_REMEDY) -> np.ndarray:
    """The array in root / relative as a read-only memmap, its header checked first."""
    path = root / relative
    with open_regular(root, relative, remedy) as f:
        try:
            shape, order, dtype, offset = _npy_header(f, os.fstat(f.fileno()).st_size)
            if not np.prod(shape):  # no element: nothing to map
                return np.empty(shape, dtype, order=order)
            return np.memmap(f, dtype, mode="r", offset=offset, shape=shape, order=order)
        except (ValueError, OSError, EOFError) as err:
            raise FileRefused(f"{path} is not a readable .npy file ({err}); {remedy}.") from err


def read_bytes(root: Path, relative: str, max_bytes: int, remedy: str = DEFAULT_REMEDY) -> bytes:
    """The whole of root / relative, refused where it is larger than max_bytes."""
    path = root / relative
    with open_regular(root, relative, remedy) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise FileRefused(f"cannot read {path} ({err.strerror or err}); {remedy}.") from err
    if len(data) > max_bytes:
        raise FileRefused(f"{path} is larger than the {max_bytes}-byte limit for this file; {remedy}.")
    return data


def load_npy_bytes(data: bytes, where: str, remedy: str = DEFAULT_REMEDY) -> np.ndarray:
    """An array from .npy bytes already in memory (a tar member, a small file); `where` names them."""
    try:
        shape, order, dtype, offset = _npy_header(io.BytesIO(data), len(data))
        count = int(np.prod(shape))
        return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape, order=order)
    except (ValueError, OSError, EOFError) as err:
        raise FileRefused(f"{where} is not a readable .npy array ({err}); {remedy}.") from err


def read_parquet(root: Path, relative: str, remedy: str = DEFAULT_REMEDY):
    """The pyarrow Table in root / relative."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / relative
    with open_regular(root, relative, remedy) as f:
        try:
            return pq.read_table(f)
        except (pa.ArrowException, ValueError, OSError) as err:
            raise FileRefused(f"{path} is not a readable Parquet table ({err}); {remedy}.") from err
