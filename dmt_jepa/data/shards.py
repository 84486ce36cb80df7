"""Shard patterns, checked without torch: `dmtjepa pretrain` answers a missing shard before its heavy imports.

A pattern is WebDataset's: "::"-separated parts, each with `${NAME}` taken from the environment
variable WDS_NAME and then brace-expanded ("a-{000..009}.tar").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from braceexpand import braceexpand

_VARIABLE = re.compile(r"\$\{(\w+)\}")


class DataError(ValueError):
    """Input data the user pointed at that cannot be used; the message is one sentence."""


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _substitute(part: str, pattern: str) -> str:
    def value(match: re.Match) -> str:
        name = "WDS_" + match.group(1)
        if name not in os.environ:
            raise DataError(
                f"shard pattern {pattern!r} uses ${{{match.group(1)}}} but {name} is not set; set it or write the path out."
            )
        return os.environ[name]

    for _ in range(10):  # a value may itself name a variable, as WebDataset allows
        part, before = _VARIABLE.sub(value, part), part
        if part == before:
            break
    return part


def expand_shards(pattern: str) -> list[str]:
    """Expand a WebDataset brace pattern ("a-{000..009}.tar", "::"-separated lists) into shard URLs.

    Local paths must all exist; remote URLs (http://, s3://, pipe:) are passed on unchecked.
    """
    urls = [url for part in pattern.split("::") for url in braceexpand(_substitute(part, pattern))]
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"shard pattern {pattern!r} matches no file; check the path and the brace range.")
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(urls)} shards of {pattern!r} do not exist (first: {missing[0]}); fix the brace range."
        )
    return urls
