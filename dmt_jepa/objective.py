"""The DMT-JEPA objective: context encoder, EMA target encoder, predictor and aggregation heads."""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dmt_jepa.config import MethodConfig
from dmt_jepa.heads import LocalAggregationHead, gather_rows, pool_neighbours, target_locality
from dmt_jepa.masks import Masks
from dmt_jepa.models import Predictor, create_encoder
from dmt_jepa.neighbours import semantic_neighbours, window_candidates
from dmt_jepa.precision import device_has_bf16, effective_precision

M = TypeVar("M", bound=nn.Module)


def _frozen_copy(module: M) -> M:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class DMTJEPA(nn.Module):
    """All trained modules of DMT-JEPA; `forward` returns the loss of one batch.

    With `aggregation: none` this is plain I-JEPA (targets are the patches' own features), and
    with `mean` / `max` the neighbours are pooled without parameters; only `cross_attention` and
    `self_attention` have online/target heads.
    """

    def __init__(self, cfg: MethodConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MethodConfig()
        m = cfg.model
        self.context_encoder = create_encoder(
            m.arch, patch_size=m.patch_size, img_size=m.img_size, drop_path_rate=m.drop_path_rate
        )
        self.target_encoder = _frozen_copy(self.context_encoder)
        dim, heads = self.context_encoder.embed_dim, self.context_encoder.num_heads
        self.predictor = Predictor(embed_dim=dim, predictor_dim=m.pred_width, depth=m.pred_depth, num_heads=m.pred_heads or heads)
        self.online_head: LocalAggregationHead | None = None
        self.target_head: LocalAggregationHead | None = None
        if cfg.target.aggregation in ("cross_attention", "self_attention"):
            t = cfg.target
            self.online_head = LocalAggregationHead(
                dim, heads, depth=t.head_depth, mode=t.aggregation, query=t.query, context=t.context
            )
            self.target_head = _frozen_copy(self.online_head)
            if t.context == "none":  # targets only: the head is never trained and stays at its init
                self.online_head.requires_grad_(False)
        self.train_grid = (m.img_size // m.patch_size, m.img_size // m.patch_size)
        if cfg.target.aggregation != "none":
            # The training grid's neighbour windows live on the model's device: no host copy per step.
            idx, valid = window_candidates(*self.train_grid, cfg.target.k_size, cfg.target.border, cfg.target.include_self)
            self.register_buffer("window_idx", idx.clone(), persistent=False)
            self.register_buffer("window_valid", valid.clone(), persistent=False)

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder's patch features, layer-normalised without affine (I-JEPA): [B, N, D]."""
        h = self.target_encoder(images)
        return F.layer_norm(h, (h.shape[-1],))

    @torch.no_grad()
    def targets_from(self, h: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised target features h [B, N, D] -> the targets of the patches at positions [B, P] (default all)."""
        t = self.cfg.target
        if t.aggregation == "none":
            return h if positions is None else gather_rows(h, positions)
        windows = (self.window_idx, self.window_valid) if tuple(grid) == self.train_grid else None
        idx, valid = semantic_neighbours(
            h, grid, k=t.k, k_size=t.k_size, border=t.border, include_self=t.include_self, candidates=windows
        )
        if self.target_head is not None:
            return self.target_head.forward_local(h, idx, valid, positions)
        return pool_neighbours(h, idx, valid, t.aggregation, positions)

    def patch_targets(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Targets of the patches at positions [B, P] (default: every patch) -> [B, P or N, D]."""
        return self.targets_from(self.target_features(images), self.grid(images), positions)

    def targets(self, images: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Discriminative targets at the target blocks: [B, M, T] -> [M*B, T, D] (block-major)."""
        batch, n_blocks, n_tgt = target_idx.shape
        out = self.patch_targets(images, target_idx.reshape(batch, n_blocks * n_tgt))  # [B, M*T, D]
        return block_major(out, target_idx.shape)

    @torch.no_grad()
    def locality(self, images: torch.Tensor) -> dict[str, float]:
        """`target_locality` of every patch's target in images [B, 3, H, W], and each target's cosine to its own patch.

        cos_to_own_patch: mean cosine between a patch's target and its own normalised feature (1 for I-JEPA).
        """
        h = self.target_features(images)
        targets = self.targets_from(h, self.grid(images))
        own = F.cosine_similarity(targets.float(), h.float(), dim=-1).mean()
        return target_locality(targets) | {"cos_to_own_patch": float(own)}

    def context(self, images: torch.Tensor, context_idx: torch.Tensor) -> torch.Tensor:
        """Context tokens [B, Nc, D], through the online head (its context path) where there is one."""
        z = self.context_encoder(images, keep=context_idx)
        if self.online_head is not None and self.cfg.target.context != "none":
            z = self.online_head.forward_global(z)
        return z

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, target = prediction.float(), target.float()
        if self.cfg.target.loss == "smooth_l1":
            return F.smooth_l1_loss(prediction, target)
        return F.mse_loss(prediction, target)

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        p = self.context_encoder.patch_size
        return images.shape[-2] // p, images.shape[-1] // p

    def forward(self, images: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """One batch: targets (no grad) -> context -> predictor -> loss.

        With target.plain_weight w > 0 the prediction also answers the patches' own features
        (I-JEPA's targets): loss = (1 - w) * loss(aggregated) + w * loss(own).
        """
        positions = target_idx.flatten(1)  # [B, M*T]
        h = self.target_features(images)
        targets = block_major(self.targets_from(h, self.grid(images), positions), target_idx.shape)
        context = self.context(images, context_idx)
        prediction = self.predictor(context, context_idx, target_idx, self.grid(images))
        weight = self.cfg.target.plain_weight
        if weight == 0.0 or self.cfg.target.aggregation == "none":
            return self.loss(prediction, targets)
        own = block_major(gather_rows(h, positions), target_idx.shape)
        return (1.0 - weight) * self.loss(prediction, targets) + weight * self.loss(prediction, own)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs that the EMA ties together."""
        pairs = [(self.context_encoder, self.target_encoder)]
        if self.online_head is not None:
            pairs.append((self.online_head, self.target_head))
        return pairs

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for encoder and head."""
        targets, onlines = [], []
        for online, target in self.ema_pairs():
            targets += list(target.parameters())
            onlines += list(online.parameters())
        # Two separately rounded products, then their sum: exactly the formula, no fused multiply-add.
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, torch._foreach_mul(onlines, 1.0 - momentum))


def block_major(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[B, M*T, D] in the order of target_idx [B, M, T] -> [M*B, T, D], the predictor's order."""
    batch, n_blocks, n_tgt = shape
    out = out.reshape(batch, n_blocks, n_tgt, -1).transpose(0, 1)  # [M, B, T, D]
    return out.reshape(n_blocks * batch, n_tgt, -1)


def autocast_dtype_for(device: torch.device | str, precision: str, has_bf16: bool | None = None) -> torch.dtype | None:
    """bf16 autocast where asked for and the device computes bf16 natively, else None (fp32).

    `has_bf16`: the device's capability (None: ask it); see dmt_jepa.precision for why.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    device = torch.device(device)
    has_bf16 = device_has_bf16(device.type) if has_bf16 is None else has_bf16
    return torch.bfloat16 if effective_precision(precision, device.type, has_bf16)[0] == "bf16" else None


def _forward(model, images, masks, autocast_dtype) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(images, masks.context_idx, masks.target_idx)


def _update(model: nn.Module, loss: torch.Tensor, optimizer, momentum: float, grad_clip: float | None) -> None:
    """backward -> (clip) -> optimizer -> EMA of the target encoder and target head."""
    core = model.module if hasattr(model, "module") else model
    core = getattr(core, "_orig_mod", core)  # under torch.compile
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    core.update_target(momentum)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: Masks,
    optimizer: torch.optim.Optimizer,
    momentum: float,
    *,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> float:
    """One optimisation step of DMT-JEPA; returns the loss, and raises before the update if it is not finite.

    targets (no grad) -> context -> predictor -> loss -> backward -> optimizer -> EMA of the
    target encoder and target head. `model` may be wrapped in DistributedDataParallel. Reading the
    loss waits for the device once per step; `step_without_sync` does not.
    """
    loss = _forward(model, images, masks, autocast_dtype)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value}")
    _update(model, loss, optimizer, momentum, grad_clip)
    return value


def step_without_sync(
    model: nn.Module, images: torch.Tensor, masks: Masks, optimizer: torch.optim.Optimizer, momentum: float, **options
) -> torch.Tensor:
    """`train_step` (same options) that never waits for the device: returns the detached loss, unchecked."""
    loss = _forward(model, images, masks, options.get("autocast_dtype"))
    _update(model, loss, optimizer, momentum, options.get("grad_clip"))
    return loss.detach()
