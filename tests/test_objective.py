"""The DMT-JEPA objective: gradient flow, EMA, targets and learning on a fixed batch."""

import pytest
import torch
import torch.nn.functional as F

from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.neighbours import semantic_neighbours
from dmt_jepa.objective import DMTJEPA, train_step


def tiny_cfg(aggregation="cross_attention", **target):
    return MethodConfig(
        model=ModelConfig(arch="vit_nano", patch_size=16, img_size=96, pred_width=32, pred_depth=2),
        mask=MaskConfig(min_keep=4),
        target=TargetConfig(aggregation=aggregation, **target),
    )


def batch(seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 96, 96, generator=g)
    masks = MultiBlockMaskSampler((6, 6), MaskConfig(min_keep=4))(size, g)
    return images, masks


@pytest.mark.parametrize("aggregation", ["cross_attention", "self_attention", "mean", "none"])
def test_gradients_reach_online_modules_only(aggregation):
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg(aggregation))
    images, masks = batch()
    model(images, masks.context_idx, masks.target_idx).backward()
    online = [model.context_encoder, model.predictor] + ([model.online_head] if model.online_head else [])
    for module in online:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    frozen = [model.target_encoder] + ([model.target_head] if model.target_head else [])
    for module in frozen:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_heads_exist_only_for_learned_aggregations():
    assert DMTJEPA(tiny_cfg("cross_attention")).target_head is not None
    assert DMTJEPA(tiny_cfg("max")).online_head is None


def test_ema_update_equals_formula_for_encoder_and_head():
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg())
    for p in list(model.context_encoder.parameters()) + list(model.online_head.parameters()):
        p.data.normal_()  # online and target now differ everywhere
    before = {n: p.clone() for n, p in model.named_parameters()}
    m = 0.9
    model.update_target(m)
    for online, target in [("context_encoder", "target_encoder"), ("online_head", "target_head")]:
        for name, p in getattr(model, target).named_parameters():
            expected = before[f"{target}.{name}"] * m + before[f"{online}.{name}"] * (1 - m)
            assert torch.equal(p, expected), name
    for name, p in model.named_parameters():
        if name.startswith(("context_encoder", "online_head", "predictor")):
            assert torch.equal(p, before[name])


def test_targets_follow_the_paper_for_none_and_mean():
    torch.manual_seed(0)
    images, masks = batch()
    for aggregation in ["none", "mean"]:
        model = DMTJEPA(tiny_cfg(aggregation))
        h = F.layer_norm(model.target_encoder(images), (64,))
        targets = model.targets(images, masks.target_idx)  # [M*B, T, D]
        idx, valid = semantic_neighbours(h, (6, 6), k=4)
        for mblock in range(masks.target_idx.shape[1]):
            for b in range(images.shape[0]):
                for t, n in enumerate(masks.target_idx[b, mblock].tolist()):
                    if aggregation == "none":
                        ref = h[b, n]
                    else:
                        ref = h[b, idx[b, n][valid[b, n]]].mean(0)
                    torch.testing.assert_close(targets[mblock * images.shape[0] + b, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["cross_attention", "none"])
def test_loss_goes_down_on_a_fixed_batch(aggregation):
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg(aggregation))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    images, masks = batch(seed=1, size=4)
    losses = [train_step(model, images, masks, opt, momentum=0.996) for _ in range(50)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_bf16_autocast_step_runs_in_bf16_and_stays_close():
    torch.manual_seed(0)
    model = DMTJEPA(tiny_cfg())
    images, masks = batch()
    with torch.no_grad():
        fp32 = model(images, masks.context_idx, masks.target_idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images, masks.context_idx, masks.target_idx)
            assert model.context(images, masks.context_idx).dtype == torch.bfloat16
    assert abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()


def test_nonfinite_loss_raises():
    model = DMTJEPA(tiny_cfg("none"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, masks = batch()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        train_step(model, images, masks, opt, momentum=0.99)
