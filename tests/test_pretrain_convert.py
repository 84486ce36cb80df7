"""`dmtjepa convert`: a checkpoint in the public I-JEPA key layout -> our encoder file, same function."""

import math
import pickle

import pytest
import torch

from dmt_jepa.convert import ConvertError, convert_checkpoint
from dmt_jepa.encoder_file import load_encoder
from dmt_jepa.models import VisionTransformer


def public_sincos(side: int, dim: int) -> torch.Tensor:
    """The public code's table, written from its description: first half the column, second the row."""
    rows = []
    for r in range(side):
        for c in range(side):
            row = []
            for pos in (c, r):
                omegas = [1.0 / 10000 ** (i / (dim // 4)) for i in range(dim // 4)]
                row += [math.sin(pos * o) for o in omegas] + [math.cos(pos * o) for o in omegas]
            rows.append(row)
    return torch.tensor(rows)[None]  # [1, N, D]


def public_forward(vit: VisionTransformer, pos_embed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The public ViT's forward: patchify, add the stored table, blocks, norm."""
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2) + pos_embed
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)


def public_checkpoint(path, side=4, *, prefix="module.", pos_embed=None, seed=0) -> tuple[VisionTransformer, torch.Tensor]:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=16 * side, patch_size=16, embed_dim=192, depth=2, num_heads=3).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, p in vit.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    pos = public_sincos(side, 192) if pos_embed is None else pos_embed
    state = {prefix + k: v for k, v in vit.state_dict().items()}
    state[prefix + "pos_embed"] = pos
    other = {prefix + k: torch.zeros_like(v) for k, v in vit.state_dict().items()}
    other[prefix + "pos_embed"] = pos
    torch.save({"encoder": other, "target_encoder": state, "predictor": {}, "epoch": 300, "loss": 0.1}, path)
    return vit, pos


def test_public_checkpoint_converts_to_the_same_function(tmp_path):
    vit, pos = public_checkpoint(tmp_path / "ijepa.pth.tar")
    info = convert_checkpoint(tmp_path / "ijepa.pth.tar", tmp_path / "enc.safetensors")
    assert (info.arch, info.patch_size, info.img_size, info.embed_dim) == ("vit_tiny", 16, (64, 64), 192)
    encoder, _ = load_encoder(tmp_path / "enc.safetensors")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), public_forward(vit, pos, images), atol=1e-5, rtol=1e-5)


def test_table_in_another_channel_order_is_refused(tmp_path):
    table = public_sincos(4, 192)
    row_first = torch.cat([table[..., 96:], table[..., :96]], dim=-1)
    public_checkpoint(tmp_path / "c.pth.tar", prefix="", pos_embed=row_first)
    with pytest.raises(ConvertError, match="not a fixed 2-D sin-cos table"):
        convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors")


def test_which_selects_the_state_dict(tmp_path):
    public_checkpoint(tmp_path / "c.pth.tar")
    convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors", which="encoder")
    encoder, _ = load_encoder(tmp_path / "enc.safetensors")
    assert all(float(v.abs().sum()) == 0 for k, v in encoder.state_dict().items() if "blocks.0.attn" in k)


class NotATensor:
    pass


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (
            lambda p: p.write_bytes(pickle.dumps({"target_encoder": NotATensor()}, protocol=2)),
            "cannot be read as a tensors-only checkpoint",
        ),
        (lambda p: torch.save({"model": {}}, p), "has no 'target_encoder' state dict (it holds: model)"),
        (lambda p: public_checkpoint(p, pos_embed=torch.randn(1, 16, 192)), "not a fixed 2-D sin-cos table"),
        (lambda p: torch.save({"target_encoder": {"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}}, p), "no pos_embed"),
    ],
)
def test_unusable_checkpoints_are_one_sentence(tmp_path, make, message):
    make(tmp_path / "c.pth.tar")
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "enc.safetensors").exists()


def test_a_refused_pickle_does_not_pass_on_advice_to_load_it_unsafely(tmp_path):
    """torch's refusal suggests weights_only=False (running the file's code); ours names the problem and stops there."""
    (tmp_path / "c.pth.tar").write_bytes(pickle.dumps({"target_encoder": NotATensor()}, protocol=2))
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors")
    assert "Python objects other than tensors" in str(err.value)
    assert "can still be loaded" not in str(err.value) and "weights_only" not in str(err.value)


def test_cli_convert_does_not_overwrite(tmp_path):
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    public_checkpoint(tmp_path / "c.pth.tar")
    (tmp_path / "enc.safetensors").write_bytes(b"keep me")
    out = CliRunner().invoke(app, ["convert", str(tmp_path / "c.pth.tar"), str(tmp_path / "enc.safetensors")])
    assert out.exit_code == 2 and "already exists; pass --force" in out.output
    assert (tmp_path / "enc.safetensors").read_bytes() == b"keep me"
    out = CliRunner().invoke(app, ["convert", str(tmp_path / "c.pth.tar"), str(tmp_path / "enc.safetensors"), "--force"])
    assert out.exit_code == 0 and "vit_tiny/16" in out.output
