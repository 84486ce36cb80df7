"""A seeded dense benchmark built on the spot from images that ship inside installed packages.

Each scene is a crop of a real photo (scikit-learn's and scikit-image's bundled photos) with one
to three of scikit-learn's handwritten digits (8x8 scans, 1797 samples) scaled up, tinted and
pasted on it. Per pixel the label is 0 for background and 1 + d where digit d is visible
(its upscaled ink is at least half of full strength); the image label is the class of the
dominant digit, the one that covers the most labelled pixels (ties go to the lower class); and
for detection, one box per placed digit that stays visible: the extent of its own labelled pixels
after later digits are pasted over it, class = the digit.
Train and test scenes draw from disjoint photos and disjoint digit samples.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 10  # image-level classes: the digits 0-9
NUM_SEG_CLASSES = 11  # per-pixel classes: background + 10 digits
SPLITS = ("train", "test")

# Bundled photos, split once and for all so that no test scene shares a source image with train.
# Every name loads from the installed wheel without a download.
TRAIN_PHOTOS = (
    "sklearn:china",
    "skimage:astronaut",
    "skimage:coffee",
    "skimage:rocket",
    "skimage:immunohistochemistry",
    "skimage:brick",
    "skimage:grass",
    "skimage:camera",
)
TEST_PHOTOS = (
    "sklearn:flower",
    "skimage:chelsea",
    "skimage:hubble_deep_field",
    "skimage:gravel",
    "skimage:moon",
)
DIGIT_TEST_EVERY = 5  # digit sample i is held out for test when i % 5 == 4
INK_THRESHOLD = 0.5  # fraction of full ink above which a pixel is labelled as the digit
MAX_DIGITS = 2


@dataclass(frozen=True)
class Placement:
    """One digit pasted on a scene: which 8x8 scan, where, how large and in which colour."""

    sample: int  # index into sklearn's digits
    top: int
    left: int
    size: int  # side of the square the 8x8 scan is resized to, in pixels
    color: tuple[int, int, int]


@dataclass
class Scene:
    """An RGB image with its image label, per-pixel label map and one box per visible digit."""

    image: np.ndarray  # [H, W, 3] uint8
    label: int  # class of the dominant digit
    seg: np.ndarray  # [H, W] uint8, 0 = background, 1 + d = digit d
    sources: dict  # the photo and digit samples it was built from
    boxes: list[dict] = field(default_factory=list)  # {"box": [x0, y0, x1, y1] pixel edges, "digit": d}


def _load_photo(name: str) -> np.ndarray:
    """Load one bundled photo as [H, W, 3] uint8."""
    package, item = name.split(":")
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(f"{item}.jpg")
    else:
        import skimage.data

        photo = getattr(skimage.data, item)()
    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))


@lru_cache(maxsize=None)
def photos(split: str) -> tuple[np.ndarray, ...]:
    """The background photos of a split."""
    return tuple(_load_photo(name) for name in (TRAIN_PHOTOS if split == "train" else TEST_PHOTOS))


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's handwritten digits: ink in [0, 1] as [1797, 8, 8] float32, and their classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_samples(split: str) -> np.ndarray:
    """Indices of the digit samples a split may use (disjoint between train and test)."""
    n = len(digits()[1])
    held_out = np.arange(n) % DIGIT_TEST_EVERY == DIGIT_TEST_EVERY - 1
    return np.flatnonzero(held_out if split == "test" else ~held_out)


def compose(background: np.ndarray, placements: list[Placement]) -> Scene:
    """Paste digits on a background in order (later ones on top) and derive both labels."""
    image = background.astype(np.float32)
    seg = np.zeros(background.shape[:2], dtype=np.uint8)
    owner = np.full(background.shape[:2], -1, dtype=np.int64)  # which placement labels each pixel
    ink_all, classes = digits()
    height, width = seg.shape
    for index, p in enumerate(placements):
        # Bilinear upscaling of the 8x8 scan gives a soft ink mask of the requested size.
        ink = np.asarray(Image.fromarray(ink_all[p.sample]).resize((p.size, p.size), Image.BILINEAR))
        # Faint ink (the scans' grey fringe) is dropped and strong ink made opaque, so that no
        # square outline shows; alpha crosses 1/2 exactly where the label changes.
        alpha = np.clip((ink - INK_THRESHOLD) * 2.0 + 0.5, 0.0, 1.0)
        top, left = max(p.top, 0), max(p.left, 0)
        bottom, right = min(p.top + p.size, height), min(p.left + p.size, width)
        if bottom <= top or right <= left:
            continue
        alpha = alpha[top - p.top : bottom - p.top, left - p.left : right - p.left, None]  # clip to the scene
        region = image[top:bottom, left:right]
        region[:] = alpha * np.asarray(p.color, np.float32) + (1.0 - alpha) * region
        seg[top:bottom, left:right][alpha[:, :, 0] >= 0.5] = 1 + classes[p.sample]
        owner[top:bottom, left:right][alpha[:, :, 0] >= 0.5] = index
    counts = np.bincount(seg.ravel(), minlength=NUM_SEG_CLASSES)[1:]
    label = int(np.argmax(counts))  # argmax returns the lowest class among ties
    sources = {"digits": [p.sample for p in placements]}
    boxes = []
    for index, p in enumerate(placements):
        rows, cols = np.nonzero(owner == index)
        if len(rows):  # a digit wholly covered by later ones, or outside the scene, has no box
            box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            boxes.append({"box": box, "digit": int(classes[p.sample])})
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), label, seg, sources, boxes)


def _crop_background(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a photo (a quarter to all of its short side), resized and maybe flipped."""
    short = min(photo.shape[:2])
    side = int(rng.integers(max(short // 4, min(size, short)), short + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    crop = np.asarray(crop)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _contrasting_color(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random hue whose brightness stands out from the background it covers."""
    hue = rng.random()
    saturation = rng.uniform(0.3, 1.0)
    dark = background.mean() > 127.5
    value = rng.uniform(0.05, 0.35) if dark else rng.uniform(0.7, 1.0)
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def make_scene(split: str, index: int, *, seed: int = 0, image_size: int = 96) -> Scene:
    """Scene `index` of a split; it depends only on (split, index, seed, image_size)."""
    assert split in SPLITS, split
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    split_photos = photos(split)
    photo_id = int(rng.integers(len(split_photos)))
    background = _crop_background(split_photos[photo_id], image_size, rng)
    pool = digit_samples(split)
    placements = []
    for i in range(int(rng.integers(1, MAX_DIGITS + 1))):
        # The first digit is large so that most scenes have a clear dominant class.
        low, high = (0.5, 0.8) if i == 0 else (0.2, 0.35)
        size = int(round(image_size * rng.uniform(low, high)))
        top = int(rng.integers(-size // 8, image_size - size + size // 8 + 1))
        left = int(rng.integers(-size // 8, image_size - size + size // 8 + 1))
        under = background[max(top, 0) : top + size, max(left, 0) : left + size]
        placements.append(Placement(int(rng.choice(pool)), top, left, size, _contrasting_color(under, rng)))
    scene = compose(background, placements)
    names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    scene.sources["photo"] = names[photo_id]
    return scene


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (RGB or single channel)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(out_dir: Path, split: str, count: int, seed: int, image_size: int, shard_size: int) -> dict:
    """Write one split's shards, each aside then renamed, and return its summary."""
    import webdataset as wds

    paths = []
    class_counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    pixel_counts = np.zeros(NUM_SEG_CLASSES, dtype=np.int64)
    for shard, start in enumerate(range(0, count, shard_size)):
        path = out_dir / f"{split}-{shard:06d}.tar"
        partial = path.with_name(path.name + ".partial")
        with wds.TarWriter(str(partial)) as sink:
            for index in range(start, min(start + shard_size, count)):
                scene = make_scene(split, index, seed=seed, image_size=image_size)
                class_counts[scene.label] += 1
                pixel_counts += np.bincount(scene.seg.ravel(), minlength=NUM_SEG_CLASSES)
                sink.write(
                    {
                        "__key__": f"{split}-{index:07d}",
                        "png": _png(scene.image),
                        "cls": str(scene.label).encode(),
                        "seg.png": _png(scene.seg),
                        "boxes.json": json.dumps(scene.boxes).encode(),
                    }
                )
        os.replace(partial, path)
        paths.append(str(path))
    return {
        "paths": paths,
        "count": count,
        "class_counts": class_counts.tolist(),
        "pixel_class_counts": pixel_counts.tolist(),
    }


class ScenesError(ValueError):
    """A request for scene shards that cannot be honoured; the message says what to do."""


def write_scene_shards(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 96,
    shard_size: int = 1000,
) -> dict:
    """Write `train-NNNNNN.tar` and `test-NNNNNN.tar` scene shards and `scenes.json`; return the summary."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ScenesError(f"ask for at least one scene (got --train {n_train} --test {n_test}).")
    if shard_size < 1:
        raise ScenesError(f"shard size must be at least 1, got {shard_size}.")
    if image_size < 16:
        raise ScenesError(f"image size must be at least 16 pixels, got {image_size}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ScenesError(f"{out} exists and is not a directory; choose another output directory.")
    existing = sorted(out.glob("train-*.tar")) + sorted(out.glob("test-*.tar")) if out.is_dir() else []
    if existing:
        raise ScenesError(f"{out} already holds scene shards ({existing[0].name}); choose an empty directory.")
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "out_dir": str(out),
        "seed": seed,
        "image_size": image_size,
        "num_classes": NUM_CLASSES,
        "num_seg_classes": NUM_SEG_CLASSES,
        "photos": {"train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)},
        "train": _write_split(out, "train", n_train, seed, image_size, shard_size),
        "test": _write_split(out, "test", n_test, seed, image_size, shard_size),
    }
    (out / "scenes.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
