"""A seeded dense benchmark built on the spot from images that ship inside installed packages.

Each scene is a crop of a real photo (scikit-learn's and scikit-image's bundled photos) with one
or two objects pasted on it, each tinted with a random colour. Two kinds of objects:
- `digits`: scikit-learn's handwritten digits (8x8 scans, 1797 samples) scaled up; 10 classes;
- `shapes`: procedurally drawn outlines (`dmt_jepa.shapes`: disc, square, triangle, ...), any
  rotation; 8 classes told apart by outline alone, so a patch inside a shape needs its context.
Per pixel the label is 0 for background and 1 + c where an object of class c is visible (its
opacity is at least 1/2); the image label is the class of the dominant object, the one that covers
the most labelled pixels (ties go to the lower class); and for detection, one box per placed object
that stays visible: the extent of its own labelled pixels after later objects are pasted over it.
Train and test scenes draw from disjoint photos (and, for digits, disjoint digit samples).
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmt_jepa.shapes import SHAPES, TEXTURES, shape_alpha, texture

NUM_CLASSES = 10  # image-level classes of the digits kind: the digits 0-9
NUM_SEG_CLASSES = 11  # per-pixel classes of the digits kind: background + 10 digits
SPLITS = ("train", "test")
# Kind of object -> its class names (image-level classes; per pixel, background is one more).
KINDS = {"digits": tuple(str(d) for d in range(10)), "shapes": SHAPES, "textures": TEXTURES}
BACKGROUNDS = ("photo", "plain")  # a crop of a bundled photo, or a plain colour with a gentle gradient
# colour: objects in random contrasting hues (a plain background a random colour); mono: objects in black and
# white (a texture's two colours are both), a plain background one grey: nothing but outline and texture varies.
PALETTES = ("colour", "mono")
Progress = Callable[[str, int, int], None]  # (split, scenes made, scenes in the split)

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

    @property
    def cls(self) -> int:
        return int(digits()[1][self.sample])

    def paint(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.color, np.float32), (self.size, self.size, 3))

    def alpha(self) -> np.ndarray:
        """Opacity [size, size]: the bilinearly upscaled ink, its faint fringe dropped and strong ink made opaque."""
        ink = np.asarray(Image.fromarray(digits()[0][self.sample]).resize((self.size, self.size), Image.Resampling.BILINEAR))
        # No square outline shows; alpha crosses 1/2 exactly where the ink crosses INK_THRESHOLD.
        return np.clip((ink - INK_THRESHOLD) * 2.0 + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class ShapePlacement:
    """One procedural shape pasted on a scene: its class, rotation, place, size and colour."""

    shape: int  # index into SHAPES
    angle: float  # rotation in radians
    top: int
    left: int
    size: int  # side of the square the shape is drawn in, in pixels
    color: tuple[int, int, int]

    @property
    def cls(self) -> int:
        return self.shape

    def alpha(self) -> np.ndarray:
        return shape_alpha(SHAPES[self.shape], self.size, self.angle)

    def paint(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.color, np.float32), (self.size, self.size, 3))


@dataclass(frozen=True)
class TexturePlacement:
    """A shape of any outline filled with a texture: the texture is the class, drawn from its own seed."""

    texture: int  # index into TEXTURES
    pattern_seed: int  # period, phase and orientation of the texture
    shape: int  # outline, any of SHAPES: not the class
    angle: float
    top: int
    left: int
    size: int
    color: tuple[int, int, int]
    second: tuple[int, int, int]  # the texture's other colour

    @property
    def cls(self) -> int:
        return self.texture

    def alpha(self) -> np.ndarray:
        return shape_alpha(SHAPES[self.shape], self.size, self.angle)

    def paint(self) -> np.ndarray:
        pattern = texture(TEXTURES[self.texture], self.size, np.random.default_rng(self.pattern_seed))[:, :, None]
        return pattern * np.asarray(self.color, np.float32) + (1.0 - pattern) * np.asarray(self.second, np.float32)


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


@cache
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


def compose(background: np.ndarray, placements: Sequence[Placement | ShapePlacement | TexturePlacement]) -> Scene:
    """Paste objects on a background in order (later ones on top) and derive both labels."""
    image = background.astype(np.float32)
    seg = np.zeros(background.shape[:2], dtype=np.uint8)
    owner = np.full(background.shape[:2], -1, dtype=np.int64)  # which placement labels each pixel
    height, width = seg.shape
    for index, p in enumerate(placements):
        alpha = p.alpha()
        top, left = max(p.top, 0), max(p.left, 0)
        bottom, right = min(p.top + p.size, height), min(p.left + p.size, width)
        if bottom <= top or right <= left:
            continue
        alpha = alpha[top - p.top : bottom - p.top, left - p.left : right - p.left, None]  # clip to the scene
        region = image[top:bottom, left:right]
        paint = p.paint()[top - p.top : bottom - p.top, left - p.left : right - p.left]
        region[:] = alpha * paint + (1.0 - alpha) * region
        seg[top:bottom, left:right][alpha[:, :, 0] >= 0.5] = 1 + p.cls
        owner[top:bottom, left:right][alpha[:, :, 0] >= 0.5] = index
    counts = np.bincount(seg.ravel(), minlength=256)[1:]
    label = int(np.argmax(counts))  # argmax returns the lowest class among ties
    if placements and isinstance(placements[0], TexturePlacement):
        sources = {"textures": [TEXTURES[p.texture] for p in placements], "shapes": [SHAPES[p.shape] for p in placements]}
    elif placements and isinstance(placements[0], ShapePlacement):
        sources = {"shapes": [SHAPES[p.shape] for p in placements]}
    else:
        sources = {"digits": [p.sample for p in placements]}
    boxes = []
    for index, p in enumerate(placements):
        rows, cols = np.nonzero(owner == index)
        if len(rows):  # a digit wholly covered by later ones, or outside the scene, has no box
            box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            boxes.append({"box": box, "digit": p.cls})
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), label, seg, sources, boxes)


def _crop_background(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a photo (a quarter to all of its short side), resized and maybe flipped."""
    short = min(photo.shape[:2])
    side = int(rng.integers(max(short // 4, min(size, short)), short + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    picture = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
    crop = np.asarray(picture)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _plain_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random colour with a gentle linear gradient across the scene: [size, size, 3] uint8."""
    base = rng.uniform(30.0, 225.0, size=3)
    slope = rng.uniform(-30.0, 30.0, size=(2, 3))  # change over the whole side, per channel
    ramp = np.linspace(-0.5, 0.5, size)
    image = base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _plain_grey(size: int, rng: np.random.Generator) -> np.ndarray:
    """One mid grey over the whole scene: [size, size, 3] uint8."""
    return np.full((size, size, 3), int(rng.uniform(96, 160)), np.uint8)


def _black_or_white(rng: np.random.Generator) -> tuple[int, int, int]:
    return (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)


def _contrasting_color(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random hue whose brightness stands out from the background it covers."""
    hue = rng.random()
    saturation = rng.uniform(0.3, 1.0)
    dark = background.mean() > 127.5
    value = rng.uniform(0.05, 0.35) if dark else rng.uniform(0.7, 1.0)
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def _place(image_size: int, low: float, high: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, size) of an object whose side is a fraction low..high of the scene; it may hang over by 1/8."""
    size = int(round(image_size * rng.uniform(low, high)))
    top = int(rng.integers(-size // 8, image_size - size + size // 8 + 1))
    left = int(rng.integers(-size // 8, image_size - size + size // 8 + 1))
    return top, left, size


def _digit_placements(split: str, image_size: int, background: np.ndarray, rng: np.random.Generator) -> list[Placement]:
    pool = digit_samples(split)
    placements = []
    for i in range(int(rng.integers(1, MAX_DIGITS + 1))):
        # The first digit is large so that most scenes have a clear dominant class.
        top, left, size = _place(image_size, *((0.5, 0.8) if i == 0 else (0.2, 0.35)), rng)
        under = background[max(top, 0) : top + size, max(left, 0) : left + size]
        placements.append(Placement(int(rng.choice(pool)), top, left, size, _contrasting_color(under, rng)))
    return placements


def _shape_placements(image_size: int, background: np.ndarray, rng: np.random.Generator, mono: bool) -> list[ShapePlacement]:
    placements = []
    for i in range(int(rng.integers(1, MAX_DIGITS + 1))):
        # The first shape is large (a dominant class, several patches across); a second is smaller.
        top, left, size = _place(image_size, *((0.45, 0.75) if i == 0 else (0.25, 0.4)), rng)
        under = background[max(top, 0) : top + size, max(left, 0) : left + size]
        shape, angle = int(rng.integers(len(SHAPES))), float(rng.uniform(0.0, 2 * np.pi))
        color = _black_or_white(rng) if mono else _contrasting_color(under, rng)
        placements.append(ShapePlacement(shape, angle, top, left, size, color))
    return placements


def _second_color(color: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A texture's other colour: the same hue family, brighter or darker by a visible step."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in color))
    value = value - 0.35 if value > 0.5 else value + 0.35
    hue = (hue + rng.uniform(-0.1, 0.1)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, min(max(value, 0.0), 1.0))
    return round(255 * red), round(255 * green), round(255 * blue)


def _texture_placements(image_size: int, background: np.ndarray, rng: np.random.Generator, mono: bool) -> list[TexturePlacement]:
    placements = []
    for i in range(int(rng.integers(1, MAX_DIGITS + 1))):
        top, left, size = _place(image_size, *((0.45, 0.75) if i == 0 else (0.25, 0.4)), rng)
        under = background[max(top, 0) : top + size, max(left, 0) : left + size]
        cls, pattern_seed = int(rng.integers(len(TEXTURES))), int(rng.integers(2**31))
        shape, angle = int(rng.integers(len(SHAPES))), float(rng.uniform(0.0, 2 * np.pi))
        if mono:
            color = _black_or_white(rng)
            second = (255 - color[0],) * 3
        else:
            color = _contrasting_color(under, rng)
            second = _second_color(color, rng)
        placements.append(TexturePlacement(cls, pattern_seed, shape, angle, top, left, size, color, second))
    return placements


def make_scene(
    split: str,
    index: int,
    *,
    seed: int = 0,
    image_size: int = 96,
    kind: str = "digits",
    background: str = "photo",
    palette: str = "colour",
) -> Scene:
    """Scene `index` of a split; it depends only on (split, index, seed, image_size, kind, background, palette)."""
    assert split in SPLITS, split
    assert kind in KINDS, kind
    assert background in BACKGROUNDS, background
    assert palette in PALETTES, palette
    assert kind != "digits" or palette == "colour", "digits come in colour only"
    mono = palette == "mono"
    key = [seed, SPLITS.index(split), index] + ([] if kind == "digits" else [list(KINDS).index(kind)])
    key += [] if background == "photo" else [BACKGROUNDS.index(background)]
    rng = np.random.default_rng(key)
    split_photos = photos(split)
    photo_id = int(rng.integers(len(split_photos)))
    if background == "photo":
        canvas = _crop_background(split_photos[photo_id], image_size, rng)
    else:
        canvas = _plain_grey(image_size, rng) if mono else _plain_background(image_size, rng)
    if kind == "digits":
        scene = compose(canvas, _digit_placements(split, image_size, canvas, rng))
    elif kind == "shapes":
        scene = compose(canvas, _shape_placements(image_size, canvas, rng, mono))
    else:
        scene = compose(canvas, _texture_placements(image_size, canvas, rng, mono))
    names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    scene.sources["photo"] = names[photo_id]
    return scene


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (RGB or single channel)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(
    out_dir: Path, split: str, count: int, seed: int, image_size: int, shard_size: int, look: dict, progress: Progress
) -> dict:
    """Write one split's shards, each aside then renamed, and return its summary; `progress(split, made, count)` after each scene."""
    import webdataset as wds

    paths = []
    classes = len(KINDS[look["kind"]])
    class_counts = np.zeros(classes, dtype=np.int64)
    pixel_counts = np.zeros(classes + 1, dtype=np.int64)
    for shard, start in enumerate(range(0, count, shard_size)):
        path = out_dir / f"{split}-{shard:06d}.tar"
        partial = path.with_name(path.name + ".partial")
        with wds.TarWriter(str(partial)) as sink:
            for index in range(start, min(start + shard_size, count)):
                scene = make_scene(split, index, seed=seed, image_size=image_size, **look)
                class_counts[scene.label] += 1
                pixel_counts += np.bincount(scene.seg.ravel(), minlength=classes + 1)
                sink.write(
                    {
                        "__key__": f"{split}-{index:07d}",
                        "png": _png(scene.image),
                        "cls": str(scene.label).encode(),
                        "seg.png": _png(scene.seg),
                        "boxes.json": json.dumps(scene.boxes).encode(),
                    }
                )
                progress(split, index + 1, count)
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


def scenes_problems(kind: str, background: str, palette: str, prefix: str = "--") -> list[str]:
    """What is wrong with a look of the scenes, each a phrase naming its option: `prefix` + kind|background|palette."""
    problems = []
    for name, value, allowed in (
        ("kind", kind, tuple(KINDS)),
        ("background", background, BACKGROUNDS),
        ("palette", palette, PALETTES),
    ):
        if value not in allowed:
            problems.append(f"{prefix}{name} must be one of {', '.join(allowed)}, got {value!r}")
    if kind == "digits" and palette != "colour":
        problems.append(f"digit scenes come in colour only: set {prefix}kind to shapes or textures for {prefix}palette mono")
    return problems


def write_scene_shards(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 96,
    shard_size: int = 1000,
    kind: str = "digits",
    background: str = "photo",
    palette: str = "colour",
    progress: Progress | None = None,
) -> dict:
    """Write `train-NNNNNN.tar` and `test-NNNNNN.tar` scene shards and `scenes.json`; return the summary.

    `progress(split, made, count)` is called after each scene (the drawing itself does not depend on it).
    """
    progress = progress or (lambda split, made, count: None)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ScenesError(f"ask for at least one scene (got --train {n_train} --test {n_test}).")
    if shard_size < 1:
        raise ScenesError(f"shard size must be at least 1, got {shard_size}.")
    problems = scenes_problems(kind, background, palette)
    if problems:
        raise ScenesError(f"{problems[0]}.")
    if image_size < 16:
        raise ScenesError(f"image size must be at least 16 pixels, got {image_size}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ScenesError(f"{out} exists and is not a directory; choose another output directory.")
    existing = sorted(out.glob("train-*.tar")) + sorted(out.glob("test-*.tar")) if out.is_dir() else []
    if existing:
        raise ScenesError(f"{out} already holds scene shards ({existing[0].name}); choose an empty directory.")
    out.mkdir(parents=True, exist_ok=True)
    look = {"kind": kind, "background": background, "palette": palette}
    summary = {
        "out_dir": str(out),
        "seed": seed,
        "image_size": image_size,
        "kind": kind,
        "background": background,
        "palette": palette,
        "class_names": list(KINDS[kind]),
        "num_classes": len(KINDS[kind]),
        "num_seg_classes": len(KINDS[kind]) + 1,
        "photos": {"train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)},
        "train": _write_split(out, "train", n_train, seed, image_size, shard_size, look, progress),
        "test": _write_split(out, "test", n_test, seed, image_size, shard_size, look, progress),
    }
    (out / "scenes.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
