"""Reading an OUT_DIR back: `open_embeddings(OUT_DIR)` over either layout, in float32.

Only shards whose NAME.json marks them done are read; the rows of all shards are numbered in
shard-name order, then in each shard's own order. The array layout is read through memmaps, so
opening costs a header read per file whatever the size; the tar layout is indexed once (member
offsets from the tar headers) and each sample is read at its offset on access.

Nothing read is trusted: files are opened through serve.safe_read (regular files inside OUT_DIR,
bounded reads); an array shard's keys are paired with vectors by its table's `row` column, and
every array's row count, rank and dtype are checked against the table and NAME.json at open; an
OUT_DIR whose shards come from different models or settings is refused. Each refusal is one
EmbeddingsError sentence naming the file.

A table is bound to its arrays by its `crc32` column (each row's CRC-32 per array, serve/layouts.py),
and NAME.json to its data files by their sizes: the sizes and the first and last row of every
array are checked at open, which costs two rows per file whatever the size, and every row read
later is checked as it is read. So arrays of equal length swapped between shards are refused, not
paired with another shard's keys. Tables written before the column existed (whose schema metadata
does not describe it) are read unchecked.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from dmt_jepa.serve.layouts import SCHEMA_METADATA_KEY, OutputSpec, metadata_table
from dmt_jepa.serve.pca import PCA_FILE, PcaError, read_projection
from dmt_jepa.serve.quantize import decode
from dmt_jepa.serve.safe_read import (
    MAX_JSON_BYTES,
    FileRefused,
    load_npy,
    load_npy_bytes,
    local_folder,
    open_regular,
    read_parquet,
)
from dmt_jepa.serve.shards import LAYER_SUFFIX, OUTPUT_FORMAT, VECTOR_IDENTITY, data_files, load_record

# Columns of `Embeddings.metadata()`, in order; the array layout's Parquet table plus `shard`.
METADATA_COLUMNS = (
    "shard", "key", "row", "original_size", "input_size", "grid", "resize", "content", "members", "not_carried",
)  # fmt: skip


class EmbeddingsError(ValueError):
    """OUT_DIR cannot be read as embeddings; the message is one sentence for the user."""


@dataclass
class Embedding:
    """One stored sample, decoded to float32."""

    key: str
    patches: np.ndarray | None  # [h, w, D]; None where only pooled vectors were written
    pooled: np.ndarray  # [D]: as stored, or the mean of the patch grid where pooled vectors were not written
    metadata: dict  # the METADATA_COLUMNS of its row
    layers: dict[int, np.ndarray] = field(default_factory=dict)  # block index -> [h, w, D], with --layers
    labels: np.ndarray | None = None  # [h, w] uint8/uint16 class ids, with --head (Embeddings.class_names)


@dataclass
class Batch:
    keys: list[str]
    patches: np.ndarray | None  # [B, h, w, D]
    pooled: np.ndarray  # [B, D]
    layers: dict[int, np.ndarray] = field(default_factory=dict)  # block index -> [B, h, w, D], with --layers
    labels: np.ndarray | None = None  # [B, h, w] class ids, with --head


def _remedy(name: str) -> str:
    return f"delete {name}.json and rerun `dmtjepa embed` to redo shard {name}"


@contextmanager
def _as_embeddings_error() -> Iterator[None]:
    """A file refused by serve.safe_read reaches the user as the reader's own error."""
    try:
        yield
    except FileRefused as err:
        raise EmbeddingsError(str(err)) from err


# The array layout's arrays: their rank, and their shape as docs/embed.md writes it.
_ARRAY_PARTS = {
    "patches": (4, "[N, h, w, D]"),
    "patches_scale": (3, "[N, h, w]"),
    "pooled": (2, "[N, D]"),
    "pooled_scale": (1, "[N]"),
}
_VALUE_DTYPES = (np.dtype("float32"), np.dtype("float16"), np.dtype("int8"))
_LABEL_DTYPES = (np.dtype("uint8"), np.dtype("uint16"))


def _class_names(record: dict, json_path: Path, remedy: str) -> list[str] | None:
    """The class names of the head a shard was labelled with (`embed --head`), or None without one."""
    head = record.get("head")
    if head is None:
        return None
    names = head.get("class_names") if isinstance(head, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise EmbeddingsError(f"{json_path} records a head without a list of class names; {remedy}.")
    return names


def _part_shape(part: str) -> tuple[int, str]:
    """Rank and documented shape of an array part; a --layers part is shaped as the patches."""
    if part in _ARRAY_PARTS:
        return _ARRAY_PARTS[part]
    return _ARRAY_PARTS["patches_scale" if part.endswith("_scale") else "patches"]


def _shard_files(name: str, record: dict, files: set[str]) -> tuple[str | None, dict[str, str]]:
    """The table and the array parts (part -> file) that NAME.json lists, in the shard's layout."""
    if record.get("layout") == "embedding-reader":
        spec = OutputSpec("embedding-reader")
        table, parts = spec.table_file(name), spec.array_files(name)
    else:
        table = f"{name}.parquet"
        parts = {f"{name}.{p}.npy": p for p in _ARRAY_PARTS}
        layer_files = [f for f in files if f.startswith(f"{name}.") and re.fullmatch(LAYER_SUFFIX, f[len(name) + 1 :])]
        parts.update({f: f[len(name) + 1 : -len(".npy")] for f in layer_files})
        parts = {p: f for f, p in parts.items()}
    return (table if table in files else None), {p: f for p, f in parts.items() if f in files}


class _ArrayShard:
    """One shard of an array layout: memmaps in row order, every count and shape checked at open."""

    def __init__(self, out_dir: Path, name: str, record: dict):
        self.name, self.record = name, record
        remedy = _remedy(name)
        files = set(data_files(record, name))
        table, parts = _shard_files(name, record, files)
        arrays: dict[str, np.ndarray] = {"pooled": np.empty((0, 0), np.float32)}
        self.table, self.keys = metadata_table([]), []
        self.crc32: dict[str, np.ndarray] = {}  # part -> uint32 [N], by row; empty for a table without the column
        self.files = {part: out_dir / file for part, file in parts.items()}
        self.arrays, self.table_path = arrays, out_dir / f"{name}.parquet"
        if table is not None:
            self.table, self.crc32 = _in_row_order(read_parquet(out_dir, table, remedy), out_dir / table, remedy)
            self.keys = self.table.column("key").to_pylist()
            arrays = {part: load_npy(out_dir, file, remedy) for part, file in parts.items()}
            _check_arrays(arrays, len(self.keys), out_dir, name, remedy, parts)
            self.arrays, self.table_path = arrays, out_dir / table
            self._check_bound(remedy)
        elif not (record.get("layout") == "embedding-reader" and record["embedded"] == 0 and not files):
            # (an embedding-reader shard with no sample is the one that writes no file: serve/layouts.py)
            raise EmbeddingsError(f"{out_dir / name}.json lists no table ({name}.parquet or its metadata file); {remedy}.")
        layer_parts = [p for p in arrays if p.startswith("layer_") and not p.endswith("_scale")]
        self.layers = {int(p.removeprefix("layer_")): (arrays[p], arrays.get(f"{p}_scale")) for p in layer_parts}
        _check_layers(record, sorted(self.layers), out_dir / f"{name}.json", remedy)
        if record["embedded"] != len(self.keys):
            raise EmbeddingsError(
                f"{out_dir / name}.json counts {record['embedded']} embedded samples, {name}.parquet holds "
                f"{len(self.keys)} rows; {remedy}."
            )
        self.patch_values, self.patch_scale = arrays.get("patches"), arrays.get("patches_scale")
        self.pooled_values, self.pooled_scale = arrays.get("pooled"), arrays.get("pooled_scale")

    def _check_bound(self, remedy: str) -> None:
        """The crc32 column names every array, and the first and last row of each match it."""
        if self.crc32 and set(self.crc32) != set(self.arrays):
            raise EmbeddingsError(
                f"{self.table_path}'s crc32 column covers {sorted(self.crc32)}, the shard's arrays are "
                f"{sorted(self.arrays)}; {remedy}."
            )
        for part in self.arrays:
            self._rows(part, slice(0, 1))
            self._rows(part, slice(len(self.keys) - 1, len(self.keys)))

    def _rows(self, part: str, rows: slice) -> np.ndarray | None:
        """Rows of one array part as stored, each checked against its CRC-32 in the table; None where absent."""
        array = self.arrays.get(part)
        if array is None:
            return None
        values, digests = array[rows], self.crc32.get(part)
        if digests is not None:
            for row, stored in zip(range(*rows.indices(len(self.keys))), values):
                if zlib.crc32(np.ascontiguousarray(stored)) != digests[row]:
                    raise EmbeddingsError(
                        f"{self.files[part]} row {row} is not the data {self.table_path.name} was written with (its "
                        f"CRC-32 differs: the file was swapped with another shard's, replaced or damaged); {_remedy(self.name)}."
                    )
        return values

    def _decoded(self, stem: str, rows: slice) -> np.ndarray | None:
        values = self._rows(stem, rows)
        return None if values is None else decode(values, self._rows(f"{stem}_scale", rows))

    def patches(self, rows: slice) -> np.ndarray | None:
        return self._decoded("patches", rows)

    def pooled(self, rows: slice) -> np.ndarray:
        if self.pooled_values is None:
            return self.patches(rows).mean(axis=(1, 2))
        return self._decoded("pooled", rows)

    def layer_maps(self, rows: slice) -> dict[int, np.ndarray]:
        return {i: self._decoded(f"layer_{i}", rows) for i in self.layers}

    def labels(self, rows: slice) -> np.ndarray | None:
        return None  # --head writes the tar layout only

    def metadata(self):
        return self.table


def _in_row_order(table, path: Path, remedy: str) -> tuple:
    """The Parquet table sorted by its `row` column, which must number the arrays' rows 0..N-1 once each,
    and its crc32 column in that order (part -> uint32 [N]; empty where the table has none).

    A table in another order (rewritten by some tool) still pairs every key with its own vectors;
    a row missing or repeated cannot be paired at all, and is refused.
    """
    import pyarrow as pa

    missing = [column for column in METADATA_COLUMNS[1:] if column not in table.column_names]
    if missing:
        raise EmbeddingsError(f"{path} lacks the column {missing[0]} of the array layout's table; {remedy}.")
    key, row = table.column("key"), table.column("row")
    text = pa.types.is_string(key.type) or pa.types.is_large_string(key.type)
    if not text or not pa.types.is_integer(row.type) or key.null_count or row.null_count:
        raise EmbeddingsError(f"{path}'s key and row columns are not text and whole numbers throughout; {remedy}.")
    rows = row.to_numpy()
    if not np.array_equal(np.sort(rows), np.arange(len(rows))):
        raise EmbeddingsError(
            f"{path}'s row column does not number its {len(rows)} rows 0 to {len(rows) - 1} once each (a row is "
            f"missing, repeated or out of range), so keys cannot be paired with vectors; {remedy}."
        )
    if not (rows == np.arange(len(rows))).all():
        table = table.take(np.argsort(rows))
    if "crc32" in table.column_names:
        crc32 = _row_digests(table, path, remedy)
    elif b'"row_crc32"' in (table.schema.metadata or {}).get(SCHEMA_METADATA_KEY, b""):
        raise EmbeddingsError(f"{path} lacks the crc32 column its schema metadata describes; {remedy}.")
    else:  # a table written before the column existed
        crc32 = {}
    return table.select(list(METADATA_COLUMNS[1:])), crc32


def _row_digests(table, path: Path, remedy: str) -> dict[str, np.ndarray]:
    """The crc32 column (array part -> CRC-32 per row) as part -> uint32 [N]; every row must name every part."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column("crc32").combine_chunks()
    if not (pa.types.is_map(column.type) and pa.types.is_integer(column.type.item_type)) or column.null_count:
        raise EmbeddingsError(f"{path}'s crc32 column is not a map of array part to CRC-32 on every row; {remedy}.")
    parts = set(pc.unique(column.keys).to_pylist())
    digests = {}
    for part in sorted(parts):
        values = pc.map_lookup(column, pa.scalar(part), "first")
        if values.null_count:
            raise EmbeddingsError(f"{path}'s crc32 column lacks the part {part} on some rows; {remedy}.")
        digests[part] = values.to_numpy().astype(np.int64)
    return digests


def _check_arrays(
    arrays: dict[str, np.ndarray], count: int, out_dir: Path, name: str, remedy: str, files: dict[str, str]
) -> None:
    """Ranks, dtypes and row counts of one shard's arrays against each other and its table's `count` rows."""
    if "patches" not in arrays and "pooled" not in arrays:
        raise EmbeddingsError(f"{out_dir / name}.json lists neither {name}.patches.npy nor {name}.pooled.npy; {remedy}.")
    for part, array in arrays.items():
        file = out_dir / files[part]
        rank, shape = _part_shape(part)
        scale = part.endswith("_scale")
        if array.ndim != rank or array.dtype not in ((np.dtype("float32"),) if scale else _VALUE_DTYPES):
            raise EmbeddingsError(f"{file} holds {array.dtype} {list(array.shape)}, not {shape} vectors; {remedy}.")
        if array.shape[0] != count:
            raise EmbeddingsError(f"{file} holds {array.shape[0]} rows, {name}.parquet {count}; {remedy}.")
    stems = {part.removesuffix("_scale") for part in arrays}
    for stem in sorted(stems):
        values, scale = arrays.get(stem), arrays.get(f"{stem}_scale")
        if values is None:
            raise EmbeddingsError(f"{out_dir / name}.json lists {name}.{stem}_scale.npy without its values; {remedy}.")
        if (values.dtype == np.int8) != (scale is not None) or (scale is not None and scale.shape != values.shape[:-1]):
            raise EmbeddingsError(
                f"{out_dir / files[stem]} and its scales do not match (int8 values need one float32 scale per "
                f"vector, other dtypes none); {remedy}."
            )
    widths = {stem: arrays[stem].shape[-1] for stem in stems}
    grids = {arrays[stem].shape[1:3] for stem in stems if stem != "pooled"}
    if len(set(widths.values())) > 1 or len(grids) > 1:
        raise EmbeddingsError(f"the arrays of shard {name} ({', '.join(sorted(stems))}) differ in width or grid; {remedy}.")


def _check_layers(record: dict, found: list[int], json_path: Path, remedy: str) -> None:
    """The blocks a shard holds must be the ones its NAME.json records (`layers`), no more and no fewer."""
    recorded = record.get("layers") or []
    valid = isinstance(recorded, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in recorded)
    if not valid or sorted(recorded) != found:
        raise EmbeddingsError(f"{json_path} records layers {recorded!r}, its data holds {found}; {remedy}.")


class _TarShard:
    """One tar layout shard: indexed once from the tar headers, each sample read at its offset."""

    def __init__(self, out_dir: Path, name: str, record: dict):
        self.name, self.record, self.out_dir, self.path = name, record, out_dir, out_dir / f"{name}.tar"
        self.remedy = _remedy(name)
        self.members: list[dict[str, tuple[int, int]]] = []  # per row: extension -> (offset, size)
        names: list[str] = []
        with self._open() as f:
            size = os.fstat(f.fileno()).st_size
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        if not member.isreg() or member.offset_data + member.size > size:
                            why = "is cut off inside" if member.isreg() else "holds a link or special file as"
                            raise EmbeddingsError(f"{self.path} {why} member {member.name}; {self.remedy}.")
                        stem, _, ext = member.name.partition(".")
                        if not names or names[-1] != stem:
                            names.append(stem)
                            self.members.append({})
                        self.members[-1][ext] = (member.offset_data, member.size)
            except (tarfile.TarError, OSError, ValueError) as err:
                if isinstance(err, EmbeddingsError):
                    raise
                raise EmbeddingsError(f"{self.path} is not a readable tar ({err}); {self.remedy}.") from err
        self.keys = [unquote(stem, errors="surrogateescape") for stem in names]
        self.table = None
        self._check(record)

    def _check(self, record: dict) -> None:
        if record["embedded"] != len(self.keys):
            raise EmbeddingsError(
                f"{self.path} holds {len(self.keys)} samples, {self.name}.json counts {record['embedded']} embedded "
                f"(the tar is cut off or was replaced); {self.remedy}."
            )
        for stem in ("emb.npy", "pooled.npy", "labels.npy"):
            if len({stem in members for members in self.members}) > 1:
                raise EmbeddingsError(f"{self.path} has {stem} members for some samples only; {self.remedy}.")
        self.class_names = _class_names(record, self.out_dir / f"{self.name}.json", self.remedy)
        if self.members and ("labels.npy" in self.members[0]) != (self.class_names is not None):
            raise EmbeddingsError(
                f"{self.path}'s labels.npy members and the head its {self.name}.json records do not go together; {self.remedy}."
            )
        layer_member = re.compile(r"layer_(0|[1-9][0-9]{0,2})\.npy")
        found = {int(m.group(1)) for members in self.members for ext in members if (m := layer_member.fullmatch(ext))}
        recorded = record.get("layers")
        if not self.members and isinstance(recorded, list):  # a tar with no sample shows no layer of its own
            found = set(recorded)
        self.layers = sorted(found)
        _check_layers(record, self.layers, self.out_dir / f"{self.name}.json", self.remedy)
        for key, members in zip(self.keys, self.members):
            if "json" not in members or not ("emb.npy" in members or "pooled.npy" in members):
                raise EmbeddingsError(f"{self.path} sample {key} lacks its json or vector member; {self.remedy}.")
            if any(f"layer_{i}.npy" not in members for i in self.layers):
                raise EmbeddingsError(f"{self.path} sample {key} lacks one of the layers {self.layers}; {self.remedy}.")
            if members["json"][1] > MAX_JSON_BYTES:
                raise EmbeddingsError(f"{self.path} sample {key} has a json member over {MAX_JSON_BYTES} bytes; {self.remedy}.")

    def _open(self):
        with _as_embeddings_error():
            return open_regular(self.out_dir, f"{self.name}.tar", self.remedy)

    def _read(self, file, row: int, ext: str) -> bytes | None:
        where = self.members[row].get(ext)
        if where is None:
            return None
        file.seek(where[0])
        data = file.read(where[1])
        if len(data) != where[1]:
            raise EmbeddingsError(f"{self.path} is cut off inside sample {self.keys[row]}; {self.remedy}.")
        return data

    def _array(self, file, row: int, ext: str, rank: int, dtypes) -> np.ndarray | None:
        data = self._read(file, row, ext)
        if data is None:
            return None
        where = f"{self.path} member {self.keys[row]}.{ext}"
        with _as_embeddings_error():
            array = load_npy_bytes(data, where, self.remedy)
        if array.ndim != rank or array.dtype not in dtypes:
            raise EmbeddingsError(f"{where} holds {array.dtype} {list(array.shape)}, not a vector array; {self.remedy}.")
        return array

    def _vectors(self, rows: slice, stem: str) -> np.ndarray | None:
        rank = 1 if stem == "pooled" else 3  # [D] or [h, w, D]
        out = []
        with self._open() as f:
            for row in range(*rows.indices(len(self.keys))):
                values = self._array(f, row, f"{stem}.npy", rank, _VALUE_DTYPES)
                if values is None:
                    return None
                scale = self._array(f, row, f"{stem}_scale.npy", rank - 1, (np.dtype("float32"),))
                if (values.dtype == np.int8) != (scale is not None) or (scale is not None and scale.shape != values.shape[:-1]):
                    raise EmbeddingsError(
                        f"{self.path} sample {self.keys[row]}'s {stem}.npy and its scale do not match; {self.remedy}."
                    )
                out.append(decode(values, scale))
                if out[-1].shape != out[0].shape:
                    raise EmbeddingsError(
                        f"{self.path} sample {self.keys[row]}'s {stem}.npy is {list(out[-1].shape)}, an earlier one "
                        f"{list(out[0].shape)}; {self.remedy}."
                    )
        return np.stack(out) if out else None

    def patches(self, rows: slice) -> np.ndarray | None:
        return self._vectors(rows, "emb")

    def pooled(self, rows: slice) -> np.ndarray:
        pooled = self._vectors(rows, "pooled")
        return self.patches(rows).mean(axis=(1, 2)) if pooled is None else pooled

    def layer_maps(self, rows: slice) -> dict[int, np.ndarray]:
        return {i: self._vectors(rows, f"layer_{i}") for i in self.layers}

    def labels(self, rows: slice) -> np.ndarray | None:
        """[B, h, w] class ids of the samples' labels.npy members, each checked to name a recorded class."""
        if self.class_names is None:
            return None
        out: list[np.ndarray] = []
        with self._open() as f:
            for row in range(*rows.indices(len(self.keys))):
                labels = self._array(f, row, "labels.npy", 2, _LABEL_DTYPES)
                assert labels is not None  # every sample has one: checked at open
                beyond = labels.size > 0 and int(labels.max()) >= len(self.class_names)
                if beyond or (out and labels.shape != out[0].shape):
                    raise EmbeddingsError(
                        f"{self.path} sample {self.keys[row]}'s labels.npy holds a class id beyond the "
                        f"{len(self.class_names)} classes its {self.name}.json names, or another grid; {self.remedy}."
                    )
                out.append(labels)
        return np.stack(out) if out else None

    def metadata(self):
        """The same table as the array layout's NAME.parquet, built from the json and in.* members."""
        import pyarrow as pa

        if self.table is None:
            rows = []
            with self._open() as f:
                for row, key in enumerate(self.keys):
                    try:
                        record = json.loads(self._read(f, row, "json"))
                    except (ValueError, RecursionError) as err:
                        raise EmbeddingsError(f"{self.path} member {key}.json is not valid JSON ({err}); {self.remedy}.") from err
                    if not isinstance(record, dict):
                        raise EmbeddingsError(f"{self.path} member {key}.json is not a JSON object; {self.remedy}.")
                    carried = {ext[3:]: self._read(f, row, ext) for ext in self.members[row] if ext.startswith("in.")}
                    rows.append({"key": key, "row": row, "record": record, "members": carried})
            try:
                self.table = metadata_table(rows)
            except (pa.ArrowException, TypeError, ValueError) as err:
                raise EmbeddingsError(f"{self.path} holds json members of the wrong shape ({err}); {self.remedy}.") from err
        return self.table


class Embeddings:
    """The done shards of one OUT_DIR as one sequence of rows; see the module docstring."""

    def __init__(self, out_dir: str | os.PathLike):
        folder = local_folder(out_dir)
        if folder is None:
            raise EmbeddingsError(f"{out_dir} is not a local folder; copy it down (or mount it) and open that.")
        self.out_dir = folder
        if not self.out_dir.is_dir():
            raise EmbeddingsError(f"{self.out_dir} is not a directory; pass the OUT_DIR that `dmtjepa embed` wrote.")
        with _as_embeddings_error():
            records = {}
            for path in sorted(self.out_dir.glob("*.json")):
                record = load_record(self.out_dir, path.stem)
                if record is not None:
                    records[path.stem] = record
            if not records:
                raise EmbeddingsError(f"{self.out_dir} holds no finished shard (no NAME.json of format {OUTPUT_FORMAT}).")
            _check_one_identity(self.out_dir, records)
            self.shards: list[_ArrayShard | _TarShard] = [
                (_ArrayShard if "files" in record else _TarShard)(self.out_dir, name, record) for name, record in records.items()
            ]
            for name, record in records.items():  # after each shard's own checks, which say more where they apply
                _check_sizes(self.out_dir, name, record)
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + len(shard.keys))
        self._index: dict[str, int] | None = None
        # With --pca the stored vectors are coordinates on these axes: float32 [DIM + 1, D], row 0 the mean.
        self.pca = self._projection(next(iter(records.values())).get("identity", {}))
        # With --head, the names of the classes the label maps' ids index (one head: _check_one_identity).
        self.class_names = next((s.class_names for s in self.shards if isinstance(s, _TarShard)), None)

    def _projection(self, identity: dict) -> np.ndarray | None:
        """OUT/pca.npy where the shards were projected (by their identity, or for older ones, its presence)."""
        dim = identity.get("pca")
        if dim is None and ("pca" in identity or not (self.out_dir / PCA_FILE).exists()):
            return None
        remedy = "restore the pca.npy these shards were projected with, or redo them with `dmtjepa embed --overwrite`"
        try:
            matrix, sha256 = read_projection(self.out_dir, None, None, remedy)
        except PcaError as err:
            raise EmbeddingsError(str(err)) from err
        if dim is not None and matrix.shape[0] != dim + 1:
            raise EmbeddingsError(
                f"{self.out_dir / PCA_FILE} holds {matrix.shape[0] - 1} axes, the shards were projected on {dim}; {remedy}."
            )
        if identity.get("pca_sha256") not in (None, sha256):
            raise EmbeddingsError(f"{self.out_dir / PCA_FILE} is not the projection the shards were made with; {remedy}.")
        return matrix

    def unproject(self, vectors: np.ndarray) -> np.ndarray:
        """PCA coordinates [..., DIM] -> the model's space [..., D] (what the dropped axes held is lost)."""
        assert self.pca is not None, "OUT_DIR was written without --pca"
        return self.pca[0] + np.asarray(vectors, np.float32) @ self.pca[1:]

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def keys(self) -> list[str]:
        return [key for shard in self.shards for key in shard.keys]

    def _locate(self, index: int) -> tuple[_ArrayShard | _TarShard, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        s = bisect.bisect_right(self.starts, index) - 1
        return self.shards[s], index - self.starts[s]

    def index_of(self, key: str) -> int:
        """The row of `key` (its first, where shards repeat a key); KeyError if no shard holds it."""
        if self._index is None:
            self._index = {}
            for row, key_ in enumerate(self.keys):
                self._index.setdefault(key_, row)
        return self._index[key]

    def __getitem__(self, item: int | str) -> Embedding:
        """The sample at row `item`, or with key `item`."""
        shard, row = self._locate(self.index_of(item) if isinstance(item, str) else item)
        rows = slice(row, row + 1)
        patches = shard.patches(rows)
        metadata = {"shard": shard.name, **shard.metadata().slice(row, 1).to_pylist()[0]}
        layers = {i: grids[0] for i, grids in shard.layer_maps(rows).items()}
        labels = shard.labels(rows)
        pooled = shard.pooled(rows)[0]
        return Embedding(
            shard.keys[row],
            None if patches is None else patches[0],
            pooled,
            metadata,
            layers,
            None if labels is None else labels[0],
        )

    def batches(self, batch_size: int = 256, patches: bool = True) -> Iterator[Batch]:
        """Rows in order, `batch_size` at a time (a batch never spans two shards); float32."""
        for shard in self.shards:
            for start in range(0, len(shard.keys), batch_size):
                rows = slice(start, start + batch_size)
                grid = shard.patches(rows) if patches else None
                pooled = shard.pooled(rows) if grid is None else _pooled_or_mean(shard, rows, grid)
                layers = shard.layer_maps(rows) if patches else {}
                yield Batch(shard.keys[rows], grid, pooled, layers, shard.labels(rows) if patches else None)

    def pooled(self) -> np.ndarray:
        """The pooled vectors of every row, float32 [N, D]: a read-only memmap where one float32
        array layout shard holds them all, else a concatenation read now."""
        if len(self.shards) == 1 and isinstance(self.shards[0], _ArrayShard):
            shard = self.shards[0]
            if shard.pooled_values is not None and shard.pooled_values.dtype == np.float32:
                return shard.pooled_values
        return np.concatenate([batch.pooled for batch in self.batches(patches=False)])

    def metadata(self):
        """One pyarrow Table of every row: METADATA_COLUMNS (members: extension -> bytes)."""
        import pyarrow as pa

        tables = []
        for shard in self.shards:
            table = shard.metadata()
            tables.append(table.add_column(0, "shard", pa.array([shard.name] * len(table), pa.string())))
        try:
            return pa.concat_tables(tables)
        except pa.ArrowException as err:
            raise EmbeddingsError(
                f"the metadata tables of {self.out_dir}'s shards have different column types ({err}); redo the odd "
                "shards with `dmtjepa embed --overwrite`."
            ) from err

    def dataset(self):
        """A torch Dataset of (patch grid float32 [h, w, D], metadata dict), for heads on frozen features."""
        return EmbeddingDataset(self)


def _check_sizes(out_dir: Path, name: str, record: dict) -> None:
    """Each data file's size must be the one its NAME.json records (`sizes`; older records have none)."""
    for file, size in (record.get("sizes") or {}).items():
        found = os.stat(out_dir / file).st_size  # a regular file inside OUT_DIR: load_record checked it
        if found != size:
            raise EmbeddingsError(
                f"{out_dir / file} is {found} bytes, {name}.json records {size} (the file was replaced, cut off or "
                f"grown since); {_remedy(name)}."
            )


def _check_one_identity(out_dir: Path, records: dict[str, dict]) -> None:
    """Refuse an OUT_DIR whose shards were made by different models or settings."""
    (first, record), *others = records.items()
    for name, other in others:
        for setting in (*VECTOR_IDENTITY, "head_sha256"):  # label maps of two heads do not compare either
            had, has = record.get("identity", {}).get(setting), other.get("identity", {}).get(setting)
            if had != has:
                if setting.endswith("sha256"):
                    had, has = str(had)[:12], str(has)[:12]
                raise EmbeddingsError(
                    f"{out_dir} mixes shards made with other models or settings ({first} has {setting} {had!r}, {name} "
                    f"{has!r}), whose vectors do not compare; move each set of shards to a folder of its own and open that."
                )


def _pooled_or_mean(shard, rows: slice, grid: np.ndarray) -> np.ndarray:
    stored = shard.pooled_values is not None if isinstance(shard, _ArrayShard) else "pooled.npy" in shard.members[rows.start]
    return shard.pooled(rows) if stored else grid.mean(axis=(1, 2))


class EmbeddingDataset:
    """torch.utils.data.Dataset protocol over Embeddings (no torch import until items are taken)."""

    def __init__(self, embeddings: Embeddings):
        self.embeddings = embeddings
        self._metadata = None

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int):
        import torch

        if self._metadata is None:  # read once: a row lookup per item would reread the table
            self._metadata = self.embeddings.metadata().to_pylist()
        item = self.embeddings[index]
        grid = item.patches if item.patches is not None else item.pooled
        return torch.from_numpy(np.array(grid, dtype=np.float32)), self._metadata[index]  # a copy: memmaps are read-only


def open_embeddings(out_dir: str | os.PathLike) -> Embeddings:
    """The embeddings in OUT_DIR (tar or array layout), read back as float32; see `Embeddings`."""
    return Embeddings(out_dir)
