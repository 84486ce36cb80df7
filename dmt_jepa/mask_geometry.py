"""Block shapes on a patch grid, and whether a mask config can be drawn on one (numpy only).

The sampler (dmt_jepa.masks) draws its blocks with these shapes and cuts them to the static sizes
computed here; the config check runs before training imports torch, so a config that cannot be
drawn is refused at once.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np

from dmt_jepa.config import MaskConfig

CONTEXT_QUANTILE = 0.05  # share of drawn contexts smaller than the fixed context size (those are redrawn)
_CONTEXT_DRAWS = 4096  # draws behind that quantile, from a fixed seed


def block_shape(grid: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """(rows, cols) of a block covering a `scale` fraction of the grid at aspect rows/cols."""
    height, width = grid
    area = height * width * scale
    rows = int(round(math.sqrt(area * aspect)))
    cols = int(round(math.sqrt(area / aspect)))
    return min(max(rows, 1), height), min(max(cols, 1), width)


@lru_cache(maxsize=64)
def static_target_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    # The block area is not monotone in the aspect (rounding), so the smallest one is searched on
    # a fine grid of both ranges; a draw that still falls below is redrawn by the sampler.
    scales = np.linspace(scale[0], scale[1], 65)
    aspects = np.linspace(aspect[0], aspect[1], 1025)
    return min(math.prod(block_shape(grid, float(s), float(a))) for s in scales for a in aspects)


@lru_cache(maxsize=64)
def static_context_size(grid: tuple[int, int], cfg_key: tuple) -> int:
    cfg = MaskConfig(*cfg_key)
    rng = random.Random(0)  # a fixed seed: the size depends on the grid and the config only
    kept = []
    for _ in range(_CONTEXT_DRAWS):
        tr, tc = block_shape(grid, rng.uniform(*cfg.target_scale), rng.uniform(*cfg.target_aspect))
        cr, cc = block_shape(grid, rng.uniform(*cfg.context_scale), rng.uniform(*cfg.context_aspect))
        kept.append(_kept(grid, (tr, tc), (cr, cc), cfg.num_targets, rng))
    return max(cfg.min_keep, int(np.quantile(kept, CONTEXT_QUANTILE)))


def _kept(grid: tuple[int, int], target: tuple[int, int], context: tuple[int, int], num_targets: int, rng: random.Random) -> int:
    """Context patches left when `num_targets` target blocks and one context block of these shapes are placed at random."""
    height, width = grid
    (tr, tc), (cr, cc) = target, context
    covered = np.zeros((height, width), dtype=bool)
    for _ in range(num_targets):
        top, left = rng.randrange(height - tr + 1), rng.randrange(width - tc + 1)
        covered[top : top + tr, left : left + tc] = True
    top, left = rng.randrange(height - cr + 1), rng.randrange(width - cc + 1)
    return int((~covered[top : top + cr, left : left + cc]).sum())


# The sampler redraws an image's blocks up to max_tries (100) times: a worst-case success rate of
# 20% per draw leaves a failure chance of 0.8^100 ~ 2e-10 per image.
MIN_KEPT_SHARE = 0.2
_PLACEMENT_DRAWS = 1024
MAX_SIMULATED_PATCHES = 128 * 128  # placements on larger grids are not drawn before training (too slow to be worth it)


def _extreme_block(grid: tuple[int, int], scale: float, aspect: tuple[float, float], pick) -> tuple[int, int]:
    """The largest (pick=max) or smallest (pick=min) block of this scale over the aspect range."""
    return pick((block_shape(grid, scale, float(a)) for a in np.linspace(*aspect, 257)), key=math.prod)


def mask_problems(grid_side: int, cfg: MaskConfig) -> list[str]:
    """What keeps the sampler from drawing masks on a grid_side x grid_side grid, each as a phrase naming its keys.

    The hardest draw is judged: the largest target blocks against the smallest context block; `cfg`'s
    ranges must already be valid (config_problems checks them first).
    """
    grid, patches = (grid_side, grid_side), grid_side * grid_side
    on_grid = f"the {grid_side}x{grid_side} patch grid (model.img_size / model.patch_size)"
    if patches == 1:
        return [f"{on_grid} is one patch, which every target block covers, leaving no context; use at least 2 patches per side"]
    problems = [
        f"mask.{key} must be at most the {patches} patches of {on_grid}, got {value}"
        for key, value in (("min_keep", cfg.min_keep), ("num_targets", cfg.num_targets))
        if value > patches
    ]
    if problems:
        return problems
    context = _extreme_block(grid, cfg.context_scale[0], cfg.context_aspect, min)
    if math.prod(context) < cfg.min_keep:
        size = f"{math.prod(context)} patch" + ("es" if math.prod(context) > 1 else "")
        return [
            f"mask.context_scale {list(cfg.context_scale)} can draw a context block of {size} on "
            f"{on_grid}, fewer than mask.min_keep {cfg.min_keep}; raise mask.context_scale or lower mask.min_keep"
        ]
    if patches > MAX_SIMULATED_PATCHES:
        return []
    target = _extreme_block(grid, cfg.target_scale[1], cfg.target_aspect, max)
    rng = random.Random(0)
    kept = [_kept(grid, target, context, cfg.num_targets, rng) for _ in range(_PLACEMENT_DRAWS)]
    share = float(np.mean(np.array(kept) >= cfg.min_keep))
    if share < MIN_KEPT_SHARE:
        return [
            f"the target blocks (mask.num_targets {cfg.num_targets}, mask.target_scale {list(cfg.target_scale)}) can "
            f"leave at least mask.min_keep {cfg.min_keep} context patches in only {share:.0%} of draws on {on_grid}; "
            "lower mask.num_targets, mask.target_scale or mask.min_keep, or raise mask.context_scale"
        ]
    return []
