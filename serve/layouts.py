"""The array layout: per input shard, arrays that load as one memmap and a Parquet table.

    OUT/NAME.patches.npy        [N, h, w, D] in the output dtype (absent with pooled-only)
    OUT/NAME.patches_scale.npy  [N, h, w] float32, int8 only: the scale of each patch vector
    OUT/NAME.pooled.npy         [N, D] (with --pooled or --pooled-only), NAME.pooled_scale.npy [N] for int8
    OUT/NAME.parquet            one row per embedded sample: key, row, geometry, carried members
    OUT/NAME.json               written last: the done marker, as in the tar layout

Rows are streamed to files aside as batches arrive, so memory does not grow with the shard: array
rows at once, table rows (with the carried members) as Parquet row groups of bounded size. The
.npy header, whose shape needs the final count, is written into a fixed reserved block at commit.
Every file is renamed into place before NAME.json, so a shard is never seen done half-written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.quantize import encode
from serve.shards import ShardOutput, _fsync, close_quietly, write_done_record

LAYOUTS = ("tar", "array")
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

    @property
    def patches(self) -> bool:
        return not self.pooled_only

    @property
    def writes_pooled(self) -> bool:
        return self.pooled or self.pooled_only


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
        self.file = None
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None

    def append(self, row: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.partial, "wb")
            self.file.write(bytes(_HEADER_BYTES))
            self.row_shape, self.dtype = row.shape, row.dtype
        assert row.shape == self.row_shape and row.dtype == self.dtype
        self.file.write(np.ascontiguousarray(row).tobytes())
        self.rows += 1

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
            self.file.close()


class ArrayShardOutput(ShardOutput):
    """The array layout's files for one input shard; same interface and guarantees as ShardOutput."""

    def __init__(self, out_dir: Path, name: str, owner: str, spec: OutputSpec, grid: tuple[int, int], dim: int):
        super().__init__(out_dir, name, owner)
        self.name, self.spec, self.grid, self.dim = name, spec, tuple(grid), dim
        suffix = f".{owner}.partial" if owner else ".partial"
        self.arrays: dict[str, _RowFile] = {}
        stems = (["patches"] if spec.patches else []) + (["pooled"] if spec.writes_pooled else [])
        for stem in stems:
            for part in (stem, f"{stem}_scale") if spec.dtype == "int8" else (stem,):
                self.arrays[part] = _RowFile(out_dir / f".{name}.{part}.npy{suffix}", out_dir / f"{name}.{part}.npy")
        self.table_partial = out_dir / f".{name}.parquet{suffix}"
        self.table_path = out_dir / f"{name}.parquet"
        self.table = _TableFile(self.table_partial)

    def add(self, key, embedding, record, pooled=None, carried=None) -> None:
        for stem, vectors in (("patches", embedding), ("pooled", pooled)):
            if stem in self.arrays:
                values, scale = encode(vectors, self.spec.dtype)
                self.arrays[stem].append(values)
                if scale is not None:
                    self.arrays[f"{stem}_scale"].append(scale)
        self.table.append({"key": key, "row": self.embedded, "record": record, "members": carried or {}})
        self.embedded += 1

    def _row_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        value = "int8" if self.spec.dtype == "int8" else self.spec.dtype
        return {
            "patches": ((*self.grid, self.dim), value),
            "patches_scale": (self.grid, "float32"),
            "pooled": ((self.dim,), value),
            "pooled_scale": ((), "float32"),
        }

    def commit(self, record: dict) -> None:
        try:
            shapes = self._row_shapes()
            for part, rows in self.arrays.items():
                rows.finish(*shapes[part])
            self.table.finish()
            for rows in self.arrays.values():
                os.replace(rows.partial, rows.final)
            os.replace(self.table_partial, self.table_path)
            files = [rows.final.name for rows in self.arrays.values()] + [self.table_path.name]
            write_done_record(self.json_partial, self.json_path, {**record, "files": files}, self.embedded, self.failures)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for rows in self.arrays.values():
            rows.close()
            rows.partial.unlink(missing_ok=True)
        self.table.close()
        self.table_partial.unlink(missing_ok=True)
        self.json_partial.unlink(missing_ok=True)


class _TableFile:
    """NAME.parquet aside: table rows held until a row group's worth, then appended to the file."""

    def __init__(self, partial: Path):
        self.partial = partial
        self.held: list[dict] = []
        self.held_bytes = 0
        self.writer = None

    def append(self, row: dict) -> None:
        self.held.append(row)
        self.held_bytes += sum(map(len, row["members"].values()))
        if len(self.held) >= TABLE_GROUP_ROWS or self.held_bytes >= TABLE_GROUP_BYTES:
            self._write()

    def _write(self) -> None:
        import pyarrow.parquet as pq

        table = metadata_table(self.held)
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


def metadata_table(rows: list[dict]):
    """One row per embedded sample, in row order: key, row, geometry, carried members by extension."""
    import pyarrow as pa

    def column(name: str) -> list:
        return [row["record"].get(name) for row in rows]

    return pa.table(
        {
            "key": pa.array([row["key"] for row in rows], pa.string()),
            "row": pa.array([row["row"] for row in rows], pa.int64()),
            "original_size": pa.array(column("original_size"), pa.list_(pa.int32())),
            "input_size": pa.array(column("input_size"), pa.list_(pa.int32())),
            "grid": pa.array(column("grid"), pa.list_(pa.int32())),
            "resize": pa.array(column("resize"), pa.string()),
            "content": pa.array(column("content"), pa.list_(pa.int32())),
            "members": pa.array(
                [sorted(row["members"].items()) for row in rows], pa.map_(pa.string(), pa.binary())
            ),
            "not_carried": pa.array([row["record"].get("not_carried", []) for row in rows], pa.list_(pa.string())),
        }
    )


def open_output(out_dir: Path, name: str, owner: str, spec: OutputSpec, grid: tuple[int, int], dim: int) -> ShardOutput:
    """The writer of one shard's output in the spec's layout."""
    if spec.layout == "array":
        return ArrayShardOutput(out_dir, name, owner, spec, grid, dim)
    return ShardOutput(out_dir, name, owner, dtype=spec.dtype, patches=spec.patches)

