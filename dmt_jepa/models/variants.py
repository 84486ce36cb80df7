"""The ViT sizes by name; no torch, so that a config naming one is checked before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """Width, depth and heads of one ViT size."""

    embed_dim: int
    depth: int
    num_heads: int


VARIANTS: dict[str, Variant] = {
    # vit_nano is not a paper size: it exists for CPU demos and tests.
    "vit_nano": Variant(64, 4, 2),
    "vit_tiny": Variant(192, 12, 3),
    "vit_small": Variant(384, 12, 6),
    "vit_base": Variant(768, 12, 12),
    "vit_large": Variant(1024, 24, 16),
    "vit_huge": Variant(1280, 32, 16),
}
