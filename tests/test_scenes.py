"""The scenes benchmark: deterministic, labels that match pixels, disjoint train/test sources."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dmt_jepa import scenes
from dmt_jepa.scenes import Placement, ScenesError, compose, make_scene, write_scene_shards


def _digit_with_class(label: int, split: str = "train") -> int:
    """The first digit sample of a class in a split."""
    classes = scenes.digits()[1]
    return int(next(i for i in scenes.digit_samples(split) if classes[i] == label))


def _solid_digit(monkeypatch: pytest.MonkeyPatch, ink: np.ndarray, label: int) -> int:
    """Replace digit sample 0 by a hand-made 8x8 scan of a given class; return its index."""
    images, classes = scenes.digits()
    images, classes = images.copy(), classes.copy()
    images[0], classes[0] = ink, label
    monkeypatch.setattr(scenes, "digits", lambda: (images, classes))
    return 0


def test_same_seed_same_scene_and_other_seed_differs() -> None:
    a = make_scene("train", 3, seed=7, image_size=64)
    b = make_scene("train", 3, seed=7, image_size=64)
    c = make_scene("train", 3, seed=8, image_size=64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.seg, b.seg) and a.label == b.label
    assert not np.array_equal(a.image, c.image)


def test_full_ink_square_gives_hand_computed_label_map(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _solid_digit(monkeypatch, np.ones((8, 8), np.float32), label=7)
    background = np.full((20, 20, 3), 10, np.uint8)
    scene = compose(background, [Placement(sample, top=3, left=5, size=6, color=(200, 100, 50))])
    expected = np.zeros((20, 20), np.uint8)
    expected[3:9, 5:11] = 8  # 1 + digit 7
    assert np.array_equal(scene.seg, expected)
    assert scene.label == 7
    assert (scene.image[3:9, 5:11] == (200, 100, 50)).all()
    assert (scene.image[expected == 0] == 10).all()


def test_later_digit_covers_earlier_and_clipping_at_border(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _solid_digit(monkeypatch, np.ones((8, 8), np.float32), label=2)
    other = _digit_with_class(5)
    background = np.zeros((16, 16, 3), np.uint8)
    scene = compose(
        background,
        [
            Placement(sample, top=0, left=0, size=10, color=(255, 0, 0)),
            Placement(sample, top=12, left=12, size=8, color=(0, 255, 0)),  # hangs over the corner
        ],
    )
    expected = np.zeros((16, 16), np.uint8)
    expected[0:10, 0:10] = 3
    expected[12:16, 12:16] = 3
    assert np.array_equal(scene.seg, expected)
    # A real digit pasted on top takes over exactly the pixels where its ink reaches half strength.
    on_top = compose(background, [Placement(sample, 0, 0, 16, (255, 0, 0)), Placement(other, 0, 0, 16, (0, 0, 255))])
    ink = np.asarray(Image.fromarray(scenes.digits()[0][other]).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(on_top.seg == 6, ink >= scenes.INK_THRESHOLD)
    assert ((on_top.seg == 3) == (ink < scenes.INK_THRESHOLD)).all()


def test_image_label_is_the_digit_covering_most_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _solid_digit(monkeypatch, np.ones((8, 8), np.float32), label=4)
    background = np.zeros((30, 30, 3), np.uint8)
    small = _digit_with_class(9)
    scene = compose(background, [Placement(small, 0, 0, 8, (255, 255, 255)), Placement(sample, 10, 10, 12, (9, 9, 9))])
    assert scene.label == 4
    counts = np.bincount(scene.seg.ravel(), minlength=11)
    assert counts[5] == 144 and counts[10] < 64


def test_labels_match_pixels_on_generated_scenes() -> None:
    for index in range(20):
        scene = make_scene("train", index, image_size=48)
        present = np.unique(scene.seg)
        assert present.max() <= 10
        assert scene.label + 1 in present
        counts = np.bincount(scene.seg.ravel(), minlength=11)[1:]
        assert counts[scene.label] == counts.max()


def test_train_and_test_use_disjoint_sources() -> None:
    assert not set(scenes.TRAIN_PHOTOS) & set(scenes.TEST_PHOTOS)
    assert not set(scenes.digit_samples("train")) & set(scenes.digit_samples("test"))
    assert set(scenes.digit_samples("train")) | set(scenes.digit_samples("test")) == set(range(len(scenes.digits()[1])))
    train = [make_scene("train", i, image_size=32) for i in range(30)]
    test = [make_scene("test", i, image_size=32) for i in range(30)]
    assert {s.sources["photo"] for s in train} <= set(scenes.TRAIN_PHOTOS)
    assert {s.sources["photo"] for s in test} <= set(scenes.TEST_PHOTOS)
    train_digits = {d for s in train for d in s.sources["digits"]}
    test_digits = {d for s in test for d in s.sources["digits"]}
    assert not train_digits & test_digits
    assert not train_digits & set(scenes.digit_samples("test"))
    # Photos are all different images, not the same photo loaded twice.
    pixels = {p.tobytes()[:4096] for split in scenes.SPLITS for p in scenes.photos(split)}
    assert len(pixels) == len(scenes.TRAIN_PHOTOS) + len(scenes.TEST_PHOTOS)


def test_write_scene_shards_round_trip(tmp_path) -> None:
    summary = write_scene_shards(tmp_path / "s", n_train=5, n_test=3, seed=1, image_size=32, shard_size=2)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [
        "scenes.json",
        "test-000000.tar",
        "test-000001.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert summary["train"]["count"] == 5 and sum(summary["train"]["class_counts"]) == 5
    assert json.loads((tmp_path / "s" / "scenes.json").read_text()) == summary
    with tarfile.open(tmp_path / "s" / "train-000001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == [f"train-000000{i}.{ext}" for i in (2, 3) for ext in ("boxes.json", "cls", "png", "seg.png")]
    expected = make_scene("train", 3, seed=1, image_size=32)
    image = np.asarray(Image.open(io.BytesIO(members["train-0000003.png"])))
    seg = np.asarray(Image.open(io.BytesIO(members["train-0000003.seg.png"])))
    assert image.shape == (32, 32, 3) and seg.dtype == np.uint8
    assert np.array_equal(image, expected.image) and np.array_equal(seg, expected.seg)
    assert int(members["train-0000003.cls"]) == expected.label
    assert json.loads(members["train-0000003.boxes.json"]) == expected.boxes and expected.boxes


def test_refuses_to_write_over_existing_shards(tmp_path) -> None:
    write_scene_shards(tmp_path, n_train=1, n_test=1, image_size=32)
    before = (tmp_path / "train-000000.tar").read_bytes()
    with pytest.raises(ScenesError, match="already holds scene shards"):
        write_scene_shards(tmp_path, n_train=2, n_test=1, seed=5, image_size=32)
    assert (tmp_path / "train-000000.tar").read_bytes() == before


def test_cli_writes_shards_and_reports_bad_requests(tmp_path) -> None:
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "scenes", str(tmp_path / "out"), "--train", "2", "--test", "1", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "test-000000.tar").exists()
    result = runner.invoke(app, ["data", "scenes", str(tmp_path / "bad"), "--train", "0", "--test", "0"])
    assert result.exit_code != 0 and "at least one scene" in result.output


def test_one_box_per_visible_digit_from_its_own_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _solid_digit(monkeypatch, np.ones((8, 8), np.float32), label=4)
    background = np.zeros((20, 20, 3), np.uint8)
    scene = compose(
        background,
        [
            Placement(sample, top=2, left=2, size=8, color=(255, 0, 0)),  # rows/cols 2..9, right part covered
            Placement(sample, top=4, left=6, size=8, color=(0, 255, 0)),  # rows 4..11, cols 6..13
            Placement(sample, top=5, left=7, size=2, color=(0, 0, 255)),  # wholly inside the next one
            Placement(sample, top=4, left=6, size=4, color=(0, 0, 255)),  # covers the previous one entirely
            Placement(sample, top=16, left=17, size=8, color=(9, 9, 9)),  # clipped by the scene's corner
        ],
    )
    assert scene.boxes == [
        {"box": [2, 2, 10, 10], "digit": 4},  # its top rows still span columns 2..9
        {"box": [6, 4, 14, 12], "digit": 4},  # the later small square sits inside it
        {"box": [6, 4, 10, 8], "digit": 4},
        {"box": [17, 16, 20, 20], "digit": 4},
    ]


def test_generated_boxes_cover_exactly_the_labelled_pixels() -> None:
    for index in range(20):
        scene = make_scene("test", index, image_size=64)
        covered = np.zeros_like(scene.seg, dtype=bool)
        for record in scene.boxes:
            x0, y0, x1, y1 = record["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            inside = scene.seg[y0:y1, x0:x1]
            assert (inside == 1 + record["digit"]).any()  # the box holds pixels of its class
            # each edge of the box touches a pixel of that class (the box is tight)
            mask = inside == 1 + record["digit"]
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not (scene.seg[~covered]).any()  # every labelled pixel is in some box
