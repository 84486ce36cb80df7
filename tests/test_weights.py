"""Weights that load without dmt_jepa's file reader: HF directory, timm checkpoint, torch.hub; licence carried."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import timm
import torch
from test_pretrain_convert import public_checkpoint
from typer.testing import CliRunner

import dmt_jepa
import dmt_jepa.export.weights as weights
from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, load_encoder, save_encoder
from dmt_jepa.export.onnx_export import export_onnx
from dmt_jepa.export.out_dir import MANIFEST_FILENAME
from dmt_jepa.models import VisionTransformer, create_encoder, sincos_2d

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An encoder file converted from a checkpoint in the public I-JEPA layout (64 px, 4 x 4 patches)."""
    directory = tmp_path_factory.mktemp("converted")
    public_checkpoint(directory / "ijepa.pth.tar")
    result = CliRunner().invoke(app, ["convert", str(directory / "ijepa.pth.tar"), str(directory / "enc.safetensors")])
    assert result.exit_code == 0, result.output
    return directory / "enc.safetensors"


def _export(encoder_file: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["export", str(encoder_file), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


def test_hf_directory_round_trip_equals_the_encoder_file(converted, tmp_path):
    _export(converted, tmp_path / "hf", "--format", "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        MANIFEST_FILENAME,
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    encoder, info = load_encoder(converted)
    loaded = dmt_jepa.from_pretrained(tmp_path / "hf")
    assert not loaded.training
    assert loaded.state_dict().keys() == encoder.state_dict().keys()
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        for got, want in zip(loaded.dense(images), encoder.dense(images)):
            assert torch.equal(got, want)
    provenance = dict(loaded.info.provenance)
    assert provenance.pop("exported_from")["file"] == "enc.safetensors"
    assert {**loaded.info.__dict__, "provenance": provenance} == {**info.__dict__, "provenance": info.provenance}
    # The mixin's push_to_hub writes the same card: it comes from the model, not from the export.
    assert loaded.generate_model_card().content == (tmp_path / "hf" / "README.md").read_text()


def test_licence_follows_convert_into_every_export(converted, tmp_path):
    _, info = load_encoder(converted)
    assert info.provenance["license"] == "cc-by-nc-4.0" and "non-commercial" in info.provenance["license_note"]
    (onnx_export,) = export_onnx(converted, tmp_path / "onnx", shapes=[(1, 64, 64)], log=lambda line: None)
    meta = {p.key: p.value for p in onnx.load(str(onnx_export.path)).metadata_props}
    assert json.loads(meta["provenance"])["license"] == "cc-by-nc-4.0"
    _export(converted, tmp_path / "hf", "--format", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "non-commercial use only" in card
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dmt_jepa"]["provenance"]["license"] == "cc-by-nc-4.0"
    _export(converted, tmp_path / "timm", "--format", "timm")
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
    assert "license: cc-by-nc-4.0" in (tmp_path / "timm" / "README.md").read_text()
    # A recorded licence cannot be replaced on export.
    result = CliRunner().invoke(
        app, ["export", str(converted), "--out", str(tmp_path / "x"), "--format", "hf", "--license", "mit"]
    )
    assert result.exit_code == 2 and "cannot relicense" in result.output and not (tmp_path / "x" / "config.json").exists()


def test_card_records_unknown_licence_as_such_and_evaluation_figures(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2).eval()
    path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom", {"source": "test"}))
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"train": 10, "test": 5, "knn": {"top1": 41.5}, "detect": {"ap": 12.25, "ap50": 30.0}}))
    _export(path, tmp_path / "hf", "--format", "hf", "--eval-results", str(results))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "license: other" in card and "license_name: unspecified" in card
    assert "| detect | box AP | 12.25 | 10 train / 5 test images |" in card and "| knn | top-1 % | 41.50 |" in card
    _export(path, tmp_path / "hf2", "--format", "hf", "--license", "apache-2.0")
    assert "license: apache-2.0" in (tmp_path / "hf2" / "README.md").read_text()


def test_plain_timm_reproduces_the_encoder_at_the_training_size(converted, tmp_path):
    _export(converted, tmp_path / "timm", "--format", "timm")
    encoder, info = load_encoder(converted)
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(images)
        # 1. timm's own loader for a local folder
        model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        assert (model.forward_features(images) - ours).abs().max() <= 1e-5
        # 2. a registered architecture with the file as overlay, the route timm documents for checkpoints
        overlay = timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(tmp_path / "timm" / "model.safetensors")},
            **config["model_args"],
        ).eval()
        assert (overlay.forward_features(images) - ours).abs().max() <= 1e-5
        # timm's pooled output is our pooled vector
        assert (overlay(images) - encoder.dense(images)[1]).abs().max() <= 1e-5
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["mean"]) == info.pixel_mean and tuple(data["std"]) == info.pixel_std
    assert tuple(data["input_size"]) == (3, 64, 64)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(4, 4, 192))
    # Away from the training size timm interpolates the table, so it runs but is no longer exact.
    wide = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        away = (model.forward_features(wide) - encoder(wide)).abs().max()
    assert 1e-4 < away < 10


def test_a_timm_checkpoint_that_does_not_reproduce_is_not_kept(converted, tmp_path, monkeypatch):
    real = weights.timm_state_dict

    def shifted(encoder):
        state = real(encoder)
        # one position off (a shift shared by all channels would vanish in the LayerNorms)
        state["pos_embed"][0, 5, :3] += 0.01
        return state

    monkeypatch.setattr(weights, "timm_state_dict", shifted)
    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(tmp_path / "t"), "--format", "timm"])
    assert result.exit_code == 1 and "FAIL" in result.output
    assert list((tmp_path / "t").iterdir()) == []


def test_torch_hub_loads_from_a_local_checkout(converted):
    encoder, _ = load_encoder(converted)
    loaded = torch.hub.load(str(ROOT), "dmt_jepa_encoder", source="local", weights=str(converted))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))
    untrained = torch.hub.load(str(ROOT), "dmt_jepa_encoder", source="local", arch="vit_tiny", img_size=64)
    assert untrained.embed_dim == 192 and untrained.img_size == (64, 64)


def test_weight_formats_refuse_onnx_only_flags(converted, tmp_path):
    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(tmp_path / "o"), "--format", "hf", "--fp16"])
    assert result.exit_code == 2 and "--fp16 only apply to --format onnx" in result.output
    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(tmp_path / "o"), "--format", "keras"])
    words = " ".join(result.output.replace("│", " ").split())  # the message as one line, out of its box
    assert result.exit_code == 2 and "'keras' is not one of 'onnx', 'triton', 'hf', 'timm'" in words


@pytest.mark.parametrize(
    "arch, patch, width, name",
    [
        ("vit_small", 16, 384, "vit_small_patch16_224"),  # timm's own preset
        ("vit_large", 14, 1024, "vit_large_patch14_224"),
        ("vit_nano", 8, 64, "vit_small_patch8_224"),  # no 64-wide preset: the narrowest at patch 8
        ("vit_large", 8, 1024, "vit_base_patch8_224"),  # no large at patch 8: the widest there
        ("vit_nano", 12, 64, "vit_tiny_patch16_224"),  # no preset at patch 12: patch 16's narrowest
    ],
)
def test_timm_config_names_the_preset_of_the_encoders_own_size_or_the_nearest(arch, patch, width, name):
    info = info_from_encoder(create_encoder(arch, patch_size=patch, img_size=patch * 2), arch)
    assert info.embed_dim == width and weights.timm_config(info)["architecture"] == name


def test_a_size_timm_has_no_preset_for_loads_both_ways(tmp_path):
    encoder = create_encoder("vit_nano", patch_size=8, img_size=32).eval()
    path = save_encoder(tmp_path / "nano.safetensors", encoder, info_from_encoder(encoder, "vit_nano"))
    _export(path, tmp_path / "timm", "--format", "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch8_224" and config["model_args"]["embed_dim"] == 64
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder(images)
        local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        overlay = timm.create_model(
            config["architecture"], pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "timm" / "model.safetensors")},
            **config["model_args"],
        ).eval()  # fmt: skip
        for model in (local, overlay):
            assert (model.forward_features(images) - ours).abs().max() <= 1e-5
