"""The array layouts: per input shard, arrays that load as one memmap and a Parquet table.

    OUT/NAME.patches.npy        [N, h, w, D] in the output dtype (absent with pooled-only)
    OUT/NAME.patches_scale.npy  [N, h, w] float32, int8 only: the scale of each patch vector
    OUT/NAME.pooled.npy         [N, D] (with --pooled or --pooled-only), NAME.pooled_scale.npy [N] for int8
    OUT/NAME.layer_<i>.npy      [N, h, w, D] per --layers block (NAME.layer_<i>_scale.npy [N, h, w] for int8)
    OUT/NAME.parquet            one row per embedded sample: key, row, geometry, carried members
    OUT/NAME.json               written last: the done marker, as in the tar layout

The embedding-reader layout is the same writer with clip-retrieval's folder convention, pooled
vectors only, in float16 or float32 (what embedding-reader reads):

    OUT/img_emb/img_emb_NAME.npy       [N, D]
    OUT/metadata/metadata_NAME.parquet the table above, row i describing vector i
    OUT/NAME.json                      the done marker

embedding-reader pairs the two folders' files by sorted name, and skips an empty .npy: a shard
with no embedded sample therefore writes neither file. Every table carries, in its Parquet schema
metadata under the key `dmt_jepa`, what its arrays are (`table_metadata`): a reader needs no
other file to know the dtype, width, grid, model and how to get float32 back.

A table is bound to its own arrays, not only to their row count: its `crc32` column holds, per
row, the CRC-32 of that row's stored bytes in each array, so arrays of equal length swapped
between shards (a sync tool, a manual merge of two runs) or damaged are told apart from the
ones written with the table (serve/reader.py checks them); NAME.json records each array's size
(`sizes`), not the table's, which a tool may rewrite in another order.

Rows are streamed to files aside as batches arrive, so memory does not grow with the shard: array
rows at once, table rows (with the carried members) as Parquet row groups of bounded size. The
.npy header, whose shape needs the final count, is written into a fixed reserved block at commit.
Every file is renamed into place before NAME.json, so a shard is never seen done half-written.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dmt_jepa.serve.quantize import encode
from dmt_jepa.serve.safe_write import checked, writable
from dmt_jepa.serve.shards import (
    OUTPUT_FORMAT,
    OUTPUT_FORMAT_VERSION,
    ShardOutput,
    _fsync,
    close_quietly,
    embedding_reader_files,
    write_done_record,
)

LAYOUTS = ("tar", "array", "embedding-reader")
EMBEDDING_READER_DIRS = ("img_emb", "metadata")
SCHEMA_METADATA_KEY = b"dmt_jepa"  # the Parquet schema metadata entry that describes the arrays (JSON)
_HEADER_BYTES = 128  # magic + length + dict padded: fits any shape of four dimensions up to 10^18 rows
# Table rows held before they go to the file aside as one Parquet row group: whichever bound comes first.
TABLE_GROUP_ROWS = 1024
TABLE_GROUP_BYTES = 4 << 20  # carried member bytes


@dataclass(frozen=True)
class OutputSpec:
    """What each shard's output holds, from the job's options."""

    layout: str = "tar"
    dtype: str = "float16"
    pooled: bool = False  # pooled vectors beside the patch grids
    pooled_only: bool = False  # pooled vectors and no patch grids
    layers: tuple[int, ...] = ()  # blocks written beside the final grid

    @property
    def patches(self) -> bool:
        return not self.pooled_only and self.layout != "embedding-reader"

    @property
    def writes_pooled(self) -> bool:
        return self.pooled or self.pooled_only or self.layout == "embedding-reader"

    def array_files(self, name: str) -> dict[str, str]:
        """Each array's file, relative to OUT_DIR, by part (`patches`, `pooled_scale`, `layer_3`, ...)."""
        if self.layout == "embedding-reader":
            return {"pooled": embedding_reader_files(name)[0]}
        stems = (["patches"] if self.patches else []) + (["pooled"] if self.writes_pooled else [])
        stems += [f"layer_{i}" for i in self.layers]
        parts = [p for stem in stems for p in ((stem, f"{stem}_scale") if self.dtype == "int8" else (stem,))]
        return {part: f"{name}.{part}.npy" for part in parts}

    def bytes_per_image(self, grid: tuple[int, int], dim: int) -> int:
        """About what one embedded image takes on disk in this layout (its arrays; in a tar, with the member
        headers), not counting the members it carries."""
        itemsize = np.dtype(self.dtype).itemsize
        cells = grid[0] * grid[1]
        parts = self.array_files("_")
        total = 0
        for part in parts:
            per_vector = 4 if part.endswith("_scale") else dim * itemsize
            total += per_vector * (1 if part.startswith("pooled") else cells)
        if self.layout == "tar":  # each member: a 512-byte header, a 128-byte .npy header, padding to 512; and the json
            total += (len(parts) + 1) * 1024
        return total

    def table_file(self, name: str) -> str:
        return embedding_reader_files(name)[1] if self.layout == "embedding-reader" else f"{name}.parquet"


def dequantisation_rule(dtype: str) -> str:
    """How float32 vectors come back from stored values, in words (serve/quantize.py)."""
    if dtype == "int8":
        return (
            "float32 = int8 value * scale, the scale read from the array named PART_scale at the same row "
            "(and grid cell): one float32 per vector, max |v| / 127"
        )
    return f"float32 = the stored {dtype} values"


def table_metadata(spec: OutputSpec, name: str, grid: tuple[int, int], dim: int, about: dict) -> dict:
    """What a shard's arrays are, for its table's schema metadata: format, files, dtype, width, grid,
    layers, model identity and the rule that turns stored values into float32.

    `about`: the job's description of the run (model, backend, precision, input size, resize,
    identity, pca where vectors are projected).
    """
    arrays = {}
    for part, file in spec.array_files(name).items():
        scale = part.endswith("_scale")
        cells = [] if part.startswith("pooled") else list(grid)  # pooled: one vector per row, else one per grid cell
        shape = ["N", *cells, *([] if scale else [dim])]
        arrays[part] = {"file": file, "dtype": "float32" if scale else spec.dtype, "shape": shape}
    meta = {
        "format": OUTPUT_FORMAT,
        "format_version": OUTPUT_FORMAT_VERSION,
        "shard": name,
        "layout": spec.layout,
        "dtype": spec.dtype,
        "dim": dim,
        "grid": list(grid),
        "layers": list(spec.layers),
        "arrays": arrays,
        "rows": "row i of every array is the table row whose `row` column is i",
        "row_crc32": (
            "the crc32 column maps each array part to the CRC-32 (zlib) of its row's stored bytes, C order, "
            "as the .npy file holds them after its header"
        ),
        "dequantize": dequantisation_rule(spec.dtype),
        **{k: about[k] for k in ("model", "backend", "precision", "input_size", "resize", "identity") if k in about},
    }
    if about.get("identity", {}).get("pca") is not None:
        meta["pca"] = {
            "file": "pca.npy",
            "dim": about["identity"]["pca"],
            "sha256": about["identity"].get("pca_sha256"),
            "rule": "vectors are coordinates on pca.npy's axes: model-space = pca[0] + vector @ pca[1:]",
        }
    return meta


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly _HEADER_BYTES bytes, so data can be written before it."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    body_len = _HEADER_BYTES - 10
    assert len(text) + 1 <= body_len, shape
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (text.ljust(body_len - 1) + "\n").encode("latin1")


class _RowFile:
    """Rows of one fixed shape and dtype appended to a file aside, then given their .npy header."""

    def __init__(self, partial: Path, final: Path):
        self.partial, self.final = partial, final
        self.file: BinaryIO | None = None
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None

    def append(self, row: np.ndarray) -> int:
        """Write one row; its CRC-32, which the table keeps."""
        if self.file is None:
            self.file = open(self.partial, "wb")
            self.file.write(bytes(_HEADER_BYTES))
            self.row_shape, self.dtype = row.shape, row.dtype
        assert row.shape == self.row_shape and row.dtype == self.dtype
        data = np.ascontiguousarray(row).tobytes()
        self.file.write(data)
        self.rows += 1
        return zlib.crc32(data)

    def finish(self, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Write the header (an empty array where no row came) and flush; not yet renamed."""
        if self.file is None:
            self.file = open(self.partial, "wb")
            self.row_shape, self.dtype = row_shape, np.dtype(dtype)
        self.file.seek(0)
        self.file.write(npy_header(self.dtype, (self.rows, *self.row_shape)))
        self.file.close()
        _fsync(self.partial)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            close_quietly(self.file)  # the disk that failed a write fails the flush too: the file goes anyway


class ArrayShardOutput(ShardOutput):
    """The array layouts' files for one input shard; same interface and guarantees as ShardOutput.

    Files aside are written in OUT_DIR itself (`.NAME.PART.npy.OWNER.partial`) and renamed into
    their folder at commit, so leftovers of a killed run are found as in the other layouts.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        owner: str,
        spec: OutputSpec,
        grid: tuple[int, int],
        dim: int,
        about: dict | None = None,
    ):
        super().__init__(out_dir, name, owner)
        self.out_dir, self.name, self.spec, self.grid, self.dim = out_dir, name, spec, tuple(grid), dim
        suffix = f".{owner}.partial" if owner else ".partial"
        self.files = spec.array_files(name)
        self.arrays = {
            part: _RowFile(writable(out_dir, f".{name}.{part}.npy{suffix}"), checked(out_dir, file))
            for part, file in self.files.items()
        }
        self.table_partial = writable(out_dir, f".{name}.parquet{suffix}")
        self.table_path = checked(out_dir, spec.table_file(name))
        self.table = _TableFile(self.table_partial, table_metadata(spec, name, self.grid, dim, about or {}))

    def add(self, key, embedding, record, pooled=None, carried=None, layers=None, labels=None) -> None:
        assert labels is None, "--head is refused with the array layouts (serve/embed_rules.py)"
        stems = [("patches", embedding), ("pooled", pooled)]
        stems += [(f"layer_{index}", grid) for index, grid in (layers or {}).items()]
        crc32 = {}
        for stem, vectors in stems:
            if stem in self.arrays:
                values, scale = encode(vectors, self.spec.dtype)
                crc32[stem] = self.arrays[stem].append(values)
                if scale is not None:
                    crc32[f"{stem}_scale"] = self.arrays[f"{stem}_scale"].append(scale)
        row = {"key": key, "row": self.embedded, "record": record, "members": carried or {}, "crc32": crc32}
        self.table.append(row)
        self.embedded += 1

    def _row_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        value = "int8" if self.spec.dtype == "int8" else self.spec.dtype
        shapes = {"pooled": ((self.dim,), value), "pooled_scale": ((), "float32")}
        for stem in ["patches", *(f"layer_{i}" for i in self.spec.layers)]:
            shapes[stem], shapes[f"{stem}_scale"] = ((*self.grid, self.dim), value), (self.grid, "float32")
        return shapes

    def commit(self, record: dict) -> None:
        try:
            shapes = self._row_shapes()
            for part, rows in self.arrays.items():
                rows.finish(*shapes[part])
            self.table.finish()
            # embedding-reader skips an empty .npy but not its table, so the folders would pair wrongly: none is kept.
            keep = self.spec.layout != "embedding-reader" or self.embedded > 0
            files = [*self.files.values(), self.spec.table_file(self.name)] if keep else []
            # the arrays' sizes; not the table's, which tools may rewrite (in another order, recompressed)
            sizes = {file: os.path.getsize(rows.partial) for file, rows in zip(files, self.arrays.values())}
            if keep:
                for file in files:
                    writable(self.out_dir, file)  # its folder made, and checked again: it may have been replaced since
                for rows in self.arrays.values():
                    os.replace(rows.partial, rows.final)
                os.replace(self.table_partial, self.table_path)
            self._discard_partials()
            record = {**record, "files": files, "sizes": sizes}
            write_done_record(self.json_partial, self.json_path, record, self.embedded, self.failures)
        except BaseException:
            self.abort()
            raise

    def _discard_partials(self) -> None:
        for rows in self.arrays.values():
            rows.close()
            rows.partial.unlink(missing_ok=True)
        self.table.close()
        self.table_partial.unlink(missing_ok=True)

    def abort(self) -> None:
        self._discard_partials()
        self.json_partial.unlink(missing_ok=True)


class _TableFile:
    """NAME.parquet aside: table rows held until a row group's worth, then appended to the file."""

    def __init__(self, partial: Path, metadata: dict):
        self.partial = partial
        self.metadata = {SCHEMA_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        self.held: list[dict] = []
        self.held_bytes = 0
        self.writer: Any = None  # a pyarrow ParquetWriter once the first rows come

    def append(self, row: dict) -> None:
        self.held.append(row)
        self.held_bytes += sum(map(len, row["members"].values()))
        if len(self.held) >= TABLE_GROUP_ROWS or self.held_bytes >= TABLE_GROUP_BYTES:
            self._write()

    def _write(self) -> None:
        import pyarrow.parquet as pq

        table = metadata_table(self.held, crc32=True)
        table = table.replace_schema_metadata(self.metadata)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.partial, table.schema, compression="zstd")
        self.writer.write_table(table)
        self.held, self.held_bytes = [], 0

    def finish(self) -> None:
        """Write what is held (an empty table where no row came) and flush; not yet renamed."""
        if self.held or self.writer is None:
            self._write()
        self.writer.close()
        _fsync(self.partial)

    def close(self) -> None:
        close_quietly(self.writer)


def metadata_table(rows: list[dict], crc32: bool = False):
    """One row per embedded sample, in row order: key, row, geometry, carried members by extension;
    with `crc32`, each row's CRC-32 per array part (the array layouts' binding to their arrays)."""
    import pyarrow as pa

    def column(name: str) -> list:
        return [row["record"].get(name) for row in rows]

    digests = (
        {"crc32": pa.array([sorted(row["crc32"].items()) for row in rows], pa.map_(pa.string(), pa.uint32()))} if crc32 else {}
    )
    return pa.table(
        {
            "key": pa.array([row["key"] for row in rows], pa.string()),
            "row": pa.array([row["row"] for row in rows], pa.int64()),
            "original_size": pa.array(column("original_size"), pa.list_(pa.int32())),
            "input_size": pa.array(column("input_size"), pa.list_(pa.int32())),
            "grid": pa.array(column("grid"), pa.list_(pa.int32())),
            "resize": pa.array(column("resize"), pa.string()),
            "content": pa.array(column("content"), pa.list_(pa.int32())),
            "members": pa.array([sorted(row["members"].items()) for row in rows], pa.map_(pa.string(), pa.binary())),
            "not_carried": pa.array([row["record"].get("not_carried", []) for row in rows], pa.list_(pa.string())),
            **digests,
        }
    )


def open_output(
    out_dir: Path, name: str, owner: str, spec: OutputSpec, grid: tuple[int, int], dim: int, about: dict | None = None
) -> ShardOutput:
    """The writer of one shard's output in the spec's layout; `about` describes the run (`table_metadata`)."""
    if spec.layout != "tar":
        return ArrayShardOutput(out_dir, name, owner, spec, grid, dim, about)
    return ShardOutput(out_dir, name, owner, dtype=spec.dtype, patches=spec.patches)
