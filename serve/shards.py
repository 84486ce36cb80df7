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

from dmt_jepa.serve.images import ImageRejected
from dmt_jepa.serve.quantize import encode
from dmt_jepa.serve.safe_read import FileRefused, exists_regular, read_json
from dmt_jepa.serve.safe_write import checked, removable, writable

BLOCK = 512
# A member larger than this is refused unread: no image a camera makes is near it, and reading one
# into memory would break the job's memory bound.
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
# A pax or GNU long-name header is a few hundred bytes; one far larger is hostile, and is not read.
MAX_EXTENSION_HEADER_BYTES = 1 << 20
# With carrying on, a sample's carried members in all are held to this many times the bound on one,
# so that the memory a sample costs does not grow with its member count (6,000 carried members of
# 60 KiB once took ~1 GB); members beyond are dropped and listed as not carried.
CARRIED_MEMBERS_BUDGET = 16
# A sample's member names (every member's, the dropped ones') are kept up to this many and the rest
# counted, so that what a sample of thousands of members holds and writes does not grow with them.
LISTED_MEMBERS = 100
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
OUTPUT_FORMAT = "dmt-jepa-embeddings"
OUTPUT_FORMAT_VERSION = 1
# Every file a shard may have in OUT_DIR besides NAME.json, as NAME.SUFFIX (tar and array layouts).
DATA_SUFFIXES = ("tar", "json", "patches.npy", "patches_scale.npy", "pooled.npy", "pooled_scale.npy", "parquet")
# The array layout's --layers arrays, NAME.layer_<i>.npy (NAME.layer_<i>_scale.npy for int8): i a block index.
LAYER_SUFFIX = r"layer_(?:0|[1-9][0-9]{0,2})(?:_scale)?\.npy"
# Any data suffix, as a regular expression (files aside are named after these too).
DATA_SUFFIX_PATTERN = "(?:" + "|".join(map(re.escape, DATA_SUFFIXES)) + "|" + LAYER_SUFFIX + ")"
# The identity fields the stored values depend on: shards that differ in one cannot be read as one set.
VECTOR_IDENTITY = ("model_sha256", "input_size", "resize", "pca", "pca_sha256", "layers", "pooled_only")
# WebDataset's rule: the key is the path up to the first dot of the file name, the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class MemberNames:
    """Member extensions in archive order: the first LISTED_MEMBERS kept, the rest only counted."""

    kept: list[str] = field(default_factory=list)
    more: int = 0

    def append(self, ext: str) -> None:
        if len(self.kept) < LISTED_MEMBERS:
            self.kept.append(ext)
        else:
            self.more += 1

    def listed(self, *, sort: bool = False) -> list[str]:
        """The names kept (`sort`: sorted), then `and N more` where there were more (a safe extension never has a space)."""
        kept = sorted(self.kept) if sort else list(self.kept)
        return [*kept, f"and {self.more} more"] if self.more else kept


@dataclass
class Sample:
    """Members of one input sample, by extension; `error` says why it cannot be used at all."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    names: MemberNames = field(default_factory=MemberNames)  # extensions of every member, kept or not
    not_carried: MemberNames = field(default_factory=MemberNames)  # safe extensions of members neither embedded nor carried
    carried_bytes: int = 0  # the non-image member bytes kept so far

    def image(self) -> tuple[str, bytes]:
        """The member holding the image: the first extension in IMAGE_EXTENSIONS order."""
        if self.error is not None:
            raise ImageRejected(self.error)
        by_lower = {ext.lower(): ext for ext in self.members}
        for ext in IMAGE_EXTENSIONS:
            if ext in by_lower:
                return by_lower[ext], self.members[by_lower[ext]]
        found = ", ".join(self.names.listed(sort=True)) or "nothing"
        raise ImageRejected(f"the sample has no image member (found: {found})")

    def carried(self) -> dict[str, bytes]:
        """The non-image members kept, by safe extension (`safe_extension`), in archive order."""
        return {safe_extension(ext): data for ext, data in self.members.items() if ext.lower() not in IMAGE_EXTENSIONS}


def split_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, extension); a name without extension is its own key."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def safe_key(key: str) -> str:
    """The output name of an input key: the same path, made safe to extract anywhere.

    Percent-encoding, so that distinct keys stay distinct and `urllib.parse.unquote` gives the key
    back: `%`, `\\`, control characters (NUL, newline, ...) and bytes that are not UTF-8 become
    `%XX`; a `.` or `..` path component becomes `%2E` or `%2E%2E`; a `/` that would start an
    absolute path or an empty component becomes `%2F`. What is left has no component that climbs.
    """
    chars = []
    for char in key:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (kept by surrogateescape)
            chars.append(f"%{code - 0xDC00:02X}")
        elif char in "%\\" or code < 0x20 or code == 0x7F:
            chars.append(f"%{code:02X}")
        else:
            chars.append(char)
    parts = "".join(chars).split("/")
    out = ""
    for i, part in enumerate(parts):
        if i > 0:
            out += "%2F" if parts[i - 1] == "" else "/"
        out += "%2E" * len(part) if part in (".", "..") else part
    return out


def safe_extension(ext: str) -> str:
    """The output form of a carried member's extension: one name part, never a path or a control character.

    ASCII letters, digits, `_` and `-` stay, as does a `.` between two non-empty parts (`seg.png`);
    every other character (a `.` that begins or ends the extension or follows another, `/`, `\\`,
    `%`, newline, space, non-ASCII) becomes `%XX` per UTF-8 byte, so that `urllib.parse.unquote`
    gives the extension back and distinct extensions stay distinct.
    """
    out = []
    for i, char in enumerate(ext):
        inner_dot = char == "." and 0 < i < len(ext) - 1 and ext[i - 1] != "."
        if char.isascii() and (char.isalnum() or char in "_-") or inner_dot:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _pax_fields(data: bytes) -> dict[str, str]:
    """Parse a pax extended header: records of the form b'LEN key=value\\n'; ValueError if malformed."""
    fields, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        if not data[pos:space].isdigit():
            raise ValueError(f"pax record length {data[pos:space][:20]!r} at offset {pos}")
        length = int(data[pos:space])
        if length <= space - pos or pos + length > len(data):
            raise ValueError(f"pax record length {length} at offset {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


class ShardReader:
    """Iterate the samples of one tar stream; after iteration `cut` says how the stream was damaged."""

    def __init__(
        self,
        stream: BinaryIO,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        images_only: bool = False,
        max_carried_bytes: int = 0,
    ):
        self.stream = stream
        self.max_member_bytes = max_member_bytes
        self.images_only = images_only
        self.max_carried_bytes = max_carried_bytes  # with images_only: non-image members up to this size are kept
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
        """(name, data or None, why the data is missing) per file member, in archive order.

        Directory entries are not members of any sample and pass silently; every other member that
        is not a regular file (a link, a device, a FIFO) comes with its reason, so that it is recorded.
        """
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
            try:
                size = int(pax.get("size", info.size))
                if size < 0:
                    raise ValueError(f"negative size {size}")
            except ValueError as err:
                self.cut = f"invalid member size in the tar header at byte {start} ({err}); the samples before it were kept"
                return
            padded = -size % BLOCK
            name = pax.get("path", long_name or info.name)
            cut_inside = f"the shard is cut off inside member {name}"
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE):
                if size > MAX_EXTENSION_HEADER_BYTES:
                    self.cut = (
                        f"the tar extension header at byte {start} declares {size} bytes, more than the "
                        f"{MAX_EXTENSION_HEADER_BYTES}-byte limit; the samples before it were kept"
                    )
                    return
                data = self._take(size + padded)
                if len(data) < size + padded:
                    self.cut = f"the shard is cut off inside a tar extension header at byte {self.offset}{self._read_error}"
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
                if info.type != tarfile.DIRTYPE:
                    yield name, None, _not_a_file(name, info)
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
                self.cut = f"{cut_inside} (got {len(data)} of {size} bytes){self._read_error}; the samples before it were kept"
                yield name, None, cut_inside
                return
            yield name, data[:size], None

    def __iter__(self) -> Iterator[Sample]:
        """Group consecutive members sharing a key into samples (WebDataset's rule).

        A sample with a member that cannot be used (a link, an oversized or repeated member) is
        refused whole, with the reason: which of two `KEY.jpg` members was meant is unknowable.
        With `images_only`, only the highest-ranked image member's bytes are kept, so that a sample
        of many large members costs the memory of one, and beside it the non-image members of at
        most `max_carried_bytes` each and CARRIED_MEMBERS_BUDGET times that in all. Where carrying is
        on, every member neither embedded nor carried (too large, beyond the sample's budget, an empty
        extension, an image member beside a higher-ranked one) is named, by its safe extension, in
        `Sample.not_carried`: the first LISTED_MEMBERS of them, and a count of the rest.
        """
        seen: set[str] = set()
        current: Sample | None = None
        exts: set[str] = set()  # the current sample's extensions, for the repeated-member check
        for name, data, problem in self._members():
            key, ext = split_key(name)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current, exts = Sample(key), set()
                if key in seen:
                    current.error = "the key appears again later in the shard; only its first sample is embedded"
                seen.add(key)
            if ext in exts:
                problem = problem or f"member {name} appears twice in the sample"
            current.names.append(ext)
            exts.add(ext)
            if problem is not None:
                current.error = current.error or problem
            elif current.error is None and self._keeps(ext, current, len(data)):
                if self.images_only and ext.lower() in IMAGE_EXTENSIONS:
                    for held in [e for e in current.members if e.lower() in IMAGE_EXTENSIONS]:
                        del current.members[held]
                        self._not_carried(current, held)
                current.members[ext] = data
        if current is not None:
            yield current

    def _not_carried(self, sample: Sample, ext: str) -> None:
        if self.max_carried_bytes:
            sample.not_carried.append(safe_extension(ext))

    def _keeps(self, ext: str, sample: Sample, size: int) -> bool:
        if not self.images_only:
            return True
        if ext.lower() not in IMAGE_EXTENSIONS:
            budget = CARRIED_MEMBERS_BUDGET * self.max_carried_bytes - sample.carried_bytes
            if self.max_carried_bytes and ext and size <= min(self.max_carried_bytes, budget):
                sample.carried_bytes += size
                return True
            self._not_carried(sample, ext)
            return False
        held = [IMAGE_EXTENSIONS.index(e.lower()) for e in sample.members if e.lower() in IMAGE_EXTENSIONS]
        if not held or IMAGE_EXTENSIONS.index(ext.lower()) < min(held):
            return True
        self._not_carried(sample, ext)
        return False


def _not_a_file(name: str, info: tarfile.TarInfo) -> str:
    if info.type == tarfile.SYMTYPE:
        return f"member {name} is a symbolic link (to {info.linkname}); links are not followed"
    if info.type == tarfile.LNKTYPE:
        return f"member {name} is a hard link (to {info.linkname}); links are not followed"
    return f"member {name} is not a regular file (tar type {info.type!r})"


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
    """OUT/NAME.tar and OUT/NAME.json for one input shard, written aside and renamed when complete.

    The files aside carry their owner's token, so that processes sharing OUT_DIR never write into
    the same file even when one takes over a shard another was still writing.
    """

    def __init__(self, out_dir: Path, name: str, owner: str = "", dtype: str = "float16", patches: bool = True):
        self.dtype, self.patches = dtype, patches
        self.tar_path = checked(out_dir, f"{name}.tar")
        self.json_path = checked(out_dir, f"{name}.json")
        suffix = f".{owner}.partial" if owner else ".partial"
        self.partial = writable(out_dir, f".{name}.tar{suffix}")
        self.json_partial = writable(out_dir, f".{name}.json{suffix}")
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
        carried: dict[str, bytes] | None = None,
        layers: dict[int, np.ndarray] | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        """One embedded sample: emb.npy [h, w, D] (unless patches are off), pooled.npy [D] if given,
        layer_<i>.npy [h, w, D] per asked layer, in the output dtype (int8 with a STEM_scale.npy
        beside), labels.npy [h, w] as given (uint8 or uint16 class ids, with --head), json, then the input's own non-image members as `in.EXT`, a prefix that keeps them
        apart from ours.

        Member names use `safe_key(key)`; where that differs from the key, the json keeps the key.
        """
        name = safe_key(key)
        if name != key:
            record = {**record, "key": key}
        stems = [("emb", embedding if self.patches else None), ("pooled", pooled)]
        stems += [(f"layer_{index}", grid) for index, grid in (layers or {}).items()]
        for stem, vectors in stems:
            if vectors is not None:
                values, scale = encode(vectors, self.dtype)
                self._member(f"{name}.{stem}.npy", npy_bytes(values))
                if scale is not None:
                    self._member(f"{name}.{stem}_scale.npy", npy_bytes(scale))
        if labels is not None:
            self._member(f"{name}.labels.npy", npy_bytes(labels))
        self._member(f"{name}.json", json.dumps(record, sort_keys=True).encode())
        for ext, data in (carried or {}).items():
            self._member(f"{name}.in.{ext}", data)
        self.embedded += 1

    def fail(self, key: str, reason: str) -> None:
        self.failures.append({"key": key, "reason": reason})

    def commit(self, record: dict) -> None:
        """Make the tar visible, then write NAME.json last: from then on the shard counts as done.

        On any error (a full disk) the files aside are removed and NAME.json is not written.
        """
        try:
            if self._tar is None:  # no sample embedded: still an (empty) tar, so every done shard has one
                self._tar = tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT)
            self._tar.close()
            _fsync(self.partial)
            sizes = {self.tar_path.name: os.path.getsize(self.partial)}
            os.replace(self.partial, self.tar_path)
            record = {**record, "sizes": sizes}
            write_done_record(self.json_partial, self.json_path, record, self.embedded, self.failures)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the unfinished files; nothing visible was written."""
        close_quietly(self._tar)
        self.partial.unlink(missing_ok=True)
        self.json_partial.unlink(missing_ok=True)


def close_quietly(file) -> None:
    """Close a writer whose file is about to be removed: the disk that failed a write fails the flush too."""
    if file is not None:
        try:
            file.close()
        except OSError:
            pass


def write_done_record(partial: Path, path: Path, record: dict, embedded: int, failures: list[dict]) -> None:
    """Write NAME.json aside, then rename it into place: the step that marks a shard done."""
    summary = {
        "format": OUTPUT_FORMAT,
        "format_version": OUTPUT_FORMAT_VERSION,
        **record,
        "embedded": embedded,
        "failed": len(failures),
        "failures": failures,
    }
    partial.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    _fsync(partial)
    os.replace(partial, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_leftovers(out_dir: Path, name: str, owner: str) -> None:
    """Delete the files aside that earlier owners of shard NAME left (killed mid-shard); keep `owner`'s."""
    pattern = re.compile(rf"\.{re.escape(name)}\.{DATA_SUFFIX_PATTERN}(?:\.([^./]+))?\.partial")
    with os.scandir(out_dir) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and match.group(1) != owner:
                Path(entry.path).unlink(missing_ok=True)


def read_record(out_dir: Path, name: str) -> dict | None:
    """The NAME.json of a shard whose data files all exist, or None (not done, unreadable or damaged)."""
    try:
        return load_record(out_dir, name)
    except FileRefused:
        return None


def load_record(out_dir: Path, name: str) -> dict | None:
    """NAME.json as `read_record`, but FileRefused, in one sentence, where it or a data file it lists
    exists and cannot be trusted.

    None where it is not a done record (another program's JSON) or a data file it lists is missing.
    """
    remedy = f"delete it and rerun `dmtjepa embed` to redo shard {name}"
    record = read_json(out_dir, f"{name}.json", remedy)
    if not isinstance(record, dict) or record.get("format") != OUTPUT_FORMAT:
        return None
    problem = record_problem(record, name)
    if problem is not None:
        raise FileRefused(f"{out_dir / name}.json is not a done record as `dmtjepa embed` writes it ({problem}); {remedy}.")
    if not all(exists_regular(out_dir, file, remedy) for file in data_files(record, name)):
        return None
    return record


def done_records(out_dir: Path) -> dict[str, dict]:
    """NAME -> NAME.json of every done shard in OUT_DIR, whichever run made it (regular files only)."""
    records: dict[str, dict] = {}
    if not out_dir.is_dir():
        return records
    with os.scandir(out_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file():
                record = read_record(out_dir, entry.name[: -len(".json")])
                if record is not None:
                    records[entry.name[: -len(".json")]] = record
    return records


def embedding_reader_files(name: str) -> tuple[str, str]:
    """Shard NAME's files in the embedding-reader layout: its pooled vectors and its table, in their folders."""
    return f"img_emb/img_emb_{name}.npy", f"metadata/metadata_{name}.parquet"


def is_data_file(name: str, file: str) -> bool:
    """Whether `file` (relative to OUT_DIR) is one a NAME.json of shard NAME may list under `files`."""
    if file in embedding_reader_files(name):
        return True
    suffix = file[len(name) + 1 :] if file.startswith(f"{name}.") else ""
    return (suffix in DATA_SUFFIXES and suffix not in ("tar", "json")) or bool(re.fullmatch(LAYER_SUFFIX, suffix))


def shard_files(name: str, record: object = None) -> list[str]:
    """Every file shard NAME may have in OUT_DIR, in any layout (those of its --layers: as `record` lists
    them); NAME.json first, the order to remove them in."""
    listed = record.get("files") if isinstance(record, dict) else None
    extra = [f for f in listed if isinstance(f, str) and is_data_file(name, f)] if isinstance(listed, list) else []
    fixed = [f"{name}.{suffix}" for suffix in DATA_SUFFIXES if suffix != "json"] + list(embedding_reader_files(name))
    return [f"{name}.json", *fixed, *(f for f in extra if f not in fixed)]


def remove_shard_files(out_dir: Path, name: str) -> None:
    """Delete shard NAME's files in every layout, NAME.json first, so that it is never seen done meanwhile.

    Every path is checked before any is deleted (serve/safe_write.py): a link planted on the way is
    refused in one sentence rather than followed out of OUT_DIR.
    """
    try:
        record = read_json(out_dir, f"{name}.json")
    except FileRefused:
        record = None
    for path in [removable(out_dir, file) for file in shard_files(name, record)]:
        path.unlink(missing_ok=True)


def record_problem(record: dict, name: str) -> str | None:
    """What makes a parsed NAME.json unusable by the readers of OUT_DIR, in words; None if nothing."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    failures = record.get("failures", [])
    files = record.get("files")
    size = record.get("input_size")
    sizes = record.get("sizes")
    checks = [
        (count(record.get("embedded")), "embedded is not a count"),
        (count(record.get("failed", 0)), "failed is not a count"),
        (
            isinstance(failures, list)
            and all(isinstance(f, dict) and isinstance(f.get("key"), str) and isinstance(f.get("reason"), str) for f in failures),
            "failures is not a list of {key, reason}",
        ),
        (
            files is None or (isinstance(files, list) and all(isinstance(f, str) and is_data_file(name, f) for f in files)),
            f"files names others than {name}'s",
        ),
        (
            sizes is None
            or (isinstance(sizes, dict) and all(f in data_files(record, name) and count(n) for f, n in sizes.items())),
            "sizes is not a byte count per data file",
        ),
        (isinstance(record.get("identity", {}), dict), "identity is not an object"),
        (isinstance(record.get("model") or {}, dict), "model is not an object"),
        (isinstance(record.get("cut") or "", str), "cut is not text"),
        (
            size is None or (isinstance(size, list) and len(size) == 2 and all(map(count, size))),
            "input_size is not [h, w]",
        ),
    ]
    return next((problem for ok, problem in checks if not ok), None)


def data_files(record: dict, name: str) -> list[str]:
    """The data files a shard's NAME.json vouches for: its `files`, else (the tar layout) NAME.tar."""
    files = record.get("files")
    return [str(f) for f in files] if isinstance(files, list) else [f"{name}.tar"]


def identity_difference(record: dict, identity: dict, unknown: tuple[str, ...] = ()) -> str | None:
    """How a shard's recorded identity differs from this run's, in words; None where they agree.

    A key either side lacks counts as None (a shard made with --layers is not one made without);
    keys in `unknown`, which this run does not know yet, are not compared.
    """
    recorded = record.get("identity")
    if not isinstance(recorded, dict):
        return "was written by an older dmt-jepa that did not record its settings"
    for key in [*identity, *(k for k in recorded if k not in identity)]:
        wanted = identity.get(key)
        if key not in unknown and recorded.get(key) != wanted:
            had, want = recorded.get(key), wanted
            if key.endswith("sha256") and had is not None and wanted is not None:
                had, want = str(had)[:12], str(want)[:12]
            return f"was made with {key} {had!r}, this run has {want!r}"
    return None


def is_done(out_dir: Path, name: str, identity: dict | None = None) -> bool:
    """Done: NAME.tar and NAME.json both exist and, given `identity`, NAME.json records the same one."""
    record = read_record(out_dir, name)
    return record is not None and (identity is None or identity_difference(record, identity) is None)
