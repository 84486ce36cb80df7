"""The class-balanced closed-form dense probe against a pixel-level reference and planted structure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmt_jepa.evaluation.balanced import (
    balanced_miou,
    bootstrap_miou,
    fit_balanced_probe,
    per_image_confusions,
    upsample_matrix,
)
from dmt_jepa.evaluation.dense import dense_miou


def test_upsample_matrix_is_pytorch_bilinear():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
    uy, ux = upsample_matrix(9, 4), upsample_matrix(11, 5)
    assert torch.allclose(torch.einsum("yi,xj,bcij->bcyx", uy, ux, x), expected, atol=1e-12)


def test_fit_equals_weighted_least_squares_over_explicit_pixels():
    """The separable normal equations give the same weights as lstsq on every upsampled pixel."""
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(5, 3, 4, 6, generator=gen)
    segs = [np.random.default_rng(i).integers(0, 3, size=(7, 10)).astype(np.uint8) for i in range(5)]
    segs[0][0, :4] = 255  # ignored pixels carry no weight
    probe = fit_balanced_probe(patches, segs, num_classes=3, ridge=0.0)
    # Reference: features upsampled pixel by pixel, rows weighted by sqrt(inverse class frequency).
    x = (patches.double() - probe.mean) / probe.std
    pixels = F.interpolate(x.permute(0, 3, 1, 2), size=(7, 10), mode="bilinear", align_corners=False)
    rows = pixels.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    labels = np.stack(segs).reshape(-1).astype(np.int64)
    keep = labels != 255
    counts = np.bincount(labels[keep], minlength=3)
    weight = np.where(keep, (counts.sum() / (3 * counts))[np.where(keep, labels, 0)], 0.0)
    onehot = np.eye(3)[np.where(keep, labels, 0)]
    root = np.sqrt(weight)[:, None]
    expected, *_ = np.linalg.lstsq(rows * root, onehot * root, rcond=None)
    assert np.allclose(probe.beta.numpy(), expected, atol=1e-8)


def _planted(n: int, seed: int, flip: float = 0.0, signal: float = 6.0):
    """Scenes whose figure is a rare class (about 10 % of patches) that channel 0 of the patch features marks.

    Labels are given per patch (label size = grid), so upsampling is the identity and a perfect
    linear probe is possible.
    """
    rng = np.random.default_rng(seed)
    patches = torch.from_numpy(rng.normal(size=(n, 6, 6, 8))).float()
    figure = rng.random((n, 6, 6)) < 0.1
    patches[..., 0] += torch.from_numpy(np.where(figure, signal, 0.0)).float()
    segs = [f.astype(np.uint8) for f in figure]
    if flip:
        segs = [np.where(rng.random(s.shape) < flip, 1 - s, s).astype(np.uint8) for s in segs]
    return patches, segs


def test_finds_a_planted_linear_separation():
    train_p, train_s = _planted(200, 0)
    test_p, test_s = _planted(100, 1)
    result = balanced_miou(train_p, train_s, test_p, test_s, num_classes=2, bootstrap=200)
    assert result["iou_per_class"][1] > 95.0
    assert result["miou"] > 97.0
    noise = torch.from_numpy(np.random.default_rng(3).normal(size=tuple(test_p.shape))).float()
    chance = balanced_miou(train_p, train_s, noise, test_s, num_classes=2, bootstrap=0)
    assert chance["miou"] < result["miou"] - 30.0


def test_balanced_probe_does_not_favour_the_common_class():
    """With weak features an unweighted probe predicts 'background' almost everywhere; the balanced one does not."""
    train_p, train_s = _planted(200, 0, signal=1.5)
    test_p, test_s = _planted(100, 1, signal=1.5)
    balanced = balanced_miou(train_p, train_s, test_p, test_s, num_classes=2, bootstrap=0)
    unweighted = dense_miou(train_p, train_s, test_p, test_s, num_classes=2, epochs=10, lr=0.03)
    assert balanced["iou_per_class"][1] > unweighted["iou_per_class"][1] + 5.0


def test_deterministic_and_bootstrap_se_shrinks_with_more_images():
    train_p, train_s = _planted(100, 0, flip=0.05)
    test_p, test_s = _planted(400, 1, flip=0.05)
    first = balanced_miou(train_p, train_s, test_p, test_s, num_classes=2)
    again = balanced_miou(train_p, train_s, test_p, test_s, num_classes=2)
    assert first == again
    probe = fit_balanced_probe(train_p, train_s, num_classes=2)
    confusions = per_image_confusions(probe, test_p, test_s)
    assert np.array_equal(confusions.sum(0).sum(), sum(s.size for s in test_s))
    small, large = bootstrap_miou(confusions[:50]).std(ddof=1), bootstrap_miou(confusions).std(ddof=1)
    assert large < small
    assert first["bootstrap_se"] == pytest.approx(large, rel=1e-9)
