"""`export --format hf`: a directory plain transformers loads (IJepaModel, no remote code), that dmt_jepa reads back exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from test_pretrain_convert import public_checkpoint
from typer.testing import CliRunner

import dmt_jepa
from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import EncoderFileError, info_from_encoder, load_encoder, save_encoder
from dmt_jepa.model_card import MODEL_PATH, layer_choice
from dmt_jepa.models import VisionTransformer, resolve_layers, sincos_2d
from dmt_jepa.models.transformers_layout import from_transformers

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'dmt-jepa[hf]')")

# Run in a fresh interpreter where importing dmt-jepa's packages fails: transformers must do it all.
ALONE = r"""
import sys, importlib.abc
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dmt_jepa", "export", "serve", "cli"):
            raise ImportError("dmt-jepa must not be imported here")
sys.meta_path.insert(0, Refuse())
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, pipeline
directory, work = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(directory).eval()
images = load_file(work + "/images.safetensors")["images"]
with torch.no_grad():
    tokens = model(pixel_values=images).last_hidden_state
features = pipeline("image-feature-extraction", model=directory)(Image.open(work + "/photo.png"), return_tensors=True)
save_file({"tokens": tokens.contiguous(), "features": features.contiguous()}, work + "/out.safetensors")
model.save_pretrained(work + "/resaved")
print(type(model).__name__, sorted(m for m in sys.modules if m.split(".")[0] in ("dmt_jepa", "export", "serve", "cli")))
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """An encoder file converted from the public I-JEPA layout under a public checkpoint's name (64 px, 2 blocks)."""
    directory = tmp_path_factory.mktemp("converted")
    public_checkpoint(directory / "IN1K-vit.h.14-300e.pth.tar")
    result = CliRunner().invoke(
        app, ["convert", str(directory / "IN1K-vit.h.14-300e.pth.tar"), str(directory / "enc.safetensors")]
    )
    assert result.exit_code == 0, result.output
    return directory / "enc.safetensors"


@pytest.fixture(scope="module")
def hf_dir(converted) -> Path:
    out = converted.parent / "hf"
    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(out), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert "every tensor found, none left over" in result.output and "64 x 64: max|diff| patch tokens" in result.output
    return out


def _card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.slow  # a fresh interpreter importing transformers and its image pipeline: ~30 s on 2 busy cores
def test_transformers_alone_loads_the_directory_and_every_tensor(converted, hf_dir, tmp_path):
    encoder, info = load_encoder(converted)
    images = torch.randn(2, 3, 64, 64)
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the training size: no resize
    Image.fromarray(photo).save(tmp_path / "photo.png")
    run = subprocess.run([sys.executable, "-c", ALONE, str(hf_dir), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "IJepaModel []"  # no dmt-jepa module was imported
    out = load_file(str(tmp_path / "out.safetensors"))
    pixels = (torch.from_numpy(photo).permute(2, 0, 1)[None] / 255 - torch.tensor(info.pixel_mean)[:, None, None]) / torch.tensor(
        info.pixel_std
    )[:, None, None]
    with torch.no_grad():
        assert (out["tokens"] - encoder(images)).abs().max() <= 1e-5
        assert (out["features"] - encoder(pixels.float())).abs().max() <= 1e-4  # the image processor's rounding
    # What transformers saves again is what it read: each of our tensors, in its place.
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    state, table = from_transformers(resaved, info.depth)
    assert state.keys() == encoder.state_dict().keys()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(state[name], tensor), name
    torch.testing.assert_close(table[0], sincos_2d(4, 4, 192), rtol=0, atol=0)
    # ... and a folder transformers saved again is still one dmt-jepa reads exactly.
    again = dmt_jepa.from_pretrained(tmp_path / "resaved")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_dmt_jepa_reads_the_directory_back_exactly(converted, hf_dir):
    encoder, info = load_encoder(converted)
    loaded = dmt_jepa.from_pretrained(hf_dir)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images = torch.randn(1, 3, 48, 80)  # away from the training size: sin-cos computed, as the encoder file does
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))
    assert {k: v for k, v in loaded.info.provenance.items() if k != "exported_from"} == info.provenance
    # push_to_hub writes the card the export wrote, measured rows included: they travel in config.json.
    assert loaded.generate_model_card().content == (hf_dir / "README.md").read_text()


def test_card_states_what_transformers_measures_away_from_the_training_size(converted, hf_dir):
    encoder, _ = load_encoder(converted)
    rows = json.loads((hf_dir / "config.json").read_text())["dmt_jepa_parity"]
    assert [r["size"] for r in rows] == ["64 x 64", "96 x 96", "64 x 112"]
    model = transformers.AutoModel.from_pretrained(hf_dir).eval()
    _, body = _card(hf_dir)
    for row, size in zip(rows, [(64, 64), (96, 96), (64, 112)]):
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs = model(pixel_values=images, interpolate_pos_encoding=size != (64, 64)).last_hidden_state
            measured = float((theirs - encoder(images)).abs().max())
        assert abs(row["max_abs"] - measured) <= 1e-6
        assert f"| {row['loader']} | {row['size']} | {row['max_abs']:.2e} | {row['cosine_min']:.4f} |" in body
    assert rows[0]["max_abs"] <= 1e-5 and rows[1]["max_abs"] > 1e-2 and rows[2]["cosine_min"] < 0.999


def test_card_metadata_is_what_the_hub_reads(hf_dir):
    meta, _ = _card(hf_dir)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["license"] == "cc-by-nc-4.0"
    assert meta["base_model"] == "facebook/ijepa_vith14_1k" and meta["datasets"] == ["ILSVRC/imagenet-1k"]
    assert {"ijepa", "dmt-jepa", "image-feature-extraction"} <= set(meta["tags"])
    processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 64, "width": 64} and processor["image_mean"] == [0.485, 0.456, 0.406]


def _snippets(directory: Path) -> list[str]:
    text = (directory / "README.md").read_text()
    return [block.replace(MODEL_PATH, str(directory)) for block in re.findall(r"```python\n(.*?)```", text, re.S)]


def test_card_snippets_run_on_the_model_they_describe(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom", {"source": "test"}))
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    with_transformers, with_package = _snippets(tmp_path / "hf")
    scope: dict = {}
    exec(with_transformers, scope)
    with torch.no_grad():
        grid, pooled = encoder.dense(scope["inputs"]["pixel_values"])
    assert scope["grid"].shape == (1, 2, 3, 32)
    torch.testing.assert_close(scope["grid"], grid, atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["pooled"], pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["features"], scope["tokens"], atol=1e-5, rtol=0)
    exec(with_package, scope)
    assert "[0, 1, 2, 3]" in with_package and [m.shape for m in scope["maps"]] == [(2, 32, 2, 3)] * 4
    # A non-square training size: transformers cannot resize its table, so the card has the training row only.
    rows = json.loads((tmp_path / "hf" / "config.json").read_text())["dmt_jepa_parity"]
    assert [r["size"] for r in rows] == ["32 x 48"]


def test_layer_choice_is_valid_for_every_depth():
    assert layer_choice(12) == [2, 5, 8, 11] and layer_choice(4) == [0, 1, 2, 3] and layer_choice(24) == [5, 11, 17, 23]
    for depth in range(1, 40):
        chosen = layer_choice(depth)
        assert resolve_layers(depth, chosen) == chosen and chosen[-1] == depth - 1


def test_previous_directory_layout_still_loads_exactly(converted, tmp_path):
    """config.json = the encoder metadata alone, tensors under our names: what earlier exports wrote."""
    encoder, info = load_encoder(converted)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(json.loads(json.dumps(info.__dict__)), sort_keys=True))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"))
    loaded = dmt_jepa.from_pretrained(tmp_path / "old")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.info == info


def test_a_hub_repo_id_is_read_as_its_downloaded_folder(converted, hf_dir, tmp_path, monkeypatch):
    """No network here: a stand-in for hf_hub_download serves the exported folder's files into a snapshot folder."""
    import shutil

    import dmt_jepa.hub as hub

    fetched = []

    def download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename, kwargs.get("revision")))
        target = tmp_path / "cache" / repo_id.replace("/", "--") / "snapshots" / "abc" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(hf_dir / filename, target))

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", download)  # the mixin fetches config.json first
    encoder, _ = load_encoder(converted)
    for loaded in (
        dmt_jepa.from_pretrained("someone/dmt-jepa-test", revision="v1"),
        hub.PretrainedEncoder.from_pretrained("someone/dmt-jepa-test", revision="v1"),
    ):
        for name, tensor in encoder.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        assert len(loaded.parity) == 3  # the card's rows came along
    assert ("someone/dmt-jepa-test", "model.safetensors", "v1") in fetched


def _copy(hf_dir: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(hf_dir, target))


def test_a_changed_position_table_is_refused(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path / "hf")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["embeddings.position_embeddings"][0, 3, :5] += 0.01  # fine-tuned in transformers, say
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EncoderFileError, match="not the sin-cos table this encoder computes") as err:
        dmt_jepa.from_pretrained(directory)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(hidden_size=64), "says hidden_size 64 where its 'dmt_jepa' block means 192"),
        (lambda c: c.update(layer_norm_eps=1e-12), "says layer_norm_eps"),
        (lambda c: c.update(hidden_act="gelu_new"), "says hidden_act"),
        (lambda c: c.pop("dmt_jepa"), "dmt-jepa did not write"),
        (lambda c: c["dmt_jepa"].update(depth=3), "says num_hidden_layers 2 where its 'dmt_jepa' block means 3"),
    ],
)
def test_a_lying_transformers_config_is_one_sentence(hf_dir, tmp_path, edit, words):
    directory = _copy(hf_dir, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderFileError, match=re.escape(words)) as err:
        dmt_jepa.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_weights_missing_a_tensor_or_with_a_wrong_shape_are_refused(hf_dir, tmp_path):
    for change in ("drop", "shape"):
        directory = _copy(hf_dir, tmp_path / change)
        tensors = load_file(str(directory / "model.safetensors"))
        if change == "drop":
            del tensors["encoder.layer.1.attention.attention.key.bias"]
        else:
            tensors["layernorm.weight"] = torch.ones(191)
        save_file(tensors, str(directory / "model.safetensors"))
        with pytest.raises(EncoderFileError, match="does not hold the weights its config.json describes"):
            dmt_jepa.from_pretrained(directory)


def test_hf_export_without_transformers_says_what_to_install(converted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 2 and "pip install 'dmt-jepa[hf]'" in result.output
    assert not (tmp_path / "hf" / "config.json").exists()


def test_timm_directory_is_tagged_for_timm_and_states_measured_differences(converted, tmp_path):
    import timm

    result = CliRunner().invoke(app, ["export", str(converted), "--out", str(tmp_path / "timm"), "--format", "timm"])
    assert result.exit_code == 0, result.output
    meta, body = _card(tmp_path / "timm")
    assert meta["library_name"] == "timm" and "timm" in meta["tags"] and meta["pipeline_tag"] == "image-feature-extraction"
    assert "differ slightly" not in body
    encoder, _ = load_encoder(converted)
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    for size in [(64, 64), (96, 96), (64, 112)]:
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            measured = float((model.forward_features(images) - encoder(images)).abs().max())
        assert f"| timm {timm.__version__} | {size[0]} x {size[1]} | {measured:.2e} |" in body
