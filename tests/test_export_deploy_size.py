"""export --format hf|timm --image-size: transformers and timm exact at the size people deploy, not only the training size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, load_encoder, save_encoder
from dmt_jepa.models import create_encoder


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """A vit_nano/8 trained (here: seeded) at 64 px, the demo's size."""
    torch.manual_seed(0)
    encoder = create_encoder("vit_nano", patch_size=8, img_size=64)
    path = tmp_path_factory.mktemp("deploy") / "enc.safetensors"
    save_encoder(path, encoder, info_from_encoder(encoder, "vit_nano"))
    return path


def export(encoder_file: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", str(encoder_file), "--out", str(out), *extra])


def ours(encoder_file: Path, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    encoder, _ = load_encoder(encoder_file)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return images, encoder(images)


@pytest.mark.parametrize("size, option", [((96, 96), "96"), ((96, 128), "96x128")])
def test_timm_is_exact_at_the_size_given(encoder_file, tmp_path, size, option) -> None:
    result = export(encoder_file, tmp_path / "timm", "--format", "timm", "--image-size", option)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["model_args"]["img_size"] == list(size) and config["pretrained_cfg"]["input_size"] == [3, *size]
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images, want = ours(encoder_file, size)
    with torch.no_grad():
        got = model.forward_features(images)
    assert (got - want).abs().max() < 1e-5
    card = (tmp_path / "timm" / "README.md").read_text()
    assert "| trained at | 64 x 64 px (8 x 8 patches) |" in card and f"| exported for | {size[0]} x {size[1]} px" in card


def test_timm_without_the_option_is_not_exact_at_that_size(encoder_file, tmp_path) -> None:
    """The reason for the option: the table stored for 64 px, resized by timm, is not ours at 96 px."""
    assert export(encoder_file, tmp_path / "timm", "--format", "timm").exit_code == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images, want = ours(encoder_file, (96, 96))
    with torch.no_grad():
        assert (model.forward_features(images) - want).abs().max() > 1e-3


@pytest.mark.parametrize("side", [96, 128])
def test_transformers_is_exact_at_the_size_given(encoder_file, tmp_path, side) -> None:
    transformers = pytest.importorskip("transformers", reason="--format hf needs the hf extra")
    result = export(encoder_file, tmp_path / "hf", "--format", "hf", "--image-size", str(side))
    assert result.exit_code == 0, result.output
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").float().eval()
    images, want = ours(encoder_file, (side, side))
    with torch.no_grad():
        got = model(pixel_values=images).last_hidden_state  # no interpolation: the stored table is this grid's
    assert (got - want).abs().max() < 1e-5
    provenance = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert json.dumps(provenance).count("trained_img_size") >= 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--format", "hf", "--image-size", "96x128"], "transformers' I-JEPA takes square images only"),
        (["--format", "timm", "--image-size", "100"], "must be a multiple of the patch size 8"),
        (["--format", "timm", "--image-size", "9x"], "--image-size takes H or HxW in pixels"),
        (["--format", "onnx", "--image-size", "96"], "apply to --format hf and timm"),
    ],
)
def test_sizes_that_cannot_be_exported_are_one_sentence_and_leave_nothing(encoder_file, tmp_path, extra, words) -> None:
    result = export(encoder_file, tmp_path / "out", *extra)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
