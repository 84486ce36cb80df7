"""Target settings the ablations need: the patch among its own keys, no context path, a plain-target mix."""

import pytest
import torch
import torch.nn.functional as F
from test_objective import batch, tiny_cfg

from dmt_jepa.config import TargetConfig
from dmt_jepa.heads import gather_rows
from dmt_jepa.neighbours import semantic_neighbours
from dmt_jepa.objective import DMTJEPA, block_major, train_step


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_include_self_puts_the_patch_first_then_its_best_neighbours(border):
    feats = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0))
    idx, valid = semantic_neighbours(feats, (5, 6), k=4, k_size=3, border=border, include_self=True)
    rest, rest_valid = semantic_neighbours(feats, (5, 6), k=3, k_size=3, border=border)
    assert torch.equal(idx[..., 0], torch.arange(30).expand(2, 30)) and bool(valid[..., 0].all())
    assert torch.equal(idx[..., 1:], rest) and torch.equal(valid[..., 1:], rest_valid)


def test_include_self_allows_the_whole_window():
    assert TargetConfig(k=9, include_self=True).k == 9
    with pytest.raises(ValueError, match="window's 8 candidates"):
        TargetConfig(k=9)
    with pytest.raises(ValueError, match="plain_weight"):
        TargetConfig(plain_weight=1.5)


def test_no_context_path_leaves_the_head_untrained_and_the_context_untouched():
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg(context="none"))
    head_before = {k: v.clone() for k, v in model.target_head.state_dict().items()}
    images, masks = batch()
    expected = model.context_encoder(images, keep=masks.context_idx)
    assert torch.equal(model.context(images, masks.context_idx), expected)
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.online_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    train_step(model, images, masks, optimizer, momentum=0.5)
    for k, v in model.target_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k  # EMA of an untrained head is the head at init


def test_plain_weight_mixes_the_two_losses():
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg(plain_weight=0.25))
    images, masks = batch()
    got = model(images, masks.context_idx, masks.target_idx)
    # By hand: prediction, aggregated targets, own features of the same positions.
    positions = masks.target_idx.flatten(1)
    h = F.layer_norm(model.target_encoder(images), (model.target_encoder.embed_dim,))
    aggregated = model.targets(images, masks.target_idx)
    own = block_major(gather_rows(h, positions), masks.target_idx.shape)
    prediction = model.predictor(model.context(images, masks.context_idx), masks.context_idx, masks.target_idx, (6, 6))
    expected = 0.75 * F.smooth_l1_loss(prediction, aggregated) + 0.25 * F.smooth_l1_loss(prediction, own)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, F.smooth_l1_loss(prediction, aggregated), atol=1e-4)


def test_cos_to_own_patch_is_one_for_i_jepa_and_below_for_aggregated_targets():
    torch.manual_seed(0)
    images, _ = batch()
    assert DMTJEPA(tiny_cfg("none")).locality(images)["cos_to_own_patch"] == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    assert DMTJEPA(tiny_cfg("mean")).locality(images)["cos_to_own_patch"] < 0.99
