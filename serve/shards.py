"""WebDataset shards: a reader that survives damaged tars, and the atomic writer of embedding shards.

The reader parses tar headers itself rather than through `tarfile`'s stream mode, because it must
tell apart an archive that ended properly from one cut off mid-member or mid-header, and keep
every sample that lies before the cut.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from serve.images import ImageRejected

BLOCK = 512
# A member larger than this is refused unread: no image a camera makes is near it, and reading one
# into memory would break the job's memory bound.
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
OUTPUT_FORMAT = "dmt-jepa-embeddings"
OUTPUT_FORMAT_VERSION = 1
# WebDataset's rule: the key is the path up to the first dot of the file name, the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Sample:
    """Members of one input sample, by extension; `error` says why it cannot be used at all."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None

    def image(self) -> tuple[str, bytes]:
        """The member holding the image: the first extension in IMAGE_EXTENSIONS order."""
        if self.error is not None:
            raise ImageRejected(self.error)
        by_lower = {ext.lower(): ext for ext in self.members}
        for ext in IMAGE_EXTENSIONS:
            if ext in by_lower:
                return by_lower[ext], self.members[by_lower[ext]]
        found = ", ".join(sorted(self.members)) or "nothing"
        raise ImageRejected(f"the sample has no image member (found: {found})")


def split_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, extension); a name without extension is its own key."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def _pax_fields(data: bytes) -> dict[str, str]:
    """Parse a pax extended header: records of the form b'LEN key=value\\n'."""
    fields, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"pax record length {length} at offset {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


class ShardReader:
    """Iterate the samples of one tar stream; after iteration `cut` says how the stream was damaged."""

    def __init__(self, stream: BinaryIO, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.stream = stream
        self.max_member_bytes = max_member_bytes
        self.cut: str | None = None
        self.offset = 0
        self._read_error = ""  # why the stream stopped early, when it raised rather than ended

    def _take(self, size: int) -> bytes:
        """Up to `size` bytes; fewer only where the stream ends or fails (a broken pipe, bad gzip data)."""
        chunks, left = [], size
        try:
            while left > 0:
                chunk = self.stream.read(min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except (OSError, EOFError, zlib.error) as err:
            self._read_error = f" ({type(err).__name__}: {err})"
        data = b"".join(chunks)
        self.offset += len(data)
        return data

    def _drop(self, size: int) -> bool:
        """Discard `size` bytes in bounded chunks; False if the stream ended first."""
        while size > 0:
            got = len(self._take(min(size, 1 << 20)))
            if got == 0:
                return False
            size -= got
        return True

    def _members(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        """(name, data or None, why the data is missing) per regular file member, in archive order."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            start = self.offset
            header = self._take(BLOCK)
            if len(header) < BLOCK:
                self.cut = (
                    f"the shard is empty{self._read_error}"
                    if start == 0 and not header
                    else f"the shard ends at byte {self.offset} without the tar end marker{self._read_error} "
                    "(cut off; the samples before the cut were kept)"
                )
                return
            if header == bytes(BLOCK):
                return  # end-of-archive marker: a complete shard
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                self.cut = f"invalid tar header at byte {start} ({err}); the samples before it were kept"
                return
            size = int(pax.get("size", info.size))
            padded = -size % BLOCK
            name = pax.get("path", long_name or info.name)
            cut_inside = f"the shard is cut off inside member {name}"
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE):
                data = self._take(size + padded)
                if len(data) < size + padded:
                    self.cut = (
                        f"the shard is cut off inside a tar extension header at byte {self.offset}{self._read_error}"
                    )
                    return
                try:
                    if info.type == tarfile.XHDTYPE:
                        pax = _pax_fields(data[:size])
                    elif info.type == tarfile.GNUTYPE_LONGNAME:
                        long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                except ValueError as err:
                    self.cut = f"invalid pax header at byte {start} ({err}); the samples before it were kept"
                    return
                continue
            long_name, pax = None, {}
            if info.type not in tarfile.REGULAR_TYPES:
                if not self._drop(size + padded):
                    self.cut = f"{cut_inside} at byte {self.offset}{self._read_error}"
                    return
                continue
            if size > self.max_member_bytes:
                complete = self._drop(size + padded)
                yield name, None, f"member {name} is {size} bytes, more than the {self.max_member_bytes}-byte limit"
                if not complete:
                    self.cut = f"{cut_inside} at byte {self.offset}{self._read_error}"
                    return
                continue
            data = self._take(size + padded)
            if len(data) < size:
                self.cut = (
                    f"{cut_inside} (got {len(data)} of {size} bytes){self._read_error}; the samples before it were kept"
                )
                yield name, None, cut_inside
                return
            yield name, data[:size], None

    def __iter__(self) -> Iterator[Sample]:
        """Group consecutive members sharing a key into samples (WebDataset's rule)."""
        seen: set[str] = set()
        current: Sample | None = None
        for name, data, problem in self._members():
            key, ext = split_key(name)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = Sample(key)
                if key in seen:
                    current.error = "the key appears again later in the shard; only its first sample is embedded"
                seen.add(key)
            if problem is not None:
                current.error = current.error or problem
            elif current.error is None:
                current.members[ext] = data
        if current is not None:
            yield current


def open_source(source: str) -> BinaryIO:
    """A readable byte stream for a local path or any URL WebDataset can open (http, s3 via pipe:, ...)."""
    if source.endswith((".tar.gz", ".tgz")):
        import gzip

        return gzip.open(_open_raw(source), "rb")
    return _open_raw(source)


def _open_raw(source: str) -> BinaryIO:
    if "://" in source or source.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(source, "rb")
    return open(source, "rb")


def _deterministic_info(name: str, size: int) -> tarfile.TarInfo:
    """Tar member header with no time or owner, so that two runs write identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardOutput:
    """OUT/NAME.tar and OUT/NAME.json for one input shard, written aside and renamed when complete."""

    def __init__(self, out_dir: Path, name: str):
        self.tar_path = out_dir / f"{name}.tar"
        self.json_path = out_dir / f"{name}.json"
        self.partial = out_dir / f".{name}.tar.partial"
        self.embedded = 0
        self.failures: list[dict[str, str]] = []
        self._tar: tarfile.TarFile | None = None

    def _member(self, name: str, data: bytes) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT)
        self._tar.addfile(_deterministic_info(name, len(data)), io.BytesIO(data))

    def add(
        self,
        key: str,
        embedding: np.ndarray,
        record: dict,
        pooled: np.ndarray | None = None,
        layers: dict[int, np.ndarray] | None = None,
    ) -> None:
        """One embedded sample: emb.npy float16 [h, w, D], json, pooled.npy float16 [D] and
        layer_<i>.npy float16 [h, w, D] if asked."""
        self._member(f"{key}.emb.npy", npy_bytes(embedding.astype(np.float16)))
        if pooled is not None:
            self._member(f"{key}.pooled.npy", npy_bytes(pooled.astype(np.float16)))
        for index, grid in (layers or {}).items():
            self._member(f"{key}.layer_{index}.npy", npy_bytes(grid.astype(np.float16)))
        self._member(f"{key}.json", json.dumps(record, sort_keys=True).encode())
        self.embedded += 1

    def fail(self, key: str, reason: str) -> None:
        self.failures.append({"key": key, "reason": reason})

    def commit(self, record: dict) -> None:
        """Make the tar visible, then write NAME.json last: from then on the shard counts as done."""
        if self._tar is None:  # no sample embedded: still an (empty) tar, so every done shard has one
            self._tar = tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT)
        self._tar.close()
        _fsync(self.partial)
        os.replace(self.partial, self.tar_path)
        summary = {
            "format": OUTPUT_FORMAT,
            "format_version": OUTPUT_FORMAT_VERSION,
            **record,
            "embedded": self.embedded,
            "failed": len(self.failures),
            "failures": self.failures,
        }
        aside = self.json_path.with_name(f".{self.json_path.name}.partial")
        aside.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        _fsync(aside)
        os.replace(aside, self.json_path)

    def abort(self) -> None:
        """Drop the unfinished tar; nothing visible was written."""
        if self._tar is not None:
            self._tar.close()
        self.partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def is_done(out_dir: Path, name: str) -> bool:
    """A shard is done exactly when its NAME.json exists."""
    return (out_dir / f"{name}.json").is_file()
