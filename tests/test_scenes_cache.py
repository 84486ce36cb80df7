"""The scenes drawn once per setting and copied after: the same scenes as a fresh draw, a line while they are drawn."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from dmt_jepa.scenes import ScenesError, write_scene_shards
from dmt_jepa.scenes_cache import cached_scene_shards, progress_lines

SETTINGS = {"n_train": 5, "n_test": 3, "seed": 4, "image_size": 32, "shard_size": 3, "kind": "textures", "background": "plain"}


def members(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every shard of `folder` as {shard name: {member name: bytes}}."""
    found = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found[shard.name] = {m.name: tar.extractfile(m).read() for m in tar}
    return found


def test_a_second_run_copies_the_same_scenes_a_fresh_draw_makes(tmp_path):
    reference = write_scene_shards(tmp_path / "fresh", **SETTINGS)
    lines: list[str] = []
    first = cached_scene_shards(tmp_path / "a", cache=tmp_path / "cache", log=lines.append, **SETTINGS)
    assert lines == []  # drawn, not copied
    second = cached_scene_shards(tmp_path / "b", cache=tmp_path / "cache", log=lines.append, **SETTINGS)
    assert len(lines) == 1 and "copying them from" in lines[0]
    for folder, summary in ((tmp_path / "a", first), (tmp_path / "b", second)):
        assert members(folder) == members(tmp_path / "fresh") and len(members(folder)) == 3
        on_disk = json.loads((folder / "scenes.json").read_text())
        assert on_disk == summary and summary["out_dir"] == str(folder)
        assert summary["train"]["paths"] == [str(folder / f"train-{i:06d}.tar") for i in range(2)]
        strip = lambda s: {k: v for k, v in s.items() if k not in ("out_dir", "train", "test")}  # noqa: E731
        assert strip(summary) == strip(reference)
        for split in ("train", "test"):
            assert {k: v for k, v in summary[split].items() if k != "paths"} == {
                k: v for k, v in reference[split].items() if k != "paths"
            }


def test_other_settings_are_another_draw(tmp_path):
    cached_scene_shards(tmp_path / "a", cache=tmp_path / "cache", **SETTINGS)
    lines: list[str] = []
    cached_scene_shards(tmp_path / "b", cache=tmp_path / "cache", log=lines.append, **{**SETTINGS, "seed": 5})
    assert lines == [] and members(tmp_path / "a") != members(tmp_path / "b")
    assert len(list((tmp_path / "cache" / "scenes").iterdir())) == 2


def test_a_draw_cut_short_is_not_reused(tmp_path):
    def stop(split, made, count):
        if split == "test":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_scene_shards(tmp_path / "a", cache=tmp_path / "cache", progress=stop, **SETTINGS)
    assert list((tmp_path / "cache" / "scenes").iterdir()) == []
    lines: list[str] = []
    cached_scene_shards(tmp_path / "b", cache=tmp_path / "cache", log=lines.append, **SETTINGS)
    assert lines == [] and len(members(tmp_path / "b")) == 3


def test_an_unusable_cache_draws_in_place(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    summary = cached_scene_shards(tmp_path / "a", cache=tmp_path / "cache", **SETTINGS)
    assert summary["out_dir"] == str(tmp_path / "a") and len(members(tmp_path / "a")) == 3


def test_settings_that_cannot_be_drawn_leave_nothing_behind(tmp_path):
    with pytest.raises(ScenesError):
        cached_scene_shards(tmp_path / "a", cache=tmp_path / "cache", **{**SETTINGS, "palette": "neon"})
    assert not (tmp_path / "a").exists() and list((tmp_path / "cache" / "scenes").iterdir()) == []


def test_progress_lines_come_at_the_end_of_each_split_and_between_when_slow(tmp_path):
    lines: list[str] = []
    write_scene_shards(tmp_path / "quiet", progress=progress_lines(lines.append, every_s=3600), **SETTINGS)
    assert lines == ["drawing the scenes: 5/5 train", "drawing the scenes: 3/3 test"]
    lines.clear()
    write_scene_shards(tmp_path / "chatty", progress=progress_lines(lines.append, every_s=0), **SETTINGS)
    assert lines == [f"drawing the scenes: {i}/5 train" for i in range(1, 6)] + [
        f"drawing the scenes: {i}/3 test" for i in range(1, 4)
    ]
