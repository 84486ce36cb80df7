"""In-memory embedding: a list of images (bytes, paths, Pillow images or arrays) -> patch embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from dmt_jepa.serve.backends import Backend, BackendError, checked_run, load_backend
from dmt_jepa.serve.images import DEFAULT_MAX_PIXELS, RESIZE_POLICIES, ImageRejected, Preprocess, prepare, prepare_array

ImageLike = bytes | str | os.PathLike | Image.Image | np.ndarray


def preprocess_for(
    backend: Backend, size: tuple[int, int] | None = None, resize: str = "crop", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Preprocess:
    """The preprocessing a backend's model expects; `size` [H, W] defaults to the training size."""
    if resize not in RESIZE_POLICIES:
        raise BackendError(f"unknown resize policy {resize!r}; choose one of {', '.join(RESIZE_POLICIES)}.")
    info = backend.info
    size = cast("tuple[int, int]", tuple(size if size is not None else info.img_size))
    backend.check_size(size)
    return Preprocess(
        size=size,
        patch_size=info.patch_size,
        pixel_mean=cast("tuple[float, float, float]", tuple(info.pixel_mean)),  # lists where the info came from JSON
        pixel_std=cast("tuple[float, float, float]", tuple(info.pixel_std)),
        resize=resize,
        max_pixels=max_pixels,
    )


def _prepare_one(image: ImageLike, prep: Preprocess) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        return prepare(image, prep)[0]
    return prepare_array(image, prep)[0]


def embed_images(
    model: str | os.PathLike | Backend,
    images: Sequence[ImageLike],
    *,
    backend: str = "auto",
    precision: str | None = None,
    size: tuple[int, int] | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[np.ndarray]:
    """Patch embeddings float32 [h, w, D] per image, preprocessed and run exactly as `dmtjepa embed` does.

    An image that cannot be used raises ImageRejected naming its index; nothing is skipped silently.
    """
    runner = model if isinstance(model, Backend) else load_backend(model, backend, precision)
    prep = preprocess_for(runner, size, resize, max_pixels)
    inputs = []
    for index, image in enumerate(images):
        try:
            inputs.append(_prepare_one(image, prep))
        except ImageRejected as err:
            raise ImageRejected(f"image {index}: {err}") from err
    embeddings: list[np.ndarray] = []
    for start in range(0, len(inputs), batch_size):
        batch = np.stack(inputs[start : start + batch_size])  # uint8 [B, H, W, 3]
        grid = (checked_run(runner, batch)[0] if start == 0 else runner.run_pixels(batch))[0]
        embeddings.extend(grid)
    return embeddings
