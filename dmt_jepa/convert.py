"""Import a checkpoint of the public I-JEPA / DMT-JEPA code as an encoder file.

Their ViT uses timm's block naming (patch_embed.proj, blocks.N.norm1 / attn.qkv / attn.proj /
norm2 / mlp.fc1 / mlp.fc2, norm), which ours shares, plus a stored `pos_embed` table [1, N, D].
Ours computes the same fixed sin-cos table (same channel layout: column half, then row half) on
the fly, so the table is not copied but checked: a converted encoder computes exactly the
public encoder's function.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import torch

from dmt_jepa.encoder_file import EncoderInfo, info_from_encoder, save_encoder
from dmt_jepa.models import VARIANTS, VisionTransformer, sincos_2d

# The public I-JEPA weights are released under CC-BY-NC 4.0; converted weights keep their terms, and
# the provenance carries them on into every export and the model card.
PUBLIC_LICENSE = "cc-by-nc-4.0"
PUBLIC_LICENSE_NOTE = (
    "the public I-JEPA weights are released under CC-BY-NC 4.0 (attribution, non-commercial use only); "
    "weights converted from them keep that licence"
)


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message is one sentence for the user."""


def _strip_prefix(state: dict) -> dict:
    """Remove DistributedDataParallel's 'module.' prefixes."""
    return {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}


def _variant_for(dim: int, depth: int, arch: str | None, source: str) -> tuple[str, int]:
    """(arch name, number of heads): the checkpoint does not store the heads, the width implies them."""
    if arch is not None:
        if arch not in VARIANTS:
            raise ConvertError(f"unknown architecture {arch!r}; choose one of {', '.join(VARIANTS)}.")
        if VARIANTS[arch].embed_dim != dim:
            raise ConvertError(f"{source} is {dim} wide but {arch} is {VARIANTS[arch].embed_dim} wide; drop --arch or fix it.")
        return arch, VARIANTS[arch].num_heads
    matches = [name for name, v in VARIANTS.items() if v.embed_dim == dim and v.depth == depth]
    matches = matches or [name for name, v in VARIANTS.items() if v.embed_dim == dim]
    if not matches:
        raise ConvertError(f"{source} is {dim} wide, which matches no known ViT; pass --arch.")
    return matches[0], VARIANTS[matches[0]].num_heads


def _check_tensors(state: dict, source: str) -> None:
    """Refuse entries that are not tensors of finite floating-point numbers."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ConvertError(f"{source} holds {key} as {type(value).__name__}, not a floating-point tensor.")
        if not torch.isfinite(value).all():
            raise ConvertError(f"{source} holds non-finite numbers (NaN or inf) in {key}; it is damaged.")


def check_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], source: str) -> None:
    """Refuse a position table that is not the fixed sin-cos table our encoder computes."""
    dim = pos_embed.shape[-1]
    ours = sincos_2d(*grid, dim)
    table = pos_embed.reshape(-1, dim).float()
    if table.shape != ours.shape or not torch.allclose(table, ours, atol=1e-4):
        raise ConvertError(
            f"the pos_embed of {source} is not a fixed 2-D sin-cos table for a {grid[0]}x{grid[1]} grid "
            "(learned positions?); only fixed sin-cos encoders can be converted."
        )


def encoder_from_public(state: dict, *, arch: str | None = None, source: str = "checkpoint") -> tuple[VisionTransformer, str]:
    """Our encoder with the weights of a public-code ViT state dict (prefixes allowed)."""
    state = _strip_prefix(state)
    try:
        proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
        pos_embed = state["pos_embed"]  # [1, N, D]
        fc1 = state["blocks.0.mlp.fc1.weight"]  # [hidden, D]
    except KeyError as err:
        raise ConvertError(f"{source} is not a ViT state dict of the public I-JEPA code (no {err.args[0]}).") from err
    _check_tensors(state, source)
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3] or 0 in proj.shape:
        raise ConvertError(f"{source} has a patch embedding of shape {list(proj.shape)}, not [D, 3, p, p].")
    dim, patch = proj.shape[0], proj.shape[-1]
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != dim or fc1.ndim != 2 or fc1.shape[1] != dim:
        raise ConvertError(
            f"{source} has pos_embed {list(pos_embed.shape)} and blocks.0.mlp.fc1.weight {list(fc1.shape)}, "
            f"not [1, N, {dim}] and [hidden, {dim}] as its {dim}-wide patch embedding needs."
        )
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        raise ConvertError(f"the pos_embed of {source} has {pos_embed.shape[1]} positions, not a square grid.")
    arch, heads = _variant_for(dim, depth, arch, source)
    encoder = VisionTransformer(
        img_size=side * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=fc1.shape[0] / dim
    )
    weights = {k: v for k, v in state.items() if k != "pos_embed"}
    check_pos_embed(pos_embed, (side, side), source)
    expected = encoder.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unexpected or missing:
        raise ConvertError(
            f"{source} does not have the tensors of a {depth}-block ViT "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})."
        )
    bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if bad:
        raise ConvertError(
            f"{source} has tensor {bad[0]} of shape {tuple(weights[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}."
        )
    encoder.load_state_dict({k: v.float() for k, v in weights.items()})
    return encoder.eval(), arch


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "target_encoder",
    arch: str | None = None,
    license: str = PUBLIC_LICENSE,
) -> EncoderInfo:
    """Read a public `.pth.tar` (weights_only) and write its `which` encoder as our encoder file.

    `license` (an SPDX-style id) is recorded in the provenance; the default is the public weights'.
    """
    src = Path(src)
    if not src.is_file():
        raise ConvertError(f"checkpoint {src} does not exist.")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises loading with weights_only=False, which runs the file's code: not ours to give.
        raise ConvertError(
            f"{src} cannot be read as a tensors-only checkpoint (it holds Python objects other than tensors and plain "
            "containers, which are never unpickled here); it is not a supported checkpoint."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvertError(
            f"{src} cannot be read as a tensors-only checkpoint ({first}); it is not a supported checkpoint."
        ) from err
    if not isinstance(checkpoint, dict) or which not in checkpoint:
        keys = ", ".join(sorted(map(str, checkpoint))) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConvertError(f"{src} has no {which!r} state dict (it holds: {keys}); pick one with --which.")
    encoder, arch = encoder_from_public(checkpoint[which], arch=arch, source=f"{src} [{which}]")
    provenance = {"source": "dmtjepa convert", "checkpoint": src.name, "state_dict": which, "license": license}
    if license == PUBLIC_LICENSE:
        provenance["license_note"] = PUBLIC_LICENSE_NOTE
    info = info_from_encoder(encoder, arch, provenance=provenance)
    save_encoder(out, encoder, info)
    return info
