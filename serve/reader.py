"""Reading an OUT_DIR back: `open_embeddings(OUT_DIR)` over either layout, in float32.

Only shards whose NAME.json marks them done are read; the rows of all shards are numbered in
shard-name order, then in each shard's own order. The array layout is read through memmaps, so
opening costs a header read per file whatever the size; the tar layout is indexed once (member
offsets from the tar headers) and each sample is read at its offset on access.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from serve.layouts import metadata_table
from serve.pca import PCA_FILE
from serve.quantize import decode
from serve.shards import OUTPUT_FORMAT, read_record

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


@dataclass
class Batch:
    keys: list[str]
    patches: np.ndarray | None  # [B, h, w, D]
    pooled: np.ndarray  # [B, D]


class _ArrayShard:
    def __init__(self, out_dir: Path, name: str, record: dict):
        import pyarrow.parquet as pq

        self.name, self.record = name, record
        files = set(record["files"])

        def load(part: str) -> np.ndarray | None:
            file = f"{name}.{part}.npy"
            return np.load(out_dir / file, mmap_mode="r") if file in files else None

        self.patch_values, self.patch_scale = load("patches"), load("patches_scale")
        self.pooled_values, self.pooled_scale = load("pooled"), load("pooled_scale")
        self.table = pq.read_table(out_dir / f"{name}.parquet")
        self.keys = self.table.column("key").to_pylist()

    def patches(self, rows: slice) -> np.ndarray | None:
        if self.patch_values is None:
            return None
        return decode(self.patch_values[rows], None if self.patch_scale is None else self.patch_scale[rows])

    def pooled(self, rows: slice) -> np.ndarray:
        if self.pooled_values is None:
            return self.patches(rows).mean(axis=(1, 2))
        return decode(self.pooled_values[rows], None if self.pooled_scale is None else self.pooled_scale[rows])

    def metadata(self):
        return self.table


class _TarShard:
    def __init__(self, out_dir: Path, name: str, record: dict):
        self.name, self.record, self.path = name, record, out_dir / f"{name}.tar"
        self.members: list[dict[str, tuple[int, int]]] = []  # per row: extension -> (offset, size)
        names: list[str] = []
        with tarfile.open(self.path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if not names or names[-1] != stem:
                    names.append(stem)
                    self.members.append({})
                self.members[-1][ext] = (member.offset_data, member.size)
        self.keys = [unquote(stem, errors="surrogateescape") for stem in names]
        self.table = None

    def _read(self, file, row: int, ext: str) -> bytes | None:
        where = self.members[row].get(ext)
        if where is None:
            return None
        file.seek(where[0])
        return file.read(where[1])

    def _vectors(self, rows: slice, stem: str) -> np.ndarray | None:
        out = []
        with open(self.path, "rb") as f:
            for row in range(*rows.indices(len(self.keys))):
                values = self._read(f, row, f"{stem}.npy")
                if values is None:
                    return None
                scale = self._read(f, row, f"{stem}_scale.npy")
                out.append(decode(np.load(io.BytesIO(values)), None if scale is None else np.load(io.BytesIO(scale))))
        return np.stack(out) if out else None

    def patches(self, rows: slice) -> np.ndarray | None:
        return self._vectors(rows, "emb")

    def pooled(self, rows: slice) -> np.ndarray:
        pooled = self._vectors(rows, "pooled")
        return self.patches(rows).mean(axis=(1, 2)) if pooled is None else pooled

    def metadata(self):
        """The same table as the array layout's NAME.parquet, built from the json and in.* members."""
        if self.table is None:
            rows = []
            with open(self.path, "rb") as f:
                for row, key in enumerate(self.keys):
                    record = json.loads(self._read(f, row, "json"))
                    carried = {ext[3:]: self._read(f, row, ext) for ext in self.members[row] if ext.startswith("in.")}
                    rows.append({"key": key, "row": row, "record": record, "members": carried})
            self.table = metadata_table(rows)
        return self.table


class Embeddings:
    """The done shards of one OUT_DIR as one sequence of rows; see the module docstring."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise EmbeddingsError(f"{self.out_dir} is not a directory; pass the OUT_DIR that `dmtjepa embed` wrote.")
        self.shards: list[_ArrayShard | _TarShard] = []
        for path in sorted(self.out_dir.glob("*.json")):
            record = read_record(self.out_dir, path.stem)
            if record is None:
                continue
            kind = _ArrayShard if "files" in record else _TarShard
            self.shards.append(kind(self.out_dir, path.stem, record))
        if not self.shards:
            raise EmbeddingsError(f"{self.out_dir} holds no finished shard (no NAME.json of format {OUTPUT_FORMAT}).")
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + len(shard.keys))
        self._index: dict[str, int] | None = None
        # With --pca the stored vectors are coordinates on these axes: float32 [DIM + 1, D], row 0 the mean.
        self.pca = np.load(self.out_dir / PCA_FILE) if (self.out_dir / PCA_FILE).exists() else None

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
        return Embedding(shard.keys[row], None if patches is None else patches[0], shard.pooled(rows)[0], metadata)

    def batches(self, batch_size: int = 256, patches: bool = True) -> Iterator[Batch]:
        """Rows in order, `batch_size` at a time (a batch never spans two shards); float32."""
        for shard in self.shards:
            for start in range(0, len(shard.keys), batch_size):
                rows = slice(start, start + batch_size)
                grid = shard.patches(rows) if patches else None
                pooled = shard.pooled(rows) if grid is None else _pooled_or_mean(shard, rows, grid)
                yield Batch(shard.keys[rows], grid, pooled)

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
        return pa.concat_tables(tables)

    def dataset(self):
        """A torch Dataset of (patch grid float32 [h, w, D], metadata dict), for heads on frozen features."""
        return EmbeddingDataset(self)


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
