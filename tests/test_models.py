"""Encoder and predictor: shapes, position embedding, context selection."""

import math

import pytest
import torch

from dmt_jepa.models import Predictor, VisionTransformer, create_encoder, sincos_2d


def test_sincos_matches_hand_formula():
    h, w, dim = 3, 5, 8
    emb = sincos_2d(h, w, dim)
    quarter = dim // 4
    for r in range(h):
        for c in range(w):
            expected = []
            for pos in (c, r):  # column half first, then row
                omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
                expected += [math.sin(pos * o) for o in omegas] + [math.cos(pos * o) for o in omegas]
            torch.testing.assert_close(emb[r * w + c], torch.tensor(expected), rtol=0, atol=1e-6)


def test_sincos_other_grid_extends_training_grid():
    # A larger grid evaluates the same function: its top-left 14x14 equals the 14x14 table.
    small = sincos_2d(14, 14, 64).reshape(14, 14, 64)
    big = sincos_2d(20, 30, 64).reshape(20, 30, 64)
    torch.testing.assert_close(big[:14, :14], small)


@pytest.mark.parametrize("patch", [14, 16])
def test_encoder_shapes_any_grid(patch):
    enc = create_encoder("vit_tiny", patch_size=patch).eval()
    for h, w in [(224, 224), (10 * patch, 18 * patch)]:
        x = torch.randn(2, 3, h, w)
        out = enc(x)
        assert out.shape == (2, (h // patch) * (w // patch), 192)
        grid, pooled = enc.dense(x)
        assert grid.shape == (2, h // patch, w // patch, 192)
        torch.testing.assert_close(pooled, grid.mean(dim=(1, 2)))


def test_keep_equals_processing_only_the_kept_patches():
    # With no attention across dropped patches, keeping K patches equals encoding an image whose
    # token sequence is exactly those K patches; check against a manual re-implementation.
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny").eval()
    x = torch.randn(2, 3, 224, 224)
    keep = torch.stack([torch.randperm(196)[:50].sort().values for _ in range(2)])
    tokens, _, _ = enc.embed(x)
    manual = torch.stack([tokens[b, keep[b]] for b in range(2)])
    for block in enc.blocks:
        manual = block(manual)
    manual = enc.norm(manual)
    torch.testing.assert_close(enc(x, keep=keep), manual)
    # keeping every patch is the full forward
    torch.testing.assert_close(enc(x, keep=torch.arange(196).expand(2, -1)), enc(x))


def test_factory_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_encoder("vit_gigantic")
    for bad in (1, 0, 65):
        with pytest.raises(ValueError, match="patch size"):
            create_encoder("vit_tiny", patch_size=bad)


def test_variants_have_paper_widths():
    for arch, dim, depth in [("vit_small", 384, 12), ("vit_base", 768, 12)]:
        enc = create_encoder(arch)
        assert enc.embed_dim == dim and len(enc.blocks) == depth


def test_predictor_block_major_order_and_shapes():
    torch.manual_seed(0)
    pred = Predictor(embed_dim=32, predictor_dim=16, depth=2, num_heads=2).eval()
    ctx = torch.randn(3, 10, 32)
    ctx_idx = torch.stack([torch.randperm(36)[:10] for _ in range(3)])
    tgt_idx = torch.stack([torch.stack([torch.randperm(36)[:4] for _ in range(2)]) for _ in range(3)])  # [B, M, T]
    out = pred(ctx, ctx_idx, tgt_idx, (6, 6))
    assert out.shape == (2 * 3, 4, 32)
    # row m*B + b is block m of image b: run that one alone
    for m in range(2):
        for b in range(3):
            single = pred(ctx[b : b + 1], ctx_idx[b : b + 1], tgt_idx[b : b + 1, m : m + 1], (6, 6))
            torch.testing.assert_close(out[m * 3 + b], single[0], rtol=1e-5, atol=1e-5)


def _hand_run(enc, x):
    """Every block's output [B, N, D], computed without the encoder's own loop."""
    tokens = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], conv then row-major flatten
    h, w = x.shape[-2] // enc.patch_size, x.shape[-1] // enc.patch_size
    tokens = tokens + sincos_2d(h, w, enc.embed_dim)
    outputs = []
    for block in enc.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    return outputs, h, w


def test_intermediate_layers_equal_a_hand_run_of_the_blocks():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(2, 3, 48, 80)  # non-square, not the training size
    with torch.no_grad():
        outputs, h, w = _hand_run(enc, x)
        raw = enc.intermediate_layers(x, [0, 2, -1], norm=False, output_fmt="NHWC")
        normed = enc.intermediate_layers(x, [0, 2, -1], output_fmt="NHWC")
        grid, pooled = enc.dense(x)
    for got_raw, got_normed, index in zip(raw.maps, normed.maps, [0, 2, 3]):
        expected = outputs[index].reshape(2, h, w, 32)
        torch.testing.assert_close(got_raw, expected)
        torch.testing.assert_close(got_normed, enc.norm(expected))
    # The normed last layer is the deployed grid, and the pooled vector is the deployed one.
    torch.testing.assert_close(normed.maps[-1], grid)
    torch.testing.assert_close(normed.pooled, pooled)
    torch.testing.assert_close(raw.pooled, pooled)


def test_intermediate_layers_last_n_and_layouts_agree():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        last_two = enc.intermediate_layers(x, 2, output_fmt="NHWC")
        explicit = enc.intermediate_layers(x, [2, 3], output_fmt="NHWC")
        default = enc.intermediate_layers(x, [2, 3])
    for a, b, c in zip(last_two.maps, explicit.maps, default.maps):
        assert a.shape == (1, 4, 6, 32) and c.shape == (1, 32, 4, 6)  # NCHW unless NHWC is asked for
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, a.permute(0, 3, 1, 2))


def test_intermediate_layers_reject_bad_choices():
    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2)
    x = torch.randn(1, 3, 32, 32)
    for layers in (0, 5, [4], [-5], []):
        with pytest.raises(ValueError, match="layer"):
            enc.intermediate_layers(x, layers)
    with pytest.raises(ValueError, match="format"):
        enc.intermediate_layers(x, 1, output_fmt="NWHC")


def test_forward_intermediates_follow_timm_on_a_hand_run():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        outputs, h, w = _hand_run(enc, x)
        final, maps = enc.forward_intermediates(x)  # timm defaults: every block, no norm, NCHW
        only = enc.forward_intermediates(x, [1, -1], norm=True, output_fmt="NLC", intermediates_only=True)
        early = enc.forward_intermediates(x, 2, intermediates_only=True, stop_early=True)
        features = enc.forward_features(x)
    assert len(maps) == 4
    for got, tokens in zip(maps, outputs):
        torch.testing.assert_close(got, tokens.reshape(2, h, w, 32).permute(0, 3, 1, 2))
    torch.testing.assert_close(final, enc.norm(outputs[-1]))
    torch.testing.assert_close(features, enc.norm(outputs[-1]))
    torch.testing.assert_close(only[0], enc.norm(outputs[1]))
    torch.testing.assert_close(only[1], enc.norm(outputs[3]))
    torch.testing.assert_close(early[0], maps[2])
    torch.testing.assert_close(early[1], maps[3])


def test_forward_intermediates_take_the_indices_timm_takes():
    from timm.models._features import feature_take_indices

    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        every = enc.forward_intermediates(x, intermediates_only=True)
        for indices in (None, 1, 3, 4, [0], [-1], [2, 0], [-4, -2, 3]):
            taken, _ = feature_take_indices(4, indices)
            got = enc.forward_intermediates(x, indices, intermediates_only=True)
            assert len(got) == len(taken)
            for tensor, index in zip(got, taken):
                torch.testing.assert_close(tensor, every[index])
    for indices in (0, 5, [4], [-5], []):
        with pytest.raises(ValueError, match="layer"):
            enc.forward_intermediates(x, indices)
    with pytest.raises(ValueError, match="format"):
        enc.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="intermediates_only"):
        enc.forward_intermediates(x, 1, stop_early=True)


def test_timm_surface_describes_the_encoder():
    enc = create_encoder("vit_nano", patch_size=8, img_size=32)
    assert enc.num_features == 64
    assert enc.feature_info == [{"module": f"blocks.{i}", "num_chs": 64, "reduction": 8} for i in range(4)]
    for entry in enc.feature_info:  # each names a real module of that width
        assert enc.get_submodule(entry["module"]).mlp.fc2.out_features == entry["num_chs"]


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2)
    x = torch.randn(2, 3, 32, 48)

    def run():
        enc.zero_grad()
        out = enc(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters()]

    plain_out, plain_grads = run()
    enc.set_grad_checkpointing()
    calls, attention = [], enc.blocks[0].attn.forward
    enc.blocks[0].attn.forward = lambda *args, **kwargs: calls.append(1) or attention(*args, **kwargs)
    ckpt_out, ckpt_grads = run()
    del enc.blocks[0].attn.forward
    assert enc.grad_checkpointing and len(calls) == 2  # block 0 ran again in the backward pass
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)
