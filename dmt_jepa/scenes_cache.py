"""The scenes benchmark drawn once per setting, then copied: a new run that asks for the same scenes starts at once.

A draw is keyed by everything that decides its bytes: the settings, the source of the generator
(dmt_jepa/scenes.py, dmt_jepa/shapes.py) and the versions of the libraries that draw, encode and
hold the bundled photos. It lives in the user's cache folder (dmt_jepa.cache) under
`scenes/<key>/`, written aside and renamed into place, so a draw cut short is never reused; where
the cache cannot be written the scenes are drawn straight into the output folder. A copy holds
the very shards of the draw; only scenes.json, which names the folder, is written for the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from dmt_jepa.cache import cache_dir
from dmt_jepa.scenes import Progress, write_scene_shards

GENERATOR_SOURCES = ("scenes.py", "shapes.py")
LIBRARIES = ("numpy", "pillow", "scikit-image", "scikit-learn", "webdataset")


def draw_key(settings: dict) -> str:
    """The key of a draw: a digest of its settings, the generator's source and the libraries' versions."""
    here = Path(__file__).parent
    sources = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in GENERATOR_SOURCES}
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    described = json.dumps({"settings": settings, "sources": sources, "versions": versions}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def progress_lines(write: Callable[[str], None], every_s: float = 10.0) -> Progress:
    """A `progress` for write_scene_shards: one line per `every_s` seconds and one at the end of each split."""
    last = [time.monotonic()]

    def report(split: str, made: int, count: int) -> None:
        now = time.monotonic()
        if made == count or now - last[0] >= every_s:
            last[0] = now
            write(f"drawing the scenes: {made}/{count} {split}")

    return report


def _copy(entry: Path, out: Path) -> dict:
    """The draw in `entry` copied into the new folder `out`, its scenes.json naming `out` as a draw there would."""
    summary = json.loads((entry / "scenes.json").read_text())
    out.mkdir(parents=True)
    for split in ("train", "test"):
        copied = []
        for path in summary[split]["paths"]:
            shutil.copyfile(entry / Path(path).name, out / Path(path).name)
            copied.append(str(out / Path(path).name))
        summary[split]["paths"] = copied
    summary["out_dir"] = str(out)
    (out / "scenes.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cached_scene_shards(
    out_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda line: None,
    **settings,
) -> dict:
    """write_scene_shards(out_dir, **settings), from the cache where this draw was made before; `out_dir` must not exist."""
    out = Path(out_dir)
    entry = (cache or cache_dir()) / "scenes" / draw_key(settings)
    if (entry / "scenes.json").is_file():
        log(f"the scenes were drawn before with these settings; copying them from {entry}")
        return _copy(entry, out)
    scratch = entry.with_name(f".{entry.name}.{os.getpid()}.partial")
    try:
        scratch.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    except OSError:
        return write_scene_shards(out, progress=progress, **settings)  # no usable cache: draw them in place
    try:
        write_scene_shards(scratch, progress=progress, **settings)
        try:
            os.replace(scratch, entry)
        except OSError:
            if not (entry / "scenes.json").is_file():  # not another run that finished the same draw first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _copy(entry, out)
