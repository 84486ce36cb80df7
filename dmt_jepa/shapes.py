"""Procedural shapes for the scenes benchmark: eight classes told apart by outline alone.

A shape is a soft opacity mask of a given side, drawn by testing 4x4 sub-pixel points per pixel
against the shape's definition in its own coordinates (u, v in [-1, 1], after a rotation). Every
class is defined up to rotation, so any rotation keeps the class; colour and size are drawn
independently of the class, so only the outline (and what it implies for the inside, e.g. the hole
of a ring) says which class a patch belongs to: a patch inside a large shape needs its context.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES = ("disc", "square", "triangle", "cross", "ring", "star", "crescent", "ell")
SUPERSAMPLE = 4  # sub-pixel points per pixel side


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside an equilateral triangle of circumradius 0.95 centred on the origin, one vertex up."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        angle = -math.pi / 2 + k * 2 * math.pi / 3  # direction of a vertex
        # the edge opposite a vertex lies at half the circumradius on the other side
        inside &= -(u * math.cos(angle) + v * math.sin(angle)) <= 0.95 / 2
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside a five-pointed star: the radius runs linearly in angle between 0.95 at the tips and 0.4 between them."""
    radius = np.hypot(u, v)
    phase = (np.arctan2(v, u) / (2 * math.pi / 5)) % 1.0  # 0 at a tip, 0.5 between two
    reach = 0.95 - (0.95 - 0.4) * (1.0 - np.abs(1.0 - 2.0 * phase))
    return radius <= reach


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which of the points (u, v) in the shape's own coordinates lie inside it."""
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 0.9**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == "triangle":
        return _triangle(u, v)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9))
    if shape == "ring":
        return (r2 <= 0.95**2) & (r2 >= 0.5**2)
    if shape == "star":
        return _star(u, v)
    if shape == "crescent":
        return (r2 <= 0.9**2) & ((u - 0.45) ** 2 + v * v >= 0.7**2)
    if shape == "ell":
        return ((u >= -0.8) & (u <= -0.25) & (np.abs(v) <= 0.8)) | ((v >= 0.25) & (v <= 0.8) & (np.abs(u) <= 0.8))
    raise ValueError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}.")


def shape_alpha(shape: str, size: int, angle: float) -> np.ndarray:
    """Opacity [size, size] float32 in [0, 1]: the share of each pixel's sub-pixel points inside the rotated shape."""
    steps = size * SUPERSAMPLE
    centres = (np.arange(steps, dtype=np.float64) + 0.5) / steps * 2.0 - 1.0  # sub-pixel centres in [-1, 1]
    y, x = np.meshgrid(centres, centres, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y  # the image's axes in the shape's own coordinates
    hits = inside(shape, u, v).astype(np.float32)
    return hits.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


TEXTURES = ("plain", "stripes", "checks", "dots", "rings", "zigzag", "speckle", "grid")
TEXTURE_PERIOD = (3.0, 6.0)  # pixels: two or more periods in an 8-pixel patch


def texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern [size, size] float32 in [0, 1] of a texture class at a random period, phase and orientation."""
    period = rng.uniform(*TEXTURE_PERIOD)
    angle = rng.uniform(0.0, math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0.0, period, size=(2, 1, 1))
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = (cos * x + sin * y) / period, (-sin * x + cos * y) / period  # in periods, along and across the pattern
    if name == "plain":
        pattern = np.ones((size, size))
    elif name == "stripes":
        pattern = (u % 1.0) < 0.5
    elif name == "checks":
        pattern = ((np.floor(u) + np.floor(v)) % 2) == 0
    elif name == "dots":
        pattern = (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 <= 0.3**2
    elif name == "rings":
        centre = rng.uniform(0, size, size=2)
        pattern = (np.hypot(x - x.min() - centre[0], y - y.min() - centre[1]) / period % 1.0) < 0.5
    elif name == "zigzag":
        pattern = ((v + np.abs(u % 1.0 - 0.5)) % 1.0) < 0.5
    elif name == "speckle":
        cells = max(1, size // 2)
        noise = rng.random((cells + 1, cells + 1)) < 0.5
        pattern = np.kron(noise, np.ones((2, 2)))[:size, :size]
    elif name == "grid":
        pattern = ((u % 1.0) < 0.2) | ((v % 1.0) < 0.2)
    else:
        raise ValueError(f"unknown texture {name!r}; the textures are {', '.join(TEXTURES)}.")
    return np.asarray(pattern, dtype=np.float32)
