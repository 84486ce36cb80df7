"""Image decoding and the resize policy: bytes of any common format -> uint8 [H, W, 3] model-size pixels.

Decode workers return uint8 pixels (a quarter of the bytes of float32 through their pipes) and the
backend normalises whole batches, on the GPU where there is one. This module imports neither torch
nor onnxruntime, so that decode worker processes stay light.

Policy (documented in docs/embed.md):
- EXIF orientation is applied first; "original size" is the upright image's [height, width].
- Colour: palette, grayscale, alpha, CMYK and 16-bit images become 8-bit RGB (alpha is dropped,
  16-bit values are scaled to 8 bits).
- `crop` (default): scale so the shorter side fills the target, then cut the centre.
  `pad`: scale so the whole image fits, place it at the top-left, fill the rest with the pixel
  mean (zero after normalisation); the sample's json then says which pixels hold the image.
- Resampling is bicubic with antialiasing (Pillow); JPEGs are first decoded at the smallest
  DCT scale that still covers the target, which is much faster for large photos.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("crop", "pad")
# Far above any photo a camera makes, far below what exhausts memory (a 400 MP RGB image is 1.2 GB).
DEFAULT_MAX_PIXELS = 178_956_970
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# `crop` scales the whole image, then cuts, up to this many times the target's area (aspect 8:1);
# beyond, it resamples only the region it keeps, so no intermediate grows with the aspect ratio.
MAX_SCALED_AREA = 8


class ImageRejected(ValueError):
    """An input image that cannot be embedded; the message is the reason recorded for it."""


class EncodedJpeg(NamedTuple):
    """A JPEG left for the device to decode (`embed --decode gpu`): its header was read and checked here."""

    data: bytes
    orientation: int  # EXIF orientation, 1 (upright) to 8, applied after decoding
    size: tuple[int, int]  # the upright image's [height, width]


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes a model input."""

    size: tuple[int, int]  # [H, W] of the model input, multiples of patch_size
    patch_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    resize: str = "crop"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        assert self.resize in RESIZE_POLICIES, self.resize
        assert all(s % self.patch_size == 0 for s in self.size), (self.size, self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha dropped, 16/32-bit and float scaled to 0..255)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit) and I (32-bit, how 16-bit PNGs load)
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 1.0
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) <= 1.0:  # float images are usually 0..1
            values = values * 255.0
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return image.convert("RGB")


def _target_size(height: int, width: int, prep: Preprocess) -> tuple[int, int]:
    """[height, width] the image is scaled to before cropping or padding."""
    out_h, out_w = prep.size
    if prep.resize == "crop":  # cover the target; never below it after rounding
        scale = max(out_h / height, out_w / width)
        return max(out_h, round(height * scale)), max(out_w, round(width * scale))
    scale = min(out_h / height, out_w / width)  # fit inside the target; never above it after rounding
    return max(1, min(out_h, round(height * scale))), max(1, min(out_w, round(width * scale)))


_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own decompression-bomb limit set to ours while decoding, so that --max-pixels can raise it.

    Pillow checks it in many places (open, GIF frames, ICO sizes), so it is set for the whole decode;
    the lock keeps decodes in threads of one process from restoring each other's value early.
    """
    with _LIMIT_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _without_addresses(err: Exception) -> str:
    """The error's text without object reprs (`<_io.BytesIO object at 0x7f...>`), which change per run."""
    return re.sub(r"<[^<>]* at 0x[0-9A-Fa-f]+>", "the image bytes", str(err))


def open_image(data: bytes, prep: Preprocess, *, leave_jpeg: bool = False) -> tuple[Image.Image | EncodedJpeg, tuple[int, int]]:
    """Decode `data` into an upright RGB image ready for resizing, and its original [height, width].

    With `leave_jpeg`, an RGB or grayscale JPEG passes every header check but is not decoded:
    it comes back as an EncodedJpeg for the device. Other images (CMYK JPEGs too) are decoded here.
    """
    if not data:
        raise ImageRejected("the image member is empty (0 bytes)")
    with warnings.catch_warnings(), _pillow_limit(prep.max_pixels):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            # Both checks hold whatever the orientation, and must come before getexif(), which
            # decodes a whole PNG to find an EXIF chunk after the pixels.
            if width * height > prep.max_pixels:
                raise ImageRejected(
                    f"the image declares {width}x{height} pixels, more than the limit of {prep.max_pixels} "
                    "(a decompression bomb or an absurd size; raise --max-pixels if it is real)"
                )
            if height < prep.patch_size or width < prep.patch_size:
                raise ImageRejected(
                    f"the image is {width}x{height} pixels, smaller than one {prep.patch_size}x{prep.patch_size} patch"
                )
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in SWAPS_AXES:
                width, height = height, width
            if leave_jpeg and image.format == "JPEG" and image.mode in ("RGB", "L"):
                return EncodedJpeg(data, orientation if orientation in range(1, 9) else 1, (height, width)), (height, width)
            if image.format == "JPEG":
                draft_h, draft_w = _target_size(height, width, prep)
                if orientation in SWAPS_AXES:
                    draft_h, draft_w = draft_w, draft_h
                image.draft("RGB", (draft_w, draft_h))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected(f"decompression bomb refused by Pillow ({err} Raise --max-pixels if it is real.)") from err
        except Exception as err:  # untrusted bytes: Pillow raises many types (OSError, SyntaxError, ...)
            raise ImageRejected(f"cannot decode the image ({type(err).__name__}: {_without_addresses(err)})") from err
    return image, (height, width)


def geometry_record(height: int, width: int, prep: Preprocess) -> dict:
    """The sample's geometry record for an upright [height, width] image under the resize policy."""
    geometry: dict = {"input_size": list(prep.size), "grid": list(prep.grid), "resize": prep.resize}
    if prep.resize == "pad":
        geometry["content"] = list(_target_size(height, width, prep))  # rows [0, h) and columns [0, w) hold the image
    return geometry


def crop_plan(height: int, width: int, prep: Preprocess) -> tuple[int, int, int, int, bool]:
    """`crop`: the scaled size, the crop's top-left, and whether to scale whole (else only the kept region)."""
    out_h, out_w = prep.size
    new_h, new_w = _target_size(height, width, prep)
    return new_h, new_w, (new_h - out_h) // 2, (new_w - out_w) // 2, new_h * new_w <= MAX_SCALED_AREA * out_h * out_w


def resize(image: Image.Image, prep: Preprocess) -> tuple[np.ndarray, dict]:
    """Apply the resize policy: RGB image -> uint8 [H, W, 3] and the sample's geometry record."""
    out_h, out_w = prep.size
    new_h, new_w = _target_size(image.height, image.width, prep)
    geometry = geometry_record(image.height, image.width, prep)
    if prep.resize == "crop":
        _, _, top, left, whole = crop_plan(image.height, image.width, prep)
        if whole:
            scaled = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            pixels = np.asarray(scaled.crop((left, top, left + out_w, top + out_h)))
        else:
            # An extreme aspect ratio (1,000,000 x 16 -> 64 x 4,000,000 at 64 px) would make the
            # scaled image gigabytes: resample only the source region the crop covers. Same
            # geometry; Pillow may then run its two passes in the other order, a few grey levels apart.
            sy, sx = image.height / new_h, image.width / new_w
            box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
            pixels = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box))
    else:
        scaled = image.resize((new_w, new_h), Image.Resampling.BICUBIC)  # fits inside the target: never larger than it
        fill = tuple(round(m * 255) for m in prep.pixel_mean)
        canvas = Image.new("RGB", (out_w, out_h), fill)
        canvas.paste(scaled, (0, 0))
        pixels = np.asarray(canvas)
    return pixels, geometry


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: scaled to 0..1, then standardised per channel."""
    x = (pixels.astype(np.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def prepare(data: bytes, prep: Preprocess) -> tuple[np.ndarray, dict]:
    """Encoded image bytes -> uint8 [H, W, 3] model-size pixels and its json record; ImageRejected if unusable."""
    image, original = open_image(data, prep)
    pixels, geometry = resize(image, prep)
    return pixels, {"original_size": list(original), **geometry}


def prepare_leaving_jpeg(data: bytes, prep: Preprocess) -> tuple[np.ndarray | EncodedJpeg, dict]:
    """`prepare` for `embed --decode gpu`: RGB and grayscale JPEGs stay encoded (checked, with their record)."""
    image, original = open_image(data, prep, leave_jpeg=True)
    if isinstance(image, EncodedJpeg):
        return image, {"original_size": list(original), **geometry_record(*original, prep)}
    pixels, geometry = resize(image, prep)
    return pixels, {"original_size": list(original), **geometry}


def prepare_array(image: np.ndarray | Image.Image, prep: Preprocess) -> tuple[np.ndarray, dict]:
    """Same as `prepare` for an image already in memory (Pillow image or [H, W], [H, W, 1|3|4] uint8 array)."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageRejected(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {list(image.shape)}")
        array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if array.dtype != np.uint8:
            raise ImageRejected(f"an image array must be uint8 (0..255), got {array.dtype}")
        image = Image.fromarray(array)
    height, width = image.height, image.width
    if height < prep.patch_size or width < prep.patch_size:
        raise ImageRejected(f"the image is {width}x{height} pixels, smaller than one {prep.patch_size}x{prep.patch_size} patch")
    pixels, geometry = resize(to_rgb(image), prep)
    return pixels, {"original_size": [height, width], **geometry}
