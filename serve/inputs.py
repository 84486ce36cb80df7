"""Which shards a process embeds: INPUT (pattern, list file or directory) -> its share by rank."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class InputError(ValueError):
    """INPUT or the rank settings are unusable; the message is one sentence for the user."""


@dataclass(frozen=True)
class ShardSource:
    """One input shard: where to read it and the NAME its outputs carry."""

    url: str
    name: str


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("pipe:")


def shard_name(source: str) -> str:
    """NAME of OUT/NAME.tar: the file name without its shard suffix."""
    if source.startswith("pipe:"):  # "pipe:curl -s URL", "pipe:aws s3 cp URL -": name it after the URL
        words = source[5:].split()
        source = next((w for w in reversed(words) if w.endswith(SHARD_SUFFIXES)), words[-1] if words else source)
    base = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _from_list_file(path: Path) -> list[str]:
    """One shard path or URL per line; blank lines and '#' comments skipped; paths relative to the file."""
    sources = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sources.append(line if _is_url(line) or os.path.isabs(line) else str(path.parent / line))
    if not sources:
        raise InputError(f"the list file {path} names no shards; put one shard path or URL per line.")
    return sources


def _from_directory(path: Path) -> list[str]:
    sources = sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    if not sources:
        raise InputError(f"the directory {path} holds no .tar shards; pass a directory of shards, a pattern or a list file.")
    return sources


def _from_pattern(pattern: str) -> list[str]:
    sources = list(braceexpand(pattern))
    local = [s for s in sources if not _is_url(s)]
    missing = [s for s in local if not os.path.isfile(s)]
    if missing and len(missing) == len(sources):
        raise InputError(f"INPUT {pattern} matches no existing shard; check the path or brace pattern.")
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(sources)} shards named by {pattern} do not exist (first: {missing[0]}); "
            "fix the pattern or list the shards that exist in a file."
        )
    return sources


def resolve_inputs(spec: str | Sequence[str]) -> list[ShardSource]:
    """INPUT -> shards in a fixed order: a directory, a list file, a brace pattern, or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("no INPUT given; pass a shard pattern, a list file or a directory.")
    sources: list[str] = []
    for item in specs:
        path = Path(item)
        if not _is_url(item) and path.is_dir():
            sources += _from_directory(path)
        elif not _is_url(item) and path.is_file() and not item.endswith(SHARD_SUFFIXES):
            sources += _from_list_file(path)
        else:
            sources += _from_pattern(item)
    shards = [ShardSource(s, shard_name(s)) for s in sources]
    by_name: dict[str, str] = {}
    for shard in shards:
        if shard.name in by_name:
            raise InputError(
                f"the shards {by_name[shard.name]} and {shard.url} share the name {shard.name}, so their outputs "
                "would collide; embed them into different OUT_DIRs."
            )
        by_name[shard.name] = shard.url
    return shards


def resolve_rank(rank: int | None, world_size: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Rank and world size from the flags, else torchrun's RANK/WORLD_SIZE, else SLURM's, else (0, 1)."""
    if rank is None and world_size is None:
        for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in env and world_var in env:
                try:
                    rank, world_size = int(env[rank_var]), int(env[world_var])
                except ValueError as err:
                    raise InputError(
                        f"{rank_var}/{world_var} must be integers, got {env[rank_var]!r}/{env[world_var]!r}."
                    ) from err
                break
    if (rank is None) != (world_size is None):
        raise InputError("give both --rank and --world-size, or neither.")
    rank, world_size = (0, 1) if rank is None else (rank, world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in 0..world size - 1 (world size {world_size}).")
    return rank, world_size


def partition(shards: Sequence[ShardSource], rank: int, world_size: int) -> list[ShardSource]:
    """Shards i with i % world_size == rank: disjoint, covering, and the same for every process."""
    return [shard for i, shard in enumerate(shards) if i % world_size == rank]
