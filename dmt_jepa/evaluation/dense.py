"""Linear segmentation probe: a linear classifier on frozen patch embeddings, scored by mIoU."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmt_jepa.evaluation.data import IGNORE_INDEX


def _by_label_size(segs: list[np.ndarray], batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Batches of indices whose label maps share one size (shuffled when a generator is given)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, seg in enumerate(segs):
        groups[seg.shape].append(i)
    batches = []
    for members in groups.values():
        order = torch.tensor(members)
        if generator is not None:
            order = order[torch.randperm(len(order), generator=generator)]
        batches += [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _pixel_logits(probe: nn.Linear, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w, D] patch embeddings -> [B, C, H, W] logits, bilinearly upsampled to the label size."""
    logits = probe(patches).permute(0, 3, 1, 2)  # [B, C, h, w]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class; ignored pixels left out."""
    valid = truth != IGNORE_INDEX
    index = truth[valid].astype(np.int64) * num_classes + predicted[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class (nan for a class absent from both truth and prediction)."""
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


@dataclass
class DenseProbe:
    """A trained linear pixel classifier and the feature normalisation it was trained under."""

    linear: nn.Linear  # D -> C
    mean: torch.Tensor  # [D] of the training patch embeddings
    std: torch.Tensor  # [D]

    @torch.no_grad()
    def logits(self, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, h, w, D] patch embeddings -> [B, C, H, W] logits at the label size."""
        return _pixel_logits(self.linear, (patches - self.mean) / self.std, size)


def train_dense_probe(
    train_patches: torch.Tensor,
    train_segs: list[np.ndarray],
    *,
    num_classes: int,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DenseProbe:
    """AdamW on a zero-initialised linear pixel classifier over standardised frozen patch embeddings."""
    generator = torch.Generator().manual_seed(seed)
    dim = train_patches.shape[-1]
    train_patches = train_patches.to(device)
    mean = train_patches.reshape(-1, dim).mean(0)
    std = train_patches.reshape(-1, dim).std(0).clamp_min(1e-6)  # constant channels stay finite
    probe = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    labels = [torch.from_numpy(s.astype(np.int64)) for s in train_segs]
    for _ in range(epochs):
        for batch in _by_label_size(train_segs, batch_size, generator):
            x = (train_patches[batch] - mean) / std
            target = torch.stack([labels[i] for i in batch]).to(device)  # [B, H, W]
            loss = F.cross_entropy(_pixel_logits(probe, x, tuple(target.shape[-2:])), target, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return DenseProbe(probe, mean, std)


def score_dense_probe(
    probe: DenseProbe, test_patches: torch.Tensor, test_segs: list[np.ndarray], *, batch_size: int = 64
) -> dict:
    """mIoU, pixel accuracy and per-class IoU (%) of a probe on test images, scored at each label map's own size."""
    num_classes = probe.linear.out_features
    test_patches = test_patches.to(probe.mean.device)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for batch in _by_label_size(test_segs, batch_size, None):
        truth = np.stack([test_segs[i] for i in batch])
        predicted = probe.logits(test_patches[batch], truth.shape[-2:]).argmax(1).cpu().numpy()
        confusion += confusion_matrix(predicted, truth, num_classes)
    return scores(confusion)


def dense_miou(
    train_patches: torch.Tensor,
    train_segs: list[np.ndarray],
    test_patches: torch.Tensor,
    test_segs: list[np.ndarray],
    *,
    num_classes: int,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a linear pixel classifier on frozen patch embeddings; return mIoU (%) and per-class IoU on test."""
    probe = train_dense_probe(
        train_patches, train_segs, num_classes=num_classes, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
    )
    return score_dense_probe(probe, test_patches, test_segs, batch_size=batch_size)


def scores(confusion: np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU (%) of one summed confusion matrix [C, C]."""
    iou = iou_per_class(confusion)
    return {
        "miou": 100.0 * float(np.nanmean(iou)),
        "pixel_accuracy": 100.0 * float(np.trace(confusion) / max(confusion.sum(), 1)),
        "iou_per_class": [None if np.isnan(v) else round(100.0 * float(v), 3) for v in iou],
    }


def perfect_patch_miou(segs: list[np.ndarray], grid: tuple[int, int], *, num_classes: int) -> float:
    """mIoU (%) of a perfect per-patch predictor under the probe's scoring: the ceiling at this grid.

    Each patch's logits are the true class fractions of its pixels; they are upsampled bilinearly to
    the label size like the probe's logits, then scored the same way.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for seg in segs:
        labels = torch.from_numpy(seg.astype(np.int64))
        valid = (labels != IGNORE_INDEX).float()
        onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(2, 0, 1).float() * valid  # [C, H, W]
        fractions = F.adaptive_avg_pool2d(onehot[None], grid)  # [1, C, h, w]
        predicted = F.interpolate(fractions, size=seg.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        confusion += confusion_matrix(predicted.numpy(), seg, num_classes)
    return 100.0 * float(np.nanmean(iou_per_class(confusion)))
