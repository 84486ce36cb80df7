"""Class-balanced dense probe: weighted least squares on upsampled patch features, in closed form.

The probe is linear in the patch features, and bilinear upsampling is linear too, so a pixel's
score is U @ X @ beta, with X the image's standardised patch features [h*w, D+1] (a bias column
last) and U [H*W, h*w] the bilinear upsampling matrix (align_corners=False, like the SGD probe's
`F.interpolate`). The weighted least-squares problem over every labelled pixel

    minimise  sum_pixels  w(label) * || U X beta - onehot(label) ||^2  +  ridge * ||beta||^2

has normal equations  (sum_i X_i^T U^T W_i U X_i) beta = sum_i X_i^T U^T W_i Y_i.  U is separable
(U = Uy kron Ux), so U^T W_i U [h*w, h*w] costs O(H*W*(h+w)*w) per image instead of O(H*W*(h*w)^2),
and no pixel-level feature map is ever built. Each class's weight is the inverse of its share of
the training pixels, so every class counts as much as the others: a probe that favours the common
class gains nothing. Solved in float64 in closed form: deterministic, converged by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dmt_jepa.evaluation.data import IGNORE_INDEX
from dmt_jepa.evaluation.dense import confusion_matrix, iou_per_class, scores

RIDGE = 1e-4  # relative to the mean diagonal of the normal matrix: numerical safety, not tuning


def upsample_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] matrix of 1-D linear interpolation as `F.interpolate(..., align_corners=False)` does it."""
    basis = torch.eye(in_size, dtype=torch.float64).unsqueeze(1)  # [in, 1, in]: one channel per input cell
    return F.interpolate(basis, size=out_size, mode="linear", align_corners=False)[:, 0].T.contiguous()


@dataclass
class BalancedProbe:
    """A fitted probe: standardisation of the features and the weights [D+1, C]."""

    mean: torch.Tensor
    std: torch.Tensor
    beta: torch.Tensor
    class_weights: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.beta.shape[1]

    def design(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, h, w, D] -> standardised features with a bias column [B, h*w, D+1], float64."""
        x = (patches.double() - self.mean) / self.std
        x = x.flatten(1, 2)
        return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)

    def predict(self, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, h, w, D] -> predicted labels [B, H, W] (argmax of the upsampled scores)."""
        batch, h, w, _ = patches.shape
        scores = (self.design(patches) @ self.beta).view(batch, h, w, -1).permute(0, 3, 1, 2)  # [B, C, h, w]
        return F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(1)


def _class_weights(segs: list[np.ndarray], num_classes: int) -> torch.Tensor:
    """Inverse class frequency over the labelled pixels, scaled so that the mean pixel weight is 1."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for seg in segs:
        labels = seg[seg != IGNORE_INDEX].astype(np.int64)
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.from_numpy(weights)


def fit_balanced_probe(
    patches: torch.Tensor, segs: list[np.ndarray], *, num_classes: int, ridge: float = RIDGE, batch_size: int = 256
) -> BalancedProbe:
    """Fit the class-balanced least-squares pixel probe on patch features [N, h, w, D] and label maps [N, H, W]."""
    n, h, w, dim = patches.shape
    flat = patches.reshape(-1, dim).double()
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)  # constant channels stay finite
    class_weights = _class_weights(segs, num_classes)
    probe = BalancedProbe(mean, std, torch.zeros(dim + 1, num_classes, dtype=torch.float64), class_weights)
    gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
    rhs = torch.zeros(dim + 1, num_classes, dtype=torch.float64)
    for size in sorted({s.shape for s in segs}):
        members = [i for i, s in enumerate(segs) if s.shape == size]
        uy, ux = upsample_matrix(size[0], h), upsample_matrix(size[1], w)  # [H, h], [W, w]
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            labels = torch.from_numpy(np.stack([segs[i] for i in batch]).astype(np.int64))  # [B, H, W]
            valid = labels != IGNORE_INDEX
            onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).double() * valid[..., None]  # [B, H, W, C]
            pixel_w = (onehot * class_weights).sum(-1)  # [B, H, W]
            # U^T W U, separable: first over x, then over y.  [B, H, w, w] -> [B, h, w, h, w]
            inner = torch.einsum("byx,xjl->byjl", pixel_w, ux[:, :, None] * ux[:, None, :])
            utwu = torch.einsum("yik,byjl->bijkl", uy[:, :, None] * uy[:, None, :], inner).reshape(len(batch), h * w, h * w)
            # U^T W Y per class, over x then over y: [B, H, W, C] -> [B, H, w, C] -> [B, h*w, C]
            utwy = torch.einsum("byxc,xj->byjc", onehot * pixel_w[..., None], ux)
            utwy = torch.einsum("yi,byjc->bijc", uy, utwy).reshape(len(batch), h * w, -1)
            x = probe.design(patches[batch])  # [B, h*w, D+1]
            gram += torch.einsum("bqd,bqe->de", torch.bmm(utwu, x), x)  # sum_i X_i^T (U^T W_i U) X_i
            rhs += torch.einsum("bpd,bpc->dc", x, utwy)
    scale = gram.diagonal().mean()
    probe.beta = torch.linalg.solve(gram + ridge * scale * torch.eye(dim + 1, dtype=gram.dtype), rhs)
    return probe


def per_image_confusions(
    probe: BalancedProbe, patches: torch.Tensor, segs: list[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """[N, C, C] confusion matrix of each image (rows = true class), for scores and their bootstrap."""
    out = np.zeros((len(segs), probe.num_classes, probe.num_classes), dtype=np.int64)
    for size in sorted({s.shape for s in segs}):
        members = [i for i, s in enumerate(segs) if s.shape == size]
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            predicted = probe.predict(patches[batch], size).numpy()
            for row, i in enumerate(batch):
                out[i] = confusion_matrix(predicted[row], segs[i], probe.num_classes)
    return out


def bootstrap_miou(confusions: np.ndarray, *, samples: int = 1000, seed: int = 0) -> np.ndarray:
    """mIoU (%) of `samples` resamplings of the images (with replacement): [samples]."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(confusions), size=(samples, len(confusions)))
    return np.array([100.0 * float(np.nanmean(iou_per_class(confusions[p].sum(0)))) for p in picks])


def balanced_miou(
    train_patches: torch.Tensor,
    train_segs: list[np.ndarray],
    test_patches: torch.Tensor,
    test_segs: list[np.ndarray],
    *,
    num_classes: int,
    bootstrap: int = 1000,
) -> dict:
    """Fit on train, score on test: mIoU, IoU per class, pixel accuracy and the test set's bootstrap s.e. of mIoU."""
    probe = fit_balanced_probe(train_patches, train_segs, num_classes=num_classes)
    confusions = per_image_confusions(probe, test_patches, test_segs)
    result = scores(confusions.sum(0))
    if bootstrap:
        result["bootstrap_se"] = float(bootstrap_miou(confusions, samples=bootstrap).std(ddof=1))
    return result
