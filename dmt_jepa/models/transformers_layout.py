"""Our encoder's tensors under the names of transformers' I-JEPA model (model_type "ijepa"), and back.

transformers' `IJepaModel` is the same network as ours (pre-norm ViT blocks, exact GELU, a final
LayerNorm, no class token) but for the position embedding: it adds a stored table
`embeddings.position_embeddings` [1, N, D] (bicubically resized for another grid when asked),
where ours computes sin-cos for any grid. The table written here is our sin-cos at the training
grid, so both agree there. The names are those transformers' own `save_pretrained` writes, which
its 4.x and 5.x releases both read; our fused qkv projection becomes query / key / value.
Nothing here imports transformers: the package writes and reads this layout alone.
"""

from __future__ import annotations

import torch

from dmt_jepa.models.pos_embed import sincos_2d

POSITION_TABLE = "embeddings.position_embeddings"
QKV = ("query", "key", "value")


def _renamed(depth: int) -> dict[str, str]:
    """Our name -> transformers' name for every tensor but the fused qkv and the position table."""
    names = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    parts = {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(depth):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    return names


def _qkv(i: int, kind: str) -> tuple[str, list[str]]:
    """Our fused name and transformers' three names of block i's qkv `kind` (weight or bias)."""
    return f"blocks.{i}.attn.qkv.{kind}", [f"encoder.layer.{i}.attention.attention.{part}.{kind}" for part in QKV]


def to_transformers(state: dict[str, torch.Tensor], depth: int, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Our state dict -> IJepaModel's, with the sin-cos table of the training `grid` as its position table."""
    out = {theirs: state[ours] for ours, theirs in _renamed(depth).items()}
    for i in range(depth):
        for kind in ("weight", "bias"):
            fused, split = _qkv(i, kind)
            out.update(zip(split, state[fused].chunk(3, dim=0)))  # [3D, ...] -> 3 x [D, ...]
    dim = state["norm.weight"].shape[0]
    out[POSITION_TABLE] = sincos_2d(*grid, dim)[None]  # [1, h*w, D]
    return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def from_transformers(tensors: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """IJepaModel's tensors -> our state dict, and the position table they held (for the caller to check)."""
    state = {ours: tensors[theirs] for ours, theirs in _renamed(depth).items()}
    for i in range(depth):
        for kind in ("weight", "bias"):
            fused, split = _qkv(i, kind)
            state[fused] = torch.cat([tensors[name] for name in split], dim=0)
    return state, tensors[POSITION_TABLE]


def transformers_shapes(shapes: dict[str, tuple[int, ...]], depth: int, grid: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The shapes IJepaModel's tensors have, from our encoder's (name -> shape), table included."""
    out = {theirs: shapes[ours] for ours, theirs in _renamed(depth).items()}
    for i in range(depth):
        for kind in ("weight", "bias"):
            fused, split = _qkv(i, kind)
            out.update((name, (shapes[fused][0] // 3, *shapes[fused][1:])) for name in split)
    out[POSITION_TABLE] = (1, grid[0] * grid[1], shapes["norm.weight"][0])
    return out
