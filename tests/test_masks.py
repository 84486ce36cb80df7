"""Multi-block mask sampler invariants over many draws."""

import itertools

import pytest
import torch

from dmt_jepa.config import MaskConfig
from dmt_jepa.masks import MultiBlockMaskSampler, mask_problems


def draw(grid, n_batches, batch_size=8, seed=0, cfg=None):
    sampler = MultiBlockMaskSampler(grid, cfg or MaskConfig())
    g = torch.Generator().manual_seed(seed)
    return [sampler(batch_size, g) for _ in range(n_batches)]


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (6, 9), (12, 7)])
def test_invariants_over_many_draws(grid):
    h, w = grid
    cfg = MaskConfig(min_keep=4, static=False)  # blocks at their drawn size: each one a full rectangle
    rows_hit = torch.zeros(h, dtype=torch.bool)
    cols_hit = torch.zeros(w, dtype=torch.bool)
    ctx_rows_hit = torch.zeros(h, dtype=torch.bool)
    ctx_cols_hit = torch.zeros(w, dtype=torch.bool)
    for masks in draw(grid, 60, cfg=cfg):
        ctx, tgt = masks.context_idx, masks.target_idx
        assert ctx.min() >= 0 and ctx.max() < h * w and tgt.min() >= 0 and tgt.max() < h * w
        assert ctx.shape[1] >= cfg.min_keep
        assert tgt.shape[1] == cfg.num_targets
        for b in range(ctx.shape[0]):
            c = set(ctx[b].tolist())
            assert len(c) == ctx.shape[1], "context indices repeat"
            for block in tgt[b]:
                cells = block.tolist()
                assert not c & set(cells), "context and target overlap"
                r = [i // w for i in cells]
                q = [i % w for i in cells]
                # a block is a full rectangle
                assert len(set(cells)) == (max(r) - min(r) + 1) * (max(q) - min(q) + 1) == len(cells)
                rows_hit[r] = True
                cols_hit[q] = True
            ctx_rows_hit[[i // w for i in c]] = True
            ctx_cols_hit[[i % w for i in c]] = True
    assert rows_hit.all() and cols_hit.all(), "target blocks never reached some row/column"
    assert ctx_rows_hit[-1] and ctx_cols_hit[-1], "context never reached the last row/column"


def test_target_scale_respected_on_square_grid():
    for masks in draw((14, 14), 30, cfg=MaskConfig(static=False)):
        t = masks.target_idx.shape[2]
        # scale 0.15-0.2 of 196 patches, with rounding of the block sides
        assert 0.1 * 196 <= t <= 0.26 * 196


def test_same_seed_same_masks_and_other_seed_differs():
    a, b, c = draw((14, 14), 5, seed=3), draw((14, 14), 5, seed=3), draw((14, 14), 5, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x.context_idx, y.context_idx) and torch.equal(x.target_idx, y.target_idx)
    assert any(not torch.equal(x.target_idx, z.target_idx) for x, z in zip(a, c))


def test_impossible_min_keep_is_a_clear_error():
    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMaskSampler((3, 3), MaskConfig(min_keep=10))
    sampler = MultiBlockMaskSampler((4, 4), MaskConfig(min_keep=15))
    with pytest.raises(ValueError, match="could not keep"):
        sampler(2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (6, 9)])
def test_static_shapes_are_the_same_for_every_seed_batch_and_batch_size(grid):
    cfg = MaskConfig(min_keep=4)
    sampler = MultiBlockMaskSampler(grid, cfg)
    shapes = set()
    for seed in (0, 1, 7):
        for batch_size in (1, 3, 16):
            for masks in draw(grid, 4, batch_size=batch_size, seed=seed, cfg=cfg):
                shapes.add((masks.context_idx.shape[1], masks.target_idx.shape[1:]))
    assert shapes == {(sampler.context_size, torch.Size([cfg.num_targets, sampler.target_size]))}


@pytest.mark.parametrize("grid", [(14, 14), (12, 7)])
def test_static_blocks_are_subsets_of_drawn_blocks(grid):
    """Each fixed-size block lies inside one rectangle of the batch's drawn block size, the
    blocks of a batch share that size, and targets never enter the context."""
    h, w = grid
    sampler = MultiBlockMaskSampler(grid, MaskConfig(min_keep=4))
    g = torch.Generator().manual_seed(5)
    spans = set()
    for _ in range(20):
        masks = sampler(6, g)
        batch_spans = set()
        for ctx, blocks in zip(masks.context_idx, masks.target_idx):
            assert len(set(ctx.tolist())) == len(ctx), "context indices repeat"
            for block in blocks:
                cells = block.tolist()
                assert len(set(cells)) == len(cells) == sampler.target_size
                assert cells == sorted(cells)
                assert not set(cells) & set(ctx.tolist()), "context and target overlap"
                rows, cols = [c // w for c in cells], [c % w for c in cells]
                batch_spans.add((max(rows) - min(rows) + 1, max(cols) - min(cols) + 1))
        # every block's bounding box fits in the one drawn size of its batch
        rows_max, cols_max = max(r for r, _ in batch_spans), max(c for _, c in batch_spans)
        assert rows_max * cols_max >= sampler.target_size
        spans |= batch_spans
    assert len(spans) > 1, "blocks were not subsets at random positions"


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (6, 9)])
def test_target_size_is_the_smallest_block_the_size_rule_draws(grid):
    cfg = MaskConfig()
    sampler = MultiBlockMaskSampler(grid, cfg)
    g = torch.Generator().manual_seed(0)
    areas = [r * c for r, c in (sampler.block_size(cfg.target_scale, cfg.target_aspect, g) for _ in range(20000))]
    assert min(areas) == sampler.target_size


def test_context_size_is_the_low_quantile_of_drawn_contexts():
    """About 5 % of the contexts the paper's rule draws are smaller than the fixed size (those
    are redrawn), counted here with the sampler's own torch draws, not the size computation's."""
    grid, cfg = (14, 14), MaskConfig()
    sampler = MultiBlockMaskSampler(grid, cfg)
    g = torch.Generator().manual_seed(1)
    kept = []
    for _ in range(1500):
        tr, tc = sampler.block_size(cfg.target_scale, cfg.target_aspect, g)
        cr, cc = sampler.block_size(cfg.context_scale, cfg.context_aspect, g)
        covered = torch.stack([sampler.place(tr, tc, g) for _ in range(cfg.num_targets)]).any(0)
        kept.append(int((sampler.place(cr, cc, g) & ~covered).sum()))
    below = sum(k < sampler.context_size for k in kept) / len(kept)
    assert 0.02 <= below <= 0.09
    assert sampler.context_size >= cfg.min_keep


def test_static_sizes_depend_on_the_config_not_the_draws():
    a = MultiBlockMaskSampler((14, 14), MaskConfig())
    b = MultiBlockMaskSampler((14, 14), MaskConfig(target_scale=(0.1, 0.12)))
    assert a.target_size == 25  # 5 x 5 at scale 0.15, aspect 1 (29.4 patches)
    assert b.target_size < a.target_size and b.context_size > a.context_size


def test_every_setting_the_config_check_accepts_draws_masks_and_the_hardest_it_refuses_does_not():
    # The check judges the hardest size draw; the sampler draws sizes once per batch, so a setting
    # that passes must draw every batch, and one refused for its targets fails within a few batches.
    accepted = 0
    for side, min_keep, num_targets, context_scale, static in itertools.product(
        range(2, 6), (1, 3, 8), (1, 4), ((0.3, 0.5), (0.85, 1.0)), (True, False)
    ):
        cfg = MaskConfig(num_targets=num_targets, min_keep=min_keep, context_scale=context_scale, static=static)
        if mask_problems(side, cfg):
            continue
        accepted += 1
        sampler, generator = MultiBlockMaskSampler((side, side), cfg), torch.Generator().manual_seed(0)
        for _ in range(10):
            assert sampler(4, generator).context_idx.shape[1] >= min_keep, (side, cfg)
    assert accepted >= 40
    refused = MaskConfig(num_targets=1, min_keep=8)
    assert "mask.num_targets" in mask_problems(3, refused)[0]
    sampler, generator = MultiBlockMaskSampler((3, 3), refused), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="could not keep 8"):
        for _ in range(20):
            sampler(4, generator)
