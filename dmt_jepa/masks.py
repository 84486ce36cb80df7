"""Multi-block masking (I-JEPA): target blocks, and one context block with the targets removed.

With `mask.static` (the default) every batch has the same shapes: `context_size` context patches
and `num_targets` x `target_size` target patches per image, both functions of the grid and the
MaskConfig alone. Blocks are still drawn as the paper draws them; the index lists are then cut to
the fixed sizes by random subsets. Fixed shapes let `torch.compile` and CUDA graphs reuse one
compiled step and make every timed step the same workload.
"""

from __future__ import annotations

import math
import random
from dataclasses import astuple, dataclass
from functools import lru_cache

import numpy as np
import torch

from dmt_jepa.config import MaskConfig

CONTEXT_QUANTILE = 0.05  # share of drawn contexts smaller than the fixed context size (those are redrawn)
_CONTEXT_DRAWS = 4096  # draws behind that quantile, from a fixed seed


@dataclass
class Masks:
    """Patch indices (row-major in the grid) of one batch."""

    context_idx: torch.Tensor  # [B, Nc] long, sorted
    target_idx: torch.Tensor  # [B, M, T] long, each block sorted

    def to(self, device, non_blocking: bool = False) -> "Masks":
        return Masks(
            self.context_idx.to(device, non_blocking=non_blocking), self.target_idx.to(device, non_blocking=non_blocking)
        )


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(high_exclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_exclusive, (1,), generator=generator).item())


def block_shape(grid: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """(rows, cols) of a block covering a `scale` fraction of the grid at aspect rows/cols."""
    height, width = grid
    area = height * width * scale
    rows = int(round(math.sqrt(area * aspect)))
    cols = int(round(math.sqrt(area / aspect)))
    return min(max(rows, 1), height), min(max(cols, 1), width)


@lru_cache(maxsize=64)
def _target_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    # The block area is not monotone in the aspect (rounding), so the smallest one is searched on
    # a fine grid of both ranges; a draw that still falls below is redrawn by the sampler.
    scales = np.linspace(scale[0], scale[1], 65)
    aspects = np.linspace(aspect[0], aspect[1], 1025)
    return min(math.prod(block_shape(grid, float(s), float(a))) for s in scales for a in aspects)


@lru_cache(maxsize=64)
def _context_size(grid: tuple[int, int], cfg_key: tuple) -> int:
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


class MultiBlockMaskSampler:
    """Samples I-JEPA masks for a batch; seeded through the torch.Generator it is given.

    Block sizes (target and context) are drawn once per batch; positions are drawn per image. A
    block's top-left corner is drawn from every position where it fits, so blocks reach the last
    row and column of the grid. Static (default): each target block is cut to `target_size`
    patches (the smallest block the size rule draws) and each context to `context_size` (the 5th
    percentile of drawn contexts, at least `min_keep`) by random subsets; an image whose context
    would be smaller is redrawn. Otherwise contexts are cut to the batch's smallest, keeping at
    least `min_keep` patches, and blocks keep their drawn size.
    """

    max_tries = 100

    def __init__(self, grid: tuple[int, int], cfg: MaskConfig | None = None):
        self.height, self.width = grid
        self.cfg = cfg or MaskConfig()
        if self.cfg.min_keep > self.height * self.width:
            raise ValueError(f"min_keep={self.cfg.min_keep} exceeds the {self.height}x{self.width} grid")

    @property
    def target_size(self) -> int:
        """Patches per target block in every static batch."""
        return _target_size((self.height, self.width), tuple(self.cfg.target_scale), tuple(self.cfg.target_aspect))

    @property
    def context_size(self) -> int:
        """Context patches per image in every static batch."""
        return _context_size((self.height, self.width), astuple(self.cfg))

    def block_size(self, scale: tuple[float, float], aspect: tuple[float, float], generator) -> tuple[int, int]:
        """(rows, cols) of a block of a scale and an aspect drawn uniformly from their ranges."""
        s = _uniform(*scale, generator)
        ar = _uniform(*aspect, generator)
        return block_shape((self.height, self.width), s, ar)

    def place(self, rows: int, cols: int, generator) -> torch.Tensor:
        """A [h, w] bool mask of one block at a uniformly drawn position where it fits."""
        top = _randint(self.height - rows + 1, generator)
        left = _randint(self.width - cols + 1, generator)
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask[top : top + rows, left : left + cols] = True
        return mask

    def _target_block_size(self, generator) -> tuple[int, int]:
        cfg = self.cfg
        for _ in range(self.max_tries):
            rows, cols = self.block_size(cfg.target_scale, cfg.target_aspect, generator)
            if not cfg.static or rows * cols >= self.target_size:
                return rows, cols
        raise AssertionError("the fixed target size is the smallest drawable block")

    def __call__(self, batch_size: int, generator: torch.Generator) -> Masks:
        cfg = self.cfg
        min_keep = self.context_size if cfg.static else cfg.min_keep
        tgt_rows, tgt_cols = self._target_block_size(generator)
        ctx_rows, ctx_cols = self.block_size(cfg.context_scale, cfg.context_aspect, generator)
        contexts, targets = [], []
        for _ in range(batch_size):
            for _ in range(self.max_tries):
                blocks = [self.place(tgt_rows, tgt_cols, generator) for _ in range(cfg.num_targets)]
                covered = torch.stack(blocks).any(dim=0)
                context = self.place(ctx_rows, ctx_cols, generator) & ~covered
                if int(context.sum()) >= min_keep:
                    break
            else:
                raise ValueError(
                    f"could not keep {min_keep} context patches on a {self.height}x{self.width} grid "
                    f"after {self.max_tries} draws; lower mask.min_keep, mask.num_targets or mask.target_scale, "
                    "or raise mask.context_scale"
                )
            contexts.append(context.flatten().nonzero().squeeze(1))
            targets.append(torch.stack([b.flatten().nonzero().squeeze(1) for b in blocks]))  # [M, rows*cols]
        target_idx = torch.stack(targets)  # [B, M, rows*cols]
        if cfg.static:
            target_idx = _random_subsets(target_idx, self.target_size, generator)  # [B, M, target_size]
        keep = min_keep if cfg.static else min(len(c) for c in contexts)
        context_idx = torch.stack(
            [c[torch.randperm(len(c), generator=generator)[:keep]].sort().values for c in contexts]
        )
        return Masks(context_idx=context_idx, target_idx=target_idx)


def _random_subsets(idx: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset of `size` entries of every row of idx [..., n], each sorted: [..., size]."""
    if idx.shape[-1] == size:
        return idx
    order = torch.rand(idx.shape, generator=generator).argsort(dim=-1)[..., :size]
    return torch.gather(idx, -1, order).sort(dim=-1).values
