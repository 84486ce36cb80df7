"""Masked semantic neighbouring: the top-k most similar patches in each patch's local window."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def window_candidates(h: int, w: int, k_size: int, border: str, include_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate neighbours of every patch: indices [N, W] and validity [N, W], W = k_size^2 - 1.

    `clip` keeps only in-image window slots (slots outside the image are invalid and hold the
    patch's own index as a harmless placeholder); `wrap` wraps rows and columns around (a torus).
    A slot that lands on the patch itself (possible under `wrap` on grids smaller than the
    window) is invalid too, so a patch is never its own neighbour; with `include_self` the
    patch's own slot (offset 0, 0) comes first instead, W = k_size^2, and it is always valid.
    """
    r = k_size // 2
    offsets = [(0, 0)] if include_self else []
    offsets += [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    dy = torch.tensor([o[0] for o in offsets])  # [W]
    dx = torch.tensor([o[1] for o in offsets])
    rows = torch.arange(h).repeat_interleave(w)[:, None]  # [N, 1]
    cols = torch.arange(w).repeat(h)[:, None]
    ny, nx = rows + dy, cols + dx  # [N, W]
    if border == "clip":
        valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    elif border == "wrap":
        ny, nx = ny % h, nx % w
        valid = torch.ones_like(ny, dtype=torch.bool)
    else:
        raise ValueError(f"border must be 'clip' or 'wrap', got {border!r}")
    self_idx = rows * w + cols  # [N, 1]
    idx = torch.where(valid, ny * w + nx, self_idx)
    valid &= idx != self_idx
    if include_self:
        valid[:, 0] = True  # the patch's own slot; wrapped copies of it stay invalid
    return idx, valid


def semantic_neighbours(
    features: torch.Tensor,
    grid: tuple[int, int],
    *,
    k: int = 4,
    k_size: int = 3,
    border: str = "clip",
    include_self: bool = False,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbours by cosine similarity inside each patch's k_size x k_size window.

    features [B, N, D] -> (indices [B, N, k] long, valid [B, N, k] bool), most similar first.
    Where a window has fewer than k valid candidates (borders under `clip`), the remaining slots
    are invalid; their index is the patch itself and must be masked by the consumer. With
    `include_self` the patch is a candidate too (cosine 1, so it is always the first neighbour).
    `candidates`: `window_candidates` of this grid already on the features' device (a model keeps
    them as buffers, so a training step copies nothing from the host).

    Similarities and their ranking are computed in fp32 even under autocast: bf16 cosines tie
    and reorder close neighbours.
    """
    h, w = grid
    batch, n, dim = features.shape
    assert n == h * w, f"{n} tokens do not form a {h}x{w} grid"
    if candidates is None:
        cand, cand_valid = window_candidates(h, w, k_size, border, include_self)
        cand, cand_valid = cand.to(features.device), cand_valid.to(features.device)
    else:
        cand, cand_valid = candidates
    with torch.autocast(features.device.type, enabled=False):
        unit = F.normalize(features.float(), dim=-1)  # [B, N, D]
        neigh = unit[:, cand.flatten()].reshape(batch, n, -1, dim)  # [B, N, W, D]
        sim = torch.einsum("bnd,bnwd->bnw", unit, neigh)  # [B, N, W]
    sim = sim.masked_fill(~cand_valid, float("-inf"))
    top_sim, top_slot = sim.topk(k, dim=-1)  # [B, N, k]
    valid = torch.isfinite(top_sim)
    idx = torch.gather(cand.expand(batch, -1, -1), 2, top_slot)
    self_idx = torch.arange(n, device=features.device)[None, :, None]
    return torch.where(valid, idx, self_idx), valid
