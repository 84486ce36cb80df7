"""Model files and directories that lie or confuse: refused in one sentence before anything is built.

A real build is caught by `nothing_built()`: from that call on, every encoder constructed off the
meta device fails the test, so a refusal that comes after allocating the claimed model cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from embed_helpers import photo_samples, tiny_encoder, write_encoder_file, write_shard
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import dmt_jepa
from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import EncoderFileError, EncoderInfo, file_sha256, load_encoder, model_identity
from dmt_jepa.hub import PretrainedEncoder, transformers_config
from dmt_jepa.models import VisionTransformer
from dmt_jepa.serve import embed_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_built(monkeypatch):
    """Call it to fail on any encoder built from then on with real storage (the meta device allocates nothing)."""
    real = VisionTransformer.__init__

    def guarded(self, *args, **kwargs):
        assert torch.empty(0).device.type == "meta", "an encoder was allocated before its description was checked"
        real(self, *args, **kwargs)

    return lambda: monkeypatch.setattr(VisionTransformer, "__init__", guarded)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A model directory as `dmtjepa export --format hf` writes it: 32 wide, 2 blocks, 64 px."""
    encoder, info = load_encoder(write_encoder_file(tmp_path / "enc.safetensors"))
    model = PretrainedEncoder.from_info(info)
    model.load_state_dict(encoder.state_dict())
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(directory: Path, **changes) -> None:
    """Change the encoder's description; in the transformers layout its block, with IJepaConfig's fields made to agree."""
    config = json.loads((directory / "config.json").read_text())
    if "dmt_jepa" not in config:
        config.update(changes)
    else:
        config["dmt_jepa"].update(changes)
        try:
            agreeing = transformers_config(EncoderInfo.from_values(config["dmt_jepa"]))
        except EncoderFileError:
            agreeing = {}  # an impossible description: refused before the fields are read
        config.update({k: v for k, v in agreeing.items() if k not in ("dmt_jepa", "dmt_jepa_parity")})
    (directory / "config.json").write_text(json.dumps(config))


def rewrite(source: Path, target: Path, metadata: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of an encoder file with some metadata entries (JSON-encoded) or tensors replaced."""
    with safe_open(str(source), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    save_file({**state, **(tensors or {})}, str(target), metadata=meta)
    return target


def one_sentence(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text.endswith("."), text
    return text


def test_directory_claiming_a_far_bigger_model_is_refused_before_building(hf_dir, nothing_built):
    assert (hf_dir / "model.safetensors").stat().st_size < 1 << 20
    edit_config(hf_dir, embed_dim=1024, depth=48, num_heads=16)  # 600 M numbers claimed, 50 k held
    nothing_built()
    with pytest.raises(EncoderFileError) as err:
        dmt_jepa.from_pretrained(hf_dir)
    assert "does not hold the weights its config.json describes" in one_sentence(err.value)
    with pytest.raises(EncoderFileError, match="does not hold the weights"):
        torch.hub.load(str(ROOT), "dmt_jepa_encoder", source="local", weights=str(hf_dir))
    with pytest.raises(EncoderFileError, match="does not hold the weights"):
        PretrainedEncoder.from_pretrained(hf_dir)  # the mixin's own entry point


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"depth": -1}, "depth must be positive, not -1"),
        ({"patch_size": 0}, "patch_size must be positive, not 0"),
        ({"patch_size": "16"}, "patch_size must be an integer, got '16'"),
        ({"img_size": "224"}, "img_size must be [height, width]"),
        ({"img_size": [160000, 160000]}, "must be at most 4096 pixels a side"),
        ({"embed_dim": 1 << 20, "num_heads": 2}, "embed_dim must be at most 8192"),
        ({"num_heads": 0}, "num_heads must be positive"),
        ({"mlp_ratio": "4"}, "mlp_ratio must be finite numbers"),
        ({"arch": 5}, "arch must be a name"),
        ({"pixel_std": [0.2, 0, 0.2]}, "pixel_std must be positive"),
    ],
)
def test_impossible_directory_config_is_one_sentence(hf_dir, nothing_built, changes, words):
    edit_config(hf_dir, **changes)
    nothing_built()
    with pytest.raises(EncoderFileError) as err:
        dmt_jepa.from_pretrained(hf_dir)
    assert words in one_sentence(err.value)


@pytest.mark.parametrize(
    "text, words", [("[1, 2, 3]", "is not a mapping of settings"), ("[" * 100_000, "is not JSON"), ("\xff\xfe", "is not JSON")]
)
def test_directory_config_that_is_not_a_json_mapping_is_one_sentence(hf_dir, nothing_built, text, words):
    (hf_dir / "config.json").write_bytes(text.encode("latin-1"))
    nothing_built()
    with pytest.raises(EncoderFileError, match=words) as err:
        dmt_jepa.from_pretrained(hf_dir)
    one_sentence(err.value)


def test_encoder_file_with_a_huge_image_size_is_refused(tmp_path, nothing_built):
    lying = rewrite(
        write_encoder_file(tmp_path / "enc.safetensors"), tmp_path / "lying.safetensors", metadata={"img_size": [160000, 160000]}
    )
    nothing_built()
    with pytest.raises(EncoderFileError) as err:
        load_encoder(lying)
    assert "img_size [160000, 160000] must be at most 4096" in one_sentence(err.value)


def test_encoder_file_padded_to_the_claimed_count_is_refused_before_building(tmp_path, nothing_built):
    # 8 blocks claimed, 2 held, and a padding tensor so that the file holds as many numbers as 8 blocks
    source = write_encoder_file(tmp_path / "enc.safetensors")
    padding = torch.zeros(6 * sum(v.numel() for k, v in tiny_encoder().state_dict().items() if k.startswith("blocks.0.")))
    lying = rewrite(source, tmp_path / "lying.safetensors", metadata={"depth": 8}, tensors={"padding": padding})
    nothing_built()
    with pytest.raises(EncoderFileError) as err:
        load_encoder(lying)
    assert "blocks.2." in one_sentence(err.value) and "is missing" in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "./no-such-model",
        "~/no-such-dmt-jepa-model",
        "{tmp}/absent/encoder.safetensors",
        "{tmp}/absent/hf",
        "runs/a/encoder.safetensors",
    ],
)
def test_missing_local_path_says_it_does_not_exist(tmp_path, text):
    text = text.format(tmp=tmp_path)
    with pytest.raises(EncoderFileError) as err:
        dmt_jepa.from_pretrained(text)
    assert f"{text} does not exist" in one_sentence(err.value) and "Repo id" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"img_size": 160000}, "image size"),
        ({"img_size": "224"}, "image size"),
        ({"img_size": -16}, "image size"),
        ({"patch_size": "16"}, "patch size"),
        ({"patch_size": 0}, "patch size"),
        ({"arch": "vit_gigantic"}, "unknown architecture"),
    ],
)
def test_torch_hub_untrained_encoder_refuses_impossible_sizes(kwargs, words, nothing_built):
    nothing_built()
    with pytest.raises(ValueError, match=words) as err:
        torch.hub.load(str(ROOT), "dmt_jepa_encoder", source="local", **{"arch": "vit_tiny", **kwargs})
    one_sentence(err.value)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """hf/ and timm/ exported from one encoder file by the CLI."""
    root = tmp_path_factory.mktemp("exported")
    write_encoder_file(root / "enc.safetensors")
    for fmt in ("hf", "timm"):
        result = CliRunner().invoke(app, ["export", str(root / "enc.safetensors"), "--out", str(root / fmt), "--format", fmt])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("fmt, kind", [("hf", "Hugging Face model directory"), ("timm", "timm model directory")])
def test_info_says_what_a_model_directory_is(exported, fmt, kind):
    result = CliRunner().invoke(app, ["info", str(exported / fmt)])
    assert result.exit_code == 0, result.output
    assert f"kind: {kind}" in result.stdout and "shards done" not in result.stdout
    assert "patch 16, width 32, 2 blocks, 2 heads" in result.stdout and "trained at: 64x64" in result.stdout
    as_json = json.loads(CliRunner().invoke(app, ["info", str(exported / fmt), "--json"]).stdout)
    assert as_json["kind"] == kind + (" (dmt-jepa encoder)" if fmt == "hf" else "")


def test_info_on_a_lying_model_directory_is_one_sentence(exported, tmp_path):
    import shutil

    shutil.copytree(exported / "hf", tmp_path / "hf")
    edit_config(tmp_path / "hf", depth=48)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "does not hold the weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_embed_with_a_directory_as_model_says_it_is_a_directory(exported, tmp_path):
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 1))
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(exported / "hf")])
    assert result.exit_code == 2
    assert f"{exported / 'hf'} is a directory; --model takes a model file" in result.stderr
    assert "does not exist" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_identity_follows_tensors_and_output_metadata_not_file_bytes(tmp_path):
    source = write_encoder_file(tmp_path / "enc.safetensors")
    same = rewrite(source, tmp_path / "same.safetensors", metadata={"provenance": {"source": "elsewhere", "license": "mit"}})
    assert file_sha256(same) != file_sha256(source)
    assert model_identity(same) == model_identity(source)
    weight = tiny_encoder().state_dict()["blocks.1.mlp.fc2.weight"].clone()
    weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one number, one ulp
    changed = [
        rewrite(source, tmp_path / "weight.safetensors", tensors={"blocks.1.mlp.fc2.weight": weight}),
        rewrite(source, tmp_path / "mean.safetensors", metadata={"pixel_mean": [0.5, 0.5, 0.5]}),
        rewrite(source, tmp_path / "size.safetensors", metadata={"img_size": [32, 32]}),
    ]
    identities = {model_identity(path) for path in [source, *changed]}
    assert len(identities) == 4


def test_embed_rerun_after_the_encoder_is_rewritten_unchanged_skips_every_shard(tmp_path):
    source = write_encoder_file(tmp_path / "enc.safetensors")
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 2))
    first = embed_shards(str(tmp_path / "in"), tmp_path / "out", source, workers=0)
    before = (tmp_path / "out" / "s.tar").read_bytes()
    rewrite(source, source, metadata={"provenance": {"source": "written again"}})  # new bytes, same model
    again = embed_shards(str(tmp_path / "in"), tmp_path / "out", source, workers=0)
    assert first.completed == ["s"] and again.skipped == ["s"] and again.completed == []
    assert (tmp_path / "out" / "s.tar").read_bytes() == before
