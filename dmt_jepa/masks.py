"""Multi-block masking (I-JEPA): target blocks, and one context block with the targets removed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmt_jepa.config import MaskConfig


@dataclass
class Masks:
    """Patch indices (row-major in the grid) of one batch."""

    context_idx: torch.Tensor  # [B, Nc] long, sorted
    target_idx: torch.Tensor  # [B, M, T] long, each block sorted

    def to(self, device) -> "Masks":
        return Masks(self.context_idx.to(device), self.target_idx.to(device))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(high_exclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_exclusive, (1,), generator=generator).item())


class MultiBlockMaskSampler:
    """Samples I-JEPA masks for a batch; seeded through the torch.Generator it is given.

    Block sizes (target and context) are drawn once per batch so that every image has the same
    number of target patches; positions are drawn per image. A block's top-left corner is drawn
    from every position where it fits, so blocks reach the last row and column of the grid.
    Contexts are cut to the smallest context of the batch by a random subset, keeping at least
    `min_keep` patches; an image whose context would be smaller is redrawn.
    """

    max_tries = 100

    def __init__(self, grid: tuple[int, int], cfg: MaskConfig | None = None):
        self.height, self.width = grid
        self.cfg = cfg or MaskConfig()
        if self.cfg.min_keep > self.height * self.width:
            raise ValueError(f"min_keep={self.cfg.min_keep} exceeds the {self.height}x{self.width} grid")

    def block_size(self, scale: tuple[float, float], aspect: tuple[float, float], generator) -> tuple[int, int]:
        """(rows, cols) of a block covering a `scale` fraction of the grid at aspect rows/cols."""
        s = _uniform(*scale, generator)
        ar = _uniform(*aspect, generator)
        area = self.height * self.width * s
        rows = int(round(math.sqrt(area * ar)))
        cols = int(round(math.sqrt(area / ar)))
        return min(max(rows, 1), self.height), min(max(cols, 1), self.width)

    def place(self, rows: int, cols: int, generator) -> torch.Tensor:
        """A [h, w] bool mask of one block at a uniformly drawn position where it fits."""
        top = _randint(self.height - rows + 1, generator)
        left = _randint(self.width - cols + 1, generator)
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask[top : top + rows, left : left + cols] = True
        return mask

    def __call__(self, batch_size: int, generator: torch.Generator) -> Masks:
        cfg = self.cfg
        tgt_rows, tgt_cols = self.block_size(cfg.target_scale, cfg.target_aspect, generator)
        ctx_rows, ctx_cols = self.block_size(cfg.context_scale, cfg.context_aspect, generator)
        contexts, targets = [], []
        for _ in range(batch_size):
            for _ in range(self.max_tries):
                blocks = [self.place(tgt_rows, tgt_cols, generator) for _ in range(cfg.num_targets)]
                covered = torch.stack(blocks).any(dim=0)
                context = self.place(ctx_rows, ctx_cols, generator) & ~covered
                if int(context.sum()) >= cfg.min_keep:
                    break
            else:
                raise ValueError(
                    f"could not keep {cfg.min_keep} context patches on a {self.height}x{self.width} grid "
                    f"after {self.max_tries} draws; lower mask.min_keep or the target scale"
                )
            contexts.append(context.flatten().nonzero().squeeze(1))
            targets.append(torch.stack([b.flatten().nonzero().squeeze(1) for b in blocks]))  # [M, T]
        keep = min(len(c) for c in contexts)
        context_idx = torch.stack(
            [c[torch.randperm(len(c), generator=generator)[:keep]].sort().values for c in contexts]
        )
        return Masks(context_idx=context_idx, target_idx=torch.stack(targets))
