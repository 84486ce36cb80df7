"""How embeddings are stored: float32, float16, or int8 with one float32 scale per vector.

int8 is symmetric per vector (scale = max |v| / 127), so each element is off by at most half its
vector's scale and the cosine to the float32 vector stays near 1 (docs/embed.md gives measured
figures); a per-vector scale, unlike one per tensor, keeps a vector of small norm as exact as a
large one.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "int8")


def encode(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float [..., D] -> (stored values [..., D], float32 scales [...] for int8, else None)."""
    if dtype == "int8":
        vectors = np.asarray(vectors, dtype=np.float32)
        scale = np.abs(vectors).max(axis=-1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)  # an all-zero vector stores zeros with scale 0
        values = np.clip(np.rint(vectors / safe[..., None]), -127, 127).astype(np.int8)
        return values, scale.astype(np.float32)
    assert dtype in DTYPES, dtype
    return np.asarray(vectors).astype(dtype), None


def decode(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored values (and scales) -> float32 [..., D]."""
    if scale is None:
        return np.asarray(values, dtype=np.float32)
    return np.asarray(values, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None]
