"""`--pca DIM`: patch vectors projected on the principal axes of the job's own patches.

The projection is fitted once, on the patches of the first images of the input (in input order,
so every worker that fits it fits the same one), and stored as OUT/pca.npy, float32 [DIM + 1, D]:
row 0 the mean, rows 1.. the axes by decreasing variance. Every shard is projected with that file;
its sha256 is part of the run identity, so a shard made with another projection is never mixed
in, and a rerun asking another DIM is refused.
    stored = (x - mean) @ axes.T          x ~= mean + stored @ axes
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmt_jepa.serve.backends import Backend
from dmt_jepa.serve.images import ImageRejected, Preprocess, prepare
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.safe_read import FileRefused, load_npy_bytes, read_bytes
from dmt_jepa.serve.safe_write import writable
from dmt_jepa.serve.shards import ShardReader, open_source

PCA_FILE = "pca.npy"
# [DIM + 1, D] float32 is 6.6 MB at D = 1280; a larger file is not a projection this job wrote.
MAX_PCA_BYTES = 64 << 20
_REFIT = "pass --overwrite to refit it and redo every shard, or choose another OUT_DIR"
FIT_IMAGES = 256  # x (h * w) patches: 50 000 at 224 px and patch 16, ample for the axes of D <= 1280


class PcaError(ValueError):
    """The projection cannot be fitted or does not match OUT_DIR's; one sentence for the user."""


def _sample_pixels(shards: Sequence[ShardSource], prep: Preprocess, count: int) -> list[np.ndarray]:
    pixels: list[np.ndarray] = []
    for source in shards:
        try:
            with open_source(source.url) as stream:
                for sample in ShardReader(stream, images_only=True):
                    try:
                        pixels.append(prepare(sample.image()[1], prep)[0])
                    except ImageRejected:
                        continue
                    if len(pixels) == count:
                        return pixels
        except OSError:
            continue  # an unreadable shard is the job's to report
    return pixels


def fit(runner: Backend, prep: Preprocess, shards: Sequence[ShardSource], dim: int, images: int = FIT_IMAGES) -> np.ndarray:
    """float32 [dim + 1, D]: the mean patch vector, then the top `dim` principal axes."""
    pixels = _sample_pixels(shards, prep, images)
    vectors = []
    for start in range(0, len(pixels), 32):
        grid = runner.run_pixels(np.stack(pixels[start : start + 32]))[0]  # [B, h, w, D]
        vectors.append(grid.reshape(-1, grid.shape[-1]).astype(np.float64))
    if not vectors or sum(map(len, vectors)) <= dim:
        raise PcaError(f"--pca {dim} needs more than {dim} patch vectors to fit on, and the input's images give fewer.")
    patches = np.concatenate(vectors)  # [N, D]
    if dim > patches.shape[1]:
        raise PcaError(f"--pca {dim} is more than the model's {patches.shape[1]} dimensions; choose at most that.")
    if not np.isfinite(patches).all():
        raise PcaError(
            "the model gives non-finite embeddings (NaN or inf) on the images --pca is fitted on; its weights are "
            "damaged or overflow: check the model file, or try --precision fp32."
        )
    mean = patches.mean(axis=0)
    try:
        _, _, axes = np.linalg.svd(patches - mean, full_matrices=False)
    except np.linalg.LinAlgError as err:
        raise PcaError(f"fitting --pca {dim} failed ({err}); check the model file, or run without --pca.") from err
    axes = axes[:dim]
    axes *= np.where(axes[np.arange(dim), np.abs(axes).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]  # a fixed sign per axis
    return np.concatenate([mean[None], axes]).astype(np.float32)


def load_or_fit(
    out_dir: Path, runner: Backend, prep: Preprocess, shards: Sequence[ShardSource], dim: int, refit: bool
) -> tuple[np.ndarray, str]:
    """OUT/pca.npy as (matrix, sha256): the one there (refused if of another DIM), else fitted and stored."""
    path = writable(out_dir, PCA_FILE)
    if os.path.lexists(path) and not refit:
        return read_projection(out_dir, dim, runner.info.embed_dim, _REFIT)
    matrix = fit(runner, prep, shards, dim)
    partial = writable(out_dir, f".{PCA_FILE}.{os.getpid()}.partial")
    with open(partial, "wb") as f:  # a file object: np.save would add .npy to a name
        np.save(f, matrix, allow_pickle=False)
    if refit:
        os.replace(partial, path)
    else:
        try:  # a worker that fitted at the same moment may have stored one already: use that one
            os.link(partial, path)
        except FileExistsError:
            pass
        partial.unlink()
    return read_projection(out_dir, dim, runner.info.embed_dim, _REFIT)


def read_projection(out_dir: Path, dim: int | None, width: int | None, remedy: str) -> tuple[np.ndarray, str]:
    """OUT/pca.npy as (float32 [dim + 1, width], sha256 of the file), checked; PcaError in one sentence.

    `dim` and `width` are what the caller expects (None: any); `remedy` ends the sentence.
    """
    path = out_dir / PCA_FILE
    try:
        data = read_bytes(out_dir, PCA_FILE, MAX_PCA_BYTES, remedy)
        matrix = load_npy_bytes(data, str(path), remedy)
    except FileRefused as err:
        raise PcaError(str(err)) from err
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.dtype != np.float32:
        raise PcaError(f"{path} holds {matrix.dtype} {list(matrix.shape)}, not float32 [DIM + 1, D]; {remedy}.")
    if dim is not None and matrix.shape[0] - 1 != dim:
        raise PcaError(
            f"OUT_DIR {out_dir} was projected with --pca {matrix.shape[0] - 1}, this run asks --pca {dim}; rerun "
            "with the same DIM, choose another OUT_DIR, or pass --overwrite to refit and redo every shard."
        )
    if width is not None and matrix.shape[1] != width:
        raise PcaError(f"{path} projects {matrix.shape[1]}-dimensional vectors, the model gives {width}; {remedy}.")
    if not np.isfinite(matrix).all():
        raise PcaError(f"{path} holds non-finite values (NaN or inf); {remedy}.")
    return matrix, hashlib.sha256(data).hexdigest()


def project(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """float [..., D] -> float32 [..., DIM]."""
    return ((np.asarray(vectors, np.float32) - matrix[0]) @ matrix[1:].T).astype(np.float32)
