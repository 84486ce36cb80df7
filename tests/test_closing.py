"""The figure that closes a run on the built-in scenes: trained encoder against its random init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmt_jepa.encoder_file import info_from_encoder
from dmt_jepa.evaluation import read_labelled_shards
from dmt_jepa.evaluation.closing import closing_line, compare_with_init, held_out_figures
from dmt_jepa.models import create_encoder
from dmt_jepa.scenes import write_scene_shards


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("closing")
    write_scene_shards(root, n_train=48, n_test=24, seed=3, image_size=32, kind="textures", background="plain", palette="mono")
    return root


def test_constant_features_score_one_class_and_a_class_frequency(scenes) -> None:
    encoder = create_encoder("vit_nano", patch_size=8, img_size=32)
    torch.nn.init.zeros_(encoder.norm.weight)  # every embedding zero: the probes can only predict one class
    torch.nn.init.zeros_(encoder.norm.bias)
    info = info_from_encoder(encoder, "vit_nano")
    train, test = read_labelled_shards(f"{scenes}/train-*.tar"), read_labelled_shards(f"{scenes}/test-*.tar")
    classes = json.loads((scenes / "scenes.json").read_text())["num_seg_classes"]
    figures = held_out_figures(encoder, info, train, test, classes)
    truth = np.stack(test.segs)
    present = len(np.unique(truth[truth != 255]))
    # every pixel given one class c: IoU_c = its share of the pixels, every other present class 0
    possible = [100.0 * np.mean(truth[truth != 255] == c) / present for c in range(classes)]
    assert min(abs(figures["semantic_miou"] - p) for p in possible) < 0.01
    frequencies = [100.0 * np.mean(test.labels == c) for c in np.unique(train.labels)]
    assert min(abs(figures["knn_top1"] - f) for f in frequencies) < 0.01


def test_compare_with_init_uses_the_seed_s_untrained_encoder(scenes) -> None:
    torch.manual_seed(11)
    trained = create_encoder("vit_nano", patch_size=8, img_size=32)  # another init stands in for trained weights
    info = info_from_encoder(trained, "vit_nano")
    state = torch.get_rng_state()
    figures = compare_with_init(trained, info, scenes, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as it was
    torch.manual_seed(5)
    untrained = create_encoder("vit_nano", patch_size=8, img_size=32)
    train, test = read_labelled_shards(f"{scenes}/train-*.tar"), read_labelled_shards(f"{scenes}/test-*.tar")
    classes = json.loads((scenes / "scenes.json").read_text())["num_seg_classes"]
    assert figures["random_init"] == held_out_figures(untrained, info, train, test, classes)
    assert figures["trained"] == held_out_figures(trained, info, train, test, classes)
    assert figures["scenes"] == {"train": 48, "held_out": 24} and figures["classes"] == classes - 1
    assert figures["chance_top1"] == pytest.approx(100.0 / len(np.unique(train.labels)), abs=0.01)
    line = closing_line(figures)
    assert line.startswith("on 24 held-out scenes: semantic mIoU") and "random init" in line and "chance" in line


def test_compare_with_init_caps_the_probe_s_train_scenes(scenes) -> None:
    encoder = create_encoder("vit_nano", patch_size=8, img_size=32)
    figures = compare_with_init(encoder, info_from_encoder(encoder, "vit_nano"), scenes, max_train=16)
    assert figures["scenes"]["train"] == 16


def test_pretrain_on_built_in_scenes_ends_with_the_comparison(tmp_path) -> None:
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    out = tmp_path / "run"
    args = [
        "pretrain",
        "model.arch=vit_nano",
        "model.img_size=32",
        "model.patch_size=8",
        "model.pred_width=32",
        "model.pred_depth=1",
        "mask.min_keep=2",
        "data.samples_per_epoch=8",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.scenes_train=16",
        "data.scenes_test=8",
        "data.scenes_kind=shapes",
        "data.scenes_background=plain",
        "optimization.epochs=1",
        "optimization.batch_size=4",
        "optimization.warmup_epochs=0",
        "run.checkpoint_every=2",
        f"run.out_dir={out}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and set(last["held_out"]["trained"]) == {"semantic_miou", "knn_top1"}
    assert json.loads((out / "data" / "scenes.json").read_text())["kind"] == "shapes"
    assert f"probe:         {closing_line(last['held_out'])}" in result.output
    # no held-out scenes, no closing figure
    again = CliRunner().invoke(app, [*args[:-1], "data.scenes_test=0", f"run.out_dir={tmp_path / 'bare'}"])
    assert again.exit_code == 0 and "probe:" not in again.output


def test_scene_settings_are_checked_before_the_run_directory_is_made(tmp_path) -> None:
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["pretrain", "data.scenes_kind=letters", f"run.out_dir={out}"])
    assert result.exit_code == 2 and "data.scenes_kind must be one of digits, shapes, textures, got 'letters'" in result.output
    result = CliRunner().invoke(app, ["pretrain", "data.scenes_kind=digits", "data.scenes_palette=mono", f"run.out_dir={out}"])
    assert result.exit_code == 2 and "set data.scenes_kind to shapes or textures for data.scenes_palette mono" in result.output
    assert not out.exists()
