"""Dataclass configuration of the method: encoder, predictor, masks and targets."""

from __future__ import annotations

from dataclasses import dataclass, field

AGGREGATIONS = ("cross_attention", "self_attention", "mean", "max", "none")
BORDERS = ("clip", "wrap")
LOSSES = ("smooth_l1", "l2")


@dataclass
class ModelConfig:
    """Encoder and predictor architecture."""

    arch: str = "vit_base"
    patch_size: int = 16
    img_size: int = 224
    drop_path_rate: float = 0.0
    pred_width: int = 384
    pred_depth: int = 6
    pred_heads: int | None = None  # None: as many heads as the encoder (I-JEPA)


@dataclass
class MaskConfig:
    """Multi-block masking: target blocks removed from one large context block."""

    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10


@dataclass
class TargetConfig:
    """Discriminative targets: semantic neighbours, their aggregation, and the loss."""

    aggregation: str = "cross_attention"
    k: int = 4
    k_size: int = 3
    border: str = "clip"
    head_depth: int = 2
    loss: str = "smooth_l1"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.k_size < 3 or self.k_size % 2 == 0:
            raise ValueError(f"k_size must be an odd number >= 3, got {self.k_size}")
        if not 1 <= self.k <= self.k_size**2 - 1:
            raise ValueError(f"k must be between 1 and k_size^2 - 1 = {self.k_size**2 - 1}, got {self.k}")


@dataclass
class MethodConfig:
    """Everything that defines the DMT-JEPA model and objective."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
