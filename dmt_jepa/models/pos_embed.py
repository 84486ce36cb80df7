"""Fixed 2-D sine-cosine position embedding, computed for any grid h x w."""

from __future__ import annotations

import torch


def sincos_2d(h: int, w: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Return the [h*w, dim] sin-cos embedding of the integer grid positions, row-major.

    The first half of the channels encodes the column, the second half the row (the layout of the
    public I-JEPA table, so its checkpoints convert unchanged), each as
    [sin(p * omega), cos(p * omega)] with omega = 1 / 10000^(i / (dim/4)).

    A grid other than the training one gets the same function evaluated at its own integer
    positions (row 0..h-1, column 0..w-1): no interpolation and no stored table, so any h x w
    works and the computation stays a handful of traceable ops for ONNX export with dynamic
    height and width.
    """
    assert dim % 4 == 0, f"sin-cos position embedding needs dim divisible by 4, got {dim}"
    quarter = dim // 4
    omega = torch.arange(quarter, device=device, dtype=torch.float32) / quarter
    omega = 1.0 / (10000.0**omega)  # [dim/4]
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    row_angles = rows[:, None] * omega[None, :]  # [h, dim/4]
    col_angles = cols[:, None] * omega[None, :]  # [w, dim/4]
    row_emb = torch.cat([row_angles.sin(), row_angles.cos()], dim=1)  # [h, dim/2]
    col_emb = torch.cat([col_angles.sin(), col_angles.cos()], dim=1)  # [w, dim/2]
    grid = torch.cat(
        [col_emb[None, :, :].expand(h, w, dim // 2), row_emb[:, None, :].expand(h, w, dim // 2)],
        dim=2,
    )  # [h, w, dim]
    return grid.reshape(h * w, dim).to(dtype)
