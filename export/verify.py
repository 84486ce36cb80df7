"""Parity checks: run a candidate and a reference on the same random images and compare."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.export.errors import ExportError

# images [B, 3, H, W] float32 -> (grid or tokens, pooled [B, D], extra layers...) in the order of export/io_names.py
Runner = Callable[[np.ndarray], tuple[np.ndarray, ...]]
Shape = tuple[int, int, int]  # (batch, height, width)

# A non-square grid every export is checked on besides the training size (160x288 at patch 16).
NON_SQUARE_GRID = (10, 18)


@dataclass(frozen=True)
class Tolerance:
    """Bounds a candidate must meet; None skips that bound."""

    max_abs_err: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None


FP32_TOLERANCE = Tolerance(max_abs_err=1e-4)
# Per-patch cosine similarity: the bound reduced precision must keep.
FP16_TOLERANCE = Tolerance(cos_mean=0.999, cos_min=0.99)


@dataclass(frozen=True)
class ParityCheck:
    """The figures of one shape: error of both outputs and per-patch cosine similarity."""

    batch: int
    height: int
    width: int
    max_abs_err_patches: float
    max_abs_err_pooled: float
    cos_mean: float
    cos_min: float
    max_abs_err_layers: float | None = None  # worst over the extra layer outputs, where there are any

    def failures(self, tol: Tolerance) -> list[str]:
        """The bounds of `tol` this check misses, as short phrases."""
        out = []
        if tol.max_abs_err is not None:
            worst = max(self.max_abs_err_patches, self.max_abs_err_pooled, self.max_abs_err_layers or 0.0)
            if not worst <= tol.max_abs_err:  # also catches NaN
                out.append(f"max abs error {worst:.2e} > {tol.max_abs_err:.0e}")
        if tol.cos_mean is not None and not self.cos_mean >= tol.cos_mean:
            out.append(f"mean cosine {self.cos_mean:.5f} < {tol.cos_mean}")
        if tol.cos_min is not None and not self.cos_min >= tol.cos_min:
            out.append(f"min cosine {self.cos_min:.5f} < {tol.cos_min}")
        return out

    def line(self, tol: Tolerance) -> str:
        failed = self.failures(tol)
        verdict = "ok" if not failed else "FAIL: " + "; ".join(failed)
        layers = "" if self.max_abs_err_layers is None else f", layers {self.max_abs_err_layers:.2e}"
        return (
            f"batch {self.batch}, {self.height}x{self.width}: max|diff| patches {self.max_abs_err_patches:.2e}, "
            f"pooled {self.max_abs_err_pooled:.2e}{layers}; cosine per patch mean {self.cos_mean:.6f}, "
            f"min {self.cos_min:.6f}  {verdict}"
        )


@dataclass(frozen=True)
class ParityReport:
    """All checks of one candidate against one reference, under one tolerance."""

    candidate: str
    reference: str
    tolerance: Tolerance
    checks: tuple[ParityCheck, ...]

    @property
    def ok(self) -> bool:
        return all(not c.failures(self.tolerance) for c in self.checks)

    def lines(self) -> list[str]:
        return [f"{self.candidate} vs {self.reference}:"] + ["  " + c.line(self.tolerance) for c in self.checks]

    def to_json(self) -> dict:
        return {
            "candidate": self.candidate,
            "reference": self.reference,
            "tolerance": {k: v for k, v in asdict(self.tolerance).items() if v is not None},
            "passed": self.ok,
            "checks": [asdict(c) for c in self.checks],
        }


def compare(shape: Shape, reference: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...]) -> ParityCheck:
    """Figures of one candidate against its reference, both (patches, pooled, extra layers...).

    The cosine figures cover every grid output (the patches and each extra layer).
    """
    assert len(reference) == len(candidate), (len(reference), len(candidate))
    ref_all = [np.asarray(a, dtype=np.float64) for a in reference]
    cand_all = [np.asarray(a, dtype=np.float64) for a in candidate]
    for ref_out, cand_out in zip(ref_all, cand_all):
        assert ref_out.shape == cand_out.shape, (ref_out.shape, cand_out.shape)
    errors = [float(np.abs(r - c).max()) for r, c in zip(ref_all, cand_all)]
    grids = [0, *range(2, len(ref_all))]
    ref = np.concatenate([ref_all[i].reshape(-1, ref_all[i].shape[-1]) for i in grids])  # [outputs*B*h*w, D]
    cand = np.concatenate([cand_all[i].reshape(-1, cand_all[i].shape[-1]) for i in grids])
    denom = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    cos = (ref * cand).sum(axis=1) / denom
    return ParityCheck(
        batch=shape[0],
        height=shape[1],
        width=shape[2],
        max_abs_err_patches=errors[0],
        max_abs_err_pooled=errors[1],
        cos_mean=float(cos.mean()),
        cos_min=float(cos.min()),
        max_abs_err_layers=max(errors[2:]) if len(errors) > 2 else None,
    )


def random_images(shape: Shape, seed: int) -> np.ndarray:
    """Normalised-looking float32 images [B, 3, H, W] (standard normal: what normalisation aims at)."""
    batch, height, width = shape
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width), dtype=np.float32)


def check_parity(
    candidate: Runner,
    reference: Runner,
    shapes: Sequence[Shape],
    tolerance: Tolerance,
    *,
    candidate_name: str,
    reference_name: str,
    seed: int = 0,
) -> ParityReport:
    """Run both on the same random images at every shape and collect the figures."""
    checks = []
    for i, shape in enumerate(shapes):
        images = random_images(shape, seed + i)
        checks.append(compare(shape, reference(images), candidate(images)))
    return ParityReport(candidate_name, reference_name, tolerance, tuple(checks))


def default_shapes(info: EncoderInfo) -> list[Shape]:
    """Batch 1 and 3 at the training size and at a non-square size (160x288 for patch 16)."""
    p = info.patch_size
    sizes = [tuple(info.img_size), (NON_SQUARE_GRID[0] * p, NON_SQUARE_GRID[1] * p)]
    return [(batch, h, w) for (h, w) in sizes for batch in (1, 3)]


def check_multiple_of_patch(shape: Shape, patch_size: int, what: str) -> None:
    """Reject an image size the encoder cannot tile into whole patches."""
    _, height, width = shape
    if height % patch_size or width % patch_size:
        raise ExportError(
            f"{what} size {height}x{width} is not a multiple of the patch size {patch_size}; "
            f"use height and width divisible by {patch_size}."
        )
