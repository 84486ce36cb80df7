"""Procedural shapes and textures of the scenes benchmark: areas worked by hand, rotation, labels from pixels."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from dmt_jepa.scenes import KINDS, ScenesError, ShapePlacement, TexturePlacement, compose, make_scene, write_scene_shards
from dmt_jepa.shapes import SHAPES, TEXTURES, shape_alpha, texture

# Share of the drawing square [-1, 1]^2 (area 4) each shape covers, worked by hand from its definition.
AREAS = {
    "disc": math.pi * 0.9**2 / 4,
    "square": (2 * 0.72) ** 2 / 4,
    "cross": (2 * (1.8 * 0.6) - 0.6**2) / 4,  # two 1.8 x 0.6 bars less their shared 0.6 x 0.6 square
    "ring": math.pi * (0.95**2 - 0.5**2) / 4,
    "triangle": (3 * math.sqrt(3) / 4 * 0.95**2) / 4,  # equilateral, circumradius 0.95
}


@pytest.mark.parametrize("shape", sorted(AREAS))
def test_shape_area_matches_its_definition(shape: str) -> None:
    alpha = shape_alpha(shape, 64, 0.0)
    assert alpha.mean() == pytest.approx(AREAS[shape], abs=0.005)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_rotation_keeps_the_area_and_moves_the_pixels(shape: str) -> None:
    upright, turned = shape_alpha(shape, 64, 0.0), shape_alpha(shape, 64, 0.7)
    assert turned.mean() == pytest.approx(upright.mean(), rel=0.03)
    if shape not in ("disc", "ring"):  # every other outline changes under a rotation of 0.7 rad
        assert np.abs(turned - upright).mean() > 0.02


def test_shapes_are_told_apart_by_outline() -> None:
    """No two shapes draw the same mask at the same size and rotation, and the ring has its hole."""
    masks = {shape: shape_alpha(shape, 32, 0.3) >= 0.5 for shape in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.05, (a, b)
    assert not masks["ring"][16, 16] and masks["disc"][16, 16]


@pytest.mark.parametrize("name", TEXTURES)
def test_texture_patterns_cover_what_their_definition_says(name: str) -> None:
    pattern = texture(name, 64, np.random.default_rng(0))
    assert pattern.shape == (64, 64) and set(np.unique(pattern)) <= {0.0, 1.0}
    share = {
        "plain": 1.0,
        "stripes": 0.5,
        "checks": 0.5,
        "dots": math.pi * 0.3**2,
        "speckle": 0.5,
        "grid": 1 - 0.8**2,
        "zigzag": 0.5,
        "rings": 0.5,
    }[name]
    assert pattern.mean() == pytest.approx(share, abs=0.08)


def test_textures_vary_in_phase_but_keep_their_class_statistics() -> None:
    a, b = texture("stripes", 32, np.random.default_rng(1)), texture("stripes", 32, np.random.default_rng(2))
    assert not np.array_equal(a, b) and abs(a.mean() - b.mean()) < 0.1


def test_compose_labels_a_shape_by_its_class_where_it_is_opaque() -> None:
    background = np.zeros((32, 32, 3), np.uint8)
    square = ShapePlacement(SHAPES.index("square"), 0.0, 4, 4, 20, (200, 10, 10))
    scene = compose(background, [square])
    expected = np.zeros((32, 32), np.uint8)
    opaque = shape_alpha("square", 20, 0.0) >= 0.5
    expected[4:24, 4:24][opaque] = 1 + SHAPES.index("square")
    assert np.array_equal(scene.seg, expected) and scene.label == SHAPES.index("square")
    assert scene.boxes == [
        {
            "box": [
                4 + int(np.nonzero(opaque.any(0))[0][0]),
                4 + int(np.nonzero(opaque.any(1))[0][0]),
                4 + int(np.nonzero(opaque.any(0))[0][-1]) + 1,
                4 + int(np.nonzero(opaque.any(1))[0][-1]) + 1,
            ],
            "digit": SHAPES.index("square"),
        }
    ]
    assert (scene.image[expected > 0] == [200, 10, 10]).all()


def test_a_textured_shape_is_labelled_by_its_texture_and_painted_with_it() -> None:
    background = np.full((32, 32, 3), 128, np.uint8)
    cls = TEXTURES.index("stripes")
    placed = TexturePlacement(cls, 7, SHAPES.index("square"), 0.0, 0, 0, 32, (255, 255, 255), (0, 0, 0))
    scene = compose(background, [placed])
    inside = scene.seg > 0
    assert set(np.unique(scene.seg[inside])) == {1 + cls} and scene.label == cls
    pattern = texture("stripes", 32, np.random.default_rng(7))
    fully = shape_alpha("square", 32, 0.0) == 1.0
    assert np.array_equal(scene.image[fully][:, 0], np.where(pattern[fully] == 1.0, 255, 0))


@pytest.mark.parametrize("kind", ["shapes", "textures"])
@pytest.mark.parametrize("background", ["photo", "plain"])
def test_generated_scenes_are_seeded_and_labelled_within_their_classes(kind: str, background: str) -> None:
    one = make_scene("train", 3, seed=5, image_size=48, kind=kind, background=background)
    again = make_scene("train", 3, seed=5, image_size=48, kind=kind, background=background)
    other = make_scene("train", 3, seed=6, image_size=48, kind=kind, background=background)
    assert np.array_equal(one.image, again.image) and not np.array_equal(one.image, other.image)
    for i in range(20):
        scene = make_scene("test", i, seed=0, image_size=48, kind=kind, background=background)
        assert scene.seg.max() <= len(KINDS[kind]) and 0 <= scene.label < len(KINDS[kind])
        counts = np.bincount(scene.seg.ravel(), minlength=len(KINDS[kind]) + 1)[1:]
        assert counts[scene.label] == counts.max()


def test_digit_scenes_are_unchanged_by_the_other_kinds() -> None:
    """The digits kind draws exactly what it drew before shapes and textures existed (digest of that version)."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for index in range(5):
            for seed in (0, 3):
                scene = make_scene(split, index, seed=seed, image_size=64)
                digest.update(scene.image.tobytes() + scene.seg.tobytes())
    assert digest.hexdigest() == "e0af3300a843ee333843e5935fb9a2103c01f40e846ba27627256b021662737a"


def test_write_scene_shards_records_kind_and_class_names(tmp_path) -> None:
    summary = write_scene_shards(tmp_path / "s", n_train=6, n_test=3, image_size=32, kind="textures", background="plain")
    written = json.loads((tmp_path / "s" / "scenes.json").read_text())
    assert written["kind"] == "textures" and written["background"] == "plain"
    assert written["class_names"] == list(TEXTURES) and written["num_seg_classes"] == len(TEXTURES) + 1
    assert sum(summary["train"]["class_counts"]) == 6 and len(summary["train"]["pixel_class_counts"]) == len(TEXTURES) + 1
    with pytest.raises(ScenesError, match="--kind must be one of digits, shapes, textures, got 'letters'"):
        write_scene_shards(tmp_path / "t", n_train=1, n_test=1, kind="letters")
    with pytest.raises(ScenesError, match="--background must be one of photo, plain, got 'sky'"):
        write_scene_shards(tmp_path / "t", n_train=1, n_test=1, background="sky")


def test_cli_makes_texture_scenes_and_names_the_kinds_on_a_typo(tmp_path) -> None:
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    runner = CliRunner()
    args = ["data", "scenes", str(tmp_path / "out"), "--train", "2", "--test", "1", "--size", "32"]
    result = runner.invoke(app, args + ["--kind", "textures", "--background", "plain"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "scenes.json").read_text())["class_names"] == list(TEXTURES)
    result = runner.invoke(app, ["data", "scenes", str(tmp_path / "bad"), "--kind", "letters"])
    words = " ".join(result.output.replace("│", " ").split())  # the option parser's message, out of its box
    assert result.exit_code == 2 and "'letters' is not one of 'digits', 'shapes', 'textures'" in words
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["shapes", "textures"])
def test_mono_palette_is_black_and_white_on_one_grey(kind: str) -> None:
    for index in range(10):
        mono = make_scene("train", index, seed=2, image_size=48, kind=kind, background="plain", palette="mono")
        assert np.ptp(mono.image.astype(int), axis=2).max() == 0  # no hue anywhere: every pixel is a grey level
        values, counts = np.unique(mono.image[mono.seg == 0][:, 0], return_counts=True)
        assert 96 <= values[counts.argmax()] < 160 and counts.max() > 0.8 * counts.sum()  # one grey, but edges blend
        inside = mono.image[mono.seg > 0][:, 0]
        assert np.isin(inside, [0, 255]).mean() > 0.5  # objects black and white, but edges blend


def test_mono_is_refused_for_digits(tmp_path) -> None:
    with pytest.raises(ScenesError, match="digit scenes come in colour only"):
        write_scene_shards(tmp_path / "d", n_train=1, n_test=1, palette="mono")
    with pytest.raises(ScenesError, match="--palette must be one of colour, mono, got 'sepia'"):
        write_scene_shards(tmp_path / "d", n_train=1, n_test=1, kind="shapes", palette="sepia")
