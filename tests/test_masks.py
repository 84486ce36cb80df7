"""Multi-block mask sampler invariants over many draws."""

import pytest
import torch

from dmt_jepa.config import MaskConfig
from dmt_jepa.masks import MultiBlockMaskSampler


def draw(grid, n_batches, batch_size=8, seed=0, cfg=None):
    sampler = MultiBlockMaskSampler(grid, cfg or MaskConfig())
    g = torch.Generator().manual_seed(seed)
    return [sampler(batch_size, g) for _ in range(n_batches)]


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (6, 9), (12, 7)])
def test_invariants_over_many_draws(grid):
    h, w = grid
    cfg = MaskConfig(min_keep=4)
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
    for masks in draw((14, 14), 30):
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
