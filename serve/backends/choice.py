"""`--backend auto` on a CPU: the fastest backend for a model, measured once and cached per CPU model.

Which CPU backend is fastest depends on the CPU (bf16 and VNNI instructions, cores, caches), the
model's size and the library versions, so it is measured rather than guessed: each candidate runs
the user's model on a small batch at its training size, alternating, and the median decides. The
result is kept in a JSON file in the user's cache folder (never inside the installed package):
$DMT_JEPA_CACHE_DIR, else $XDG_CACHE_HOME/dmt-jepa, else ~/.cache/dmt-jepa, file
`cpu-backend-choice.json`, one entry per CPU model, core count, model architecture, precision and
library versions. A cache that cannot be read or written is ignored: the choice is then measured
again, never refused.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dmt_jepa.cache import cache_dir
from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.serve.backends.base import Backend
from dmt_jepa.serve.backends.cpu import cpu_info

CACHE_FILE = "cpu-backend-choice.json"
MAX_CACHE_BYTES = 1 << 20  # a cache file larger than this was not written by us
MEASURE_BATCH = 4
MEASURE_REPEATS = 3


def _versions() -> str:
    import importlib.metadata as metadata

    found = []
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def cache_key(kind: str, info: EncoderInfo, precision: str) -> str:
    """One line naming everything the measured speed depends on."""
    cpu = cpu_info()
    model = f"{info.arch}/{info.patch_size} d{info.embed_dim}x{info.depth} {info.img_size[0]}x{info.img_size[1]}"
    return f"{cpu.model} | {cpu.cores} cores | {kind} {model} | {precision} | {_versions()}"


def read_cache(path: Path) -> dict[str, dict]:
    """The cache's entries, or none where the file is missing, not a regular file, too large or not ours."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def write_cache(path: Path, entries: dict[str, dict]) -> None:
    """Write atomically (aside, then rename); a folder that cannot be written only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return  # not ours to replace
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".choice-", delete=False) as tmp:
            json.dump(entries, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        return


def measure(candidates: Mapping[str, Backend], images: np.ndarray, repeats: int = MEASURE_REPEATS) -> dict[str, float]:
    """Median images/s of each backend on `images`, measured in turn so that other load hits all alike."""
    for backend in candidates.values():
        backend.run(images)  # warm-up: first-run allocation and kernel selection
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, backend in candidates.items():
            start = time.perf_counter()
            backend.run(images)
            rates[name].append(len(images) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def measured_choice(
    kind: str,
    info: EncoderInfo,
    precision: str,
    build: Mapping[str, Callable[[], Backend]],
    *,
    cache: Path | None = None,
) -> tuple[str, Backend | None]:
    """The fastest of the `build` candidates (name -> builder) and, when measured now, the built winner.

    A cached entry naming one of the candidates is used without measuring (the winner is then built by
    the caller); otherwise every candidate is built and measured and the cache updated.
    """
    if len(build) == 1:
        return next(iter(build)), None
    path = (cache or cache_dir()) / CACHE_FILE
    key = cache_key(kind, info, precision)
    entries = read_cache(path)
    cached = entries.get(key, {}).get("backend")
    if isinstance(cached, str) and cached in build:  # a list or object there is not a name (and not hashable)
        return cached, None
    built = {name: make() for name, make in build.items()}
    images = np.random.default_rng(0).standard_normal((MEASURE_BATCH, 3, *info.img_size)).astype(np.float32)
    rates = measure(built, images)
    best = max(rates, key=rates.__getitem__)
    entries = read_cache(path)  # another process may have written meanwhile
    entries[key] = {"backend": best, "images_per_s": {k: round(v, 2) for k, v in rates.items()}, "measured": time.time()}
    write_cache(path, entries)
    return best, built[best]
