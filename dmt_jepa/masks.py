"""Multi-block masking (I-JEPA): target blocks, and one context block with the targets removed.

With `mask.static` (the default) every batch has the same shapes: `context_size` context patches
and `num_targets` x `target_size` target patches per image, both functions of the grid and the
MaskConfig alone. Blocks are still drawn as the paper draws them; the index lists are then cut to
the fixed sizes by random subsets. Fixed shapes let `torch.compile` and CUDA graphs reuse one
compiled step and make every timed step the same workload. The block shapes and static sizes
come from dmt_jepa.mask_geometry.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from dmt_jepa.config import MaskConfig
from dmt_jepa.mask_geometry import block_shape, mask_problems, static_context_size, static_target_size  # noqa: F401  (mask_problems: imported from here)


@dataclass
class Masks:
    """Patch indices (row-major in the grid) of one batch."""

    context_idx: torch.Tensor  # [B, Nc] long, sorted
    target_idx: torch.Tensor  # [B, M, T] long, each block sorted

    def to(self, device, non_blocking: bool = False) -> Masks:
        return Masks(
            self.context_idx.to(device, non_blocking=non_blocking), self.target_idx.to(device, non_blocking=non_blocking)
        )


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(high_exclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_exclusive, (1,), generator=generator).item())


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
        return static_target_size((self.height, self.width), tuple(self.cfg.target_scale), tuple(self.cfg.target_aspect))

    @property
    def context_size(self) -> int:
        """Context patches per image in every static batch."""
        return static_context_size((self.height, self.width), astuple(self.cfg))

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
        context_idx = torch.stack([c[torch.randperm(len(c), generator=generator)[:keep]].sort().values for c in contexts])
        return Masks(context_idx=context_idx, target_idx=target_idx)


def _random_subsets(idx: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset of `size` entries of every row of idx [..., n], each sorted: [..., size]."""
    if idx.shape[-1] == size:
        return idx
    order = torch.rand(idx.shape, generator=generator).argsort(dim=-1)[..., :size]
    return torch.gather(idx, -1, order).sort(dim=-1).values
