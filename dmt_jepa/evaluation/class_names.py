"""The class names of labelled shards, from the file written beside them.

`dmtjepa data pack --format ...` writes `dataset.json` (per-pixel and box class names) and
`dmtjepa data scenes` writes `scenes.json` (object classes; per pixel, background is label 0).
Shards with neither are named by their labels. The names also fix the number of classes, so a
class absent from a small test set still has its row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dmt_jepa.evaluation.data import EvalDataError, resolve_shards

DATASET_FILENAME = "dataset.json"  # as dmt_jepa.data.labelled_pack writes it
SCENES_FILENAME = "scenes.json"


@dataclass(frozen=True)
class ClassNames:
    """Names by label; None where the shards' folder declares none."""

    seg: list[str] | None = None  # per-pixel classes, index = the label in seg.png
    boxes: list[str] | None = None  # detection classes, index = "digit" in boxes.json


def _names(value: object, path: Path, key: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise EvalDataError(f"{path} has a {key} that is not a list of names; pack the data again.")
    return value


def class_names_for(pattern: str) -> ClassNames:
    """The names declared beside the first shard `pattern` matches (dataset.json, else scenes.json)."""
    folder = resolve_shards(pattern)[0].parent
    for filename in (DATASET_FILENAME, SCENES_FILENAME):
        path = folder / filename
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvalDataError(f"{path} is not readable JSON ({err}); pack the data again.") from err
        if not isinstance(record, dict):
            raise EvalDataError(f"{path} is not the file `dmtjepa data` writes; pack the data again.")
        if filename == SCENES_FILENAME:
            objects = _names(record.get("class_names"), path, "class_names")
            return ClassNames(["background", *objects] if objects else None, objects)
        return ClassNames(
            _names(record.get("seg_class_names"), path, "seg_class_names"),
            _names(record.get("box_class_names"), path, "box_class_names"),
        )
    return ClassNames()
