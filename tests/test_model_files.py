"""Model files that lie: impossible metadata, sizes the tensors do not back, non-finite weights; refused in one sentence."""

import json

import numpy as np
import pytest
import torch
from embed_helpers import photo_samples, tiny_encoder, write_encoder_file, write_shard
from safetensors import safe_open
from safetensors.torch import save_file

from dmt_jepa.convert import ConvertError, convert_checkpoint
from dmt_jepa.encoder_file import EncoderFileError, info_from_encoder, load_encoder
from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.backends import BackendError
from dmt_jepa.serve.backends.torch_backend import TorchBackend


def rewrite(source, target, metadata=None, tensors=None):
    """A copy of an encoder file with some metadata entries or tensors replaced."""
    with safe_open(str(source), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    state.update(tensors or {})
    save_file(state, str(target), metadata=meta)
    return target


@pytest.mark.parametrize(
    "metadata, words",
    [
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"num_heads": 3}, "not divisible by num_heads 3"),
        ({"img_size": [-64, 64]}, "positive multiples of patch_size"),
        ({"img_size": [60, 64]}, "positive multiples of patch_size"),
        ({"depth": 2.5}, "depth must be an integer"),
        ({"pixel_std": [0.2, 0.0, 0.2]}, "pixel_std must be positive"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio must be finite"),
        ({"embed_dim": 4096, "depth": 64, "num_heads": 64}, "does not hold the weights its metadata describes"),
        ({"embed_dim": 65536, "depth": 64, "num_heads": 64}, "embed_dim must be at most 8192"),
        ({"patch_size": 32}, "does not hold the weights its metadata describes"),
    ],
)
def test_lying_metadata_is_refused_before_anything_is_built(tmp_path, metadata, words):
    source = write_encoder_file(tmp_path / "enc.safetensors")
    lying = rewrite(source, tmp_path / "lying.safetensors", metadata=metadata)
    # Refused from the header: the 4096 x 64-block case would need ~50 GB if it were built for real.
    with pytest.raises(EncoderFileError) as err:
        load_encoder(lying)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    source = write_encoder_file(tmp_path / "enc.safetensors")
    weight = tiny_encoder().state_dict()["blocks.1.attn.qkv.weight"].clone()
    weight[3, 5] = float("nan")
    bad = rewrite(source, tmp_path / "nan.safetensors", tensors={"blocks.1.attn.qkv.weight": weight})
    with pytest.raises(EncoderFileError, match="not finite numbers .* in blocks.1.attn.qkv.weight"):
        load_encoder(bad)


def test_non_finite_outputs_of_the_first_batch_stop_the_job_writing_nothing(tmp_path):
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.norm.weight[0] = float("inf")
    backend = TorchBackend(
        encoder, info_from_encoder(encoder, "vit_test"), device="cpu", precision="fp32", model_path=tmp_path / "m"
    )
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 3))
    with pytest.raises(BackendError, match="non-finite embeddings"):
        embed_shards(str(tmp_path / "in"), tmp_path / "out", backend, workers=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "state, words",
    [
        (
            {
                "patch_embed.proj.weight": torch.tensor(1.0),
                "pos_embed": torch.zeros(1, 4, 8),
                "blocks.0.mlp.fc1.weight": torch.zeros(32, 8),
            },
            "not [D, 3, p, p]",
        ),
        (
            {
                "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                "pos_embed": torch.zeros(4, 8),
                "blocks.0.mlp.fc1.weight": torch.zeros(32, 8),
            },
            "not [1, N, 8]",
        ),
        (
            {
                "patch_embed.proj.weight": torch.full((8, 3, 16, 16), float("nan")),
                "pos_embed": torch.zeros(1, 4, 8),
                "blocks.0.mlp.fc1.weight": torch.zeros(32, 8),
            },
            "non-finite",
        ),
        (
            {
                "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16, dtype=torch.int64),
                "pos_embed": torch.zeros(1, 4, 8),
                "blocks.0.mlp.fc1.weight": torch.zeros(32, 8),
            },
            "not a floating-point tensor",
        ),
    ],
)
def test_convert_refuses_malformed_tensors_in_one_sentence(tmp_path, state, words):
    torch.save({"target_encoder": state}, tmp_path / "c.pth.tar")
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "enc.safetensors").exists()


def test_a_good_file_still_loads_to_the_same_function(tmp_path):
    path = write_encoder_file(tmp_path / "enc.safetensors")
    loaded, _ = load_encoder(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), tiny_encoder()(x).numpy())
