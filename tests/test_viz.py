"""Pictures: valid PNGs of the expected size, and PCA colours that follow the embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.models import VisionTransformer
from dmt_jepa.scenes import make_scene, write_scene_shards
from dmt_jepa.viz import VizError, pca_rgb, read_log

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return save_encoder(tmp_path_factory.mktemp("enc") / "e.safetensors", encoder, info_from_encoder(encoder, "custom"))


def _png(path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()  # fails on a truncated file
    return image


def test_pca_of_two_region_embeddings_gives_two_colours() -> None:
    patches = torch.zeros(4, 4, 8)
    patches[:, :2, 0] = 1.0  # left half differs from right half along one direction
    rgb = pca_rgb(patches)
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert np.allclose(rgb[:, :2], rgb[0, 0]) and np.allclose(rgb[:, 2:], rgb[0, 3])
    assert not np.allclose(rgb[0, 0], rgb[0, 3])


def test_viz_pca_and_attention_write_pngs_of_expected_size(encoder_file, tmp_path) -> None:
    Image.fromarray(make_scene("test", 0, image_size=32).image).save(tmp_path / "scene.png")
    result = runner.invoke(
        app, ["viz", "pca", str(encoder_file), str(tmp_path / "scene.png"), "-o", str(tmp_path / "p.png"), "--side", "64"]
    )
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "p.png").size == (128, 64)
    result = runner.invoke(
        app,
        [
            "viz",
            "attention",
            str(encoder_file),
            str(tmp_path / "scene.png"),
            "-o",
            str(tmp_path / "a.png"),
            "--query",
            "1,2",
            "--side",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "a.png").size == (50 * (2 + 2), 50)  # image, 2 heads, mean
    result = runner.invoke(
        app, ["viz", "attention", str(encoder_file), str(tmp_path / "scene.png"), "-o", str(tmp_path / "b.png"), "--query", "9,0"]
    )
    assert result.exit_code != 0 and "outside" in result.output and not (tmp_path / "b.png").exists()


def test_viz_reads_a_sample_of_a_shard(encoder_file, tmp_path) -> None:
    write_scene_shards(tmp_path / "s", n_train=0, n_test=3, image_size=32)
    result = runner.invoke(
        app,
        ["viz", "pca", str(encoder_file), str(tmp_path / "s" / "test-000000.tar"), "--index", "2", "-o", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "p.png").size == (512, 256)
    result = runner.invoke(
        app,
        ["viz", "pca", str(encoder_file), str(tmp_path / "s" / "test-000000.tar"), "--index", "3", "-o", str(tmp_path / "q.png")],
    )
    assert result.exit_code != 0 and "fewer than 4 samples" in result.output


def test_viz_curves_from_a_run_log(tmp_path) -> None:
    with open(tmp_path / "log.jsonl", "w") as f:
        for step in range(1, 21):
            locality = {"within_image_share": 0.5, "cos_to_image_mean": 0.7} if step % 5 == 0 else {}
            f.write(json.dumps(locality | {"step": step, "loss": 1.0 / step, "lr": 1e-3 * min(step, 5) / 5}) + "\n")
    result = runner.invoke(app, ["viz", "curves", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "curves.png").size == (1000, 400)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(VizError, match="line 2"):
        read_log(tmp_path / "bad")
