"""Job bookkeeping kept apart from the outputs: per-shard stats records and the job summary.

    OUT/_stats/NAME.json     one per shard, written by whoever committed it, right after NAME.json
    OUT/_stats/job.json      the job's input shard names, so that what is missing can be told
    OUT/_stats/summary.json  totals over every worker, written once every input shard is done

These hold timings, host and software version, which differ from run to run; keeping them out of
NAME.tar / NAME.json is what lets those stay byte-reproducible. Nothing here decides whether a
shard is done: a lost stats record costs figures, never work.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import Counter
from pathlib import Path

import dmt_jepa
from dmt_jepa.serve.safe_read import FileRefused, read_json
from dmt_jepa.serve.safe_write import writable

STATS_DIR = "_stats"
SUMMARY = "summary.json"
JOB = "job.json"


def failure_kind(reason: str) -> str:
    """A reason without what is particular to one sample (names, numbers, details in brackets)."""
    head = re.split(r"[(;:]", reason, maxsplit=1)[0]
    head = re.sub(r"member \S+", "member X", head)
    return re.sub(r"\d+", "N", head).strip()


def _write_json(out_dir: Path, name: str, value: dict) -> None:
    """OUT/_stats/NAME written aside, then renamed into place."""
    path = writable(out_dir, f"{STATS_DIR}/{name}")
    partial = writable(out_dir, f"{STATS_DIR}/.{name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def record_shard(out_dir: Path, name: str, started: float, embedded: int, failures: list[dict], run: dict) -> dict:
    """Write OUT/_stats/NAME.json for a shard just committed; `run` names the worker and backend."""
    finished = time.time()
    seconds = max(finished - started, 1e-9)
    record = {
        "shard": name,
        "version": dmt_jepa.__version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **run,
        "started": started,
        "finished": finished,
        "seconds": seconds,
        "embedded": embedded,
        "failed": len(failures),
        "failures_by_kind": dict(Counter(failure_kind(f["reason"]) for f in failures)),
        "images_per_second": embedded / seconds,
    }
    _write_json(out_dir, f"{name}.json", record)
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The fields of a stats record that summaries add up, and what each must be.
_SHARD_FIELDS = {
    "embedded": _is_count, "failed": _is_count, "started": _is_number, "finished": _is_number,
    "seconds": _is_number, "host": lambda v: isinstance(v, str), "version": lambda v: isinstance(v, str),
    "pid": _is_count, "rank": lambda v: v is None or _is_count(v),
    "failures_by_kind": lambda v: isinstance(v, dict) and all(map(_is_count, v.values())),
}  # fmt: skip
_SUMMARY_FIELDS = {
    "embedded": _is_count, "failed": _is_count, "workers": _is_count, "wall_seconds": _is_number,
    "images_per_second": _is_number, "versions": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}  # fmt: skip


def _read_checked(out_dir: Path, relative: str, fields: dict, damaged: dict[str, str] | None) -> dict | None:
    """A stats file as a dict whose `fields` hold what they must, or None (noted in `damaged`) where it does not."""
    remedy = "delete it: it holds figures only, and the next run that finishes a shard rewrites them"
    try:
        value = read_json(out_dir, relative, remedy)
    except FileRefused as err:
        problem = str(err)
    else:
        bad = [] if isinstance(value, dict) else ["the whole"]
        bad = bad or [field for field, valid in fields.items() if not valid(value.get(field))]
        if not bad:
            return value
        problem = (
            f"{out_dir / relative} is not a stats record as `dmtjepa embed` writes it ({bad[0]} field missing or "
            f"of the wrong type); {remedy}."
        )
    if damaged is not None:
        damaged[relative] = problem
    return None


def read_stats(out_dir: Path, damaged: dict[str, str] | None = None) -> dict[str, dict]:
    """The per-shard stats records OUT_DIR holds, by shard name; unreadable ones are left out (and noted)."""
    stats = {}
    for path in sorted((out_dir / STATS_DIR).glob("*.json")):
        if path.name in (SUMMARY, JOB):
            continue
        record = _read_checked(out_dir, f"{STATS_DIR}/{path.name}", _SHARD_FIELDS, damaged)
        if record is not None:
            stats[path.stem] = record
    return stats


def summarise(out_dir: Path, names: list[str]) -> dict:
    """Totals over the stats records of shards `names`; shards without one are counted as such."""
    stats = read_stats(out_dir)
    have = [stats[n] for n in names if n in stats]
    kinds: Counter = Counter()
    for record in have:
        kinds.update(record.get("failures_by_kind", {}))
    embedded = sum(r["embedded"] for r in have)
    wall = max((r["finished"] for r in have), default=0.0) - min((r["started"] for r in have), default=0.0)
    return {
        "shards": len(names),
        "shards_with_stats": len(have),
        "embedded": embedded,
        "failed": sum(r["failed"] for r in have),
        "failures_by_kind": dict(sorted(kinds.items())),
        "workers": len({(r["host"], r["pid"], r.get("rank")) for r in have}),
        "versions": sorted({r["version"] for r in have}),
        "wall_seconds": wall,
        "images_per_second": embedded / wall if wall > 0 else 0.0,
        "shard_seconds_max": max((r["seconds"] for r in have), default=0.0),
        "written": time.time(),
    }


def write_summary(out_dir: Path, names: list[str]) -> dict:
    summary = summarise(out_dir, names)
    _write_json(out_dir, SUMMARY, summary)
    return summary


def read_summary(out_dir: Path, damaged: dict[str, str] | None = None) -> dict | None:
    if not os.path.lexists(out_dir / STATS_DIR / SUMMARY):
        return None
    return _read_checked(out_dir, f"{STATS_DIR}/{SUMMARY}", _SUMMARY_FIELDS, damaged)


def _read_job(out_dir: Path, damaged: dict[str, str] | None = None) -> list[str] | None:
    """The input shard names in _stats/job.json, or None where there is none or it is unreadable (noted)."""
    if not os.path.lexists(out_dir / STATS_DIR / JOB):
        return None
    job = _read_checked(out_dir, f"{STATS_DIR}/{JOB}", {"shards": lambda v: isinstance(v, list)}, damaged)
    if job is not None and not all(isinstance(name, str) for name in job["shards"]):
        if damaged is not None:
            damaged[f"{STATS_DIR}/{JOB}"] = f"{out_dir / STATS_DIR / JOB} lists shard names that are not text; delete it."
        return None
    return None if job is None else job["shards"]


def record_job(out_dir: Path, names: list[str]) -> None:
    """OUT/_stats/job.json: the input shard names; rewritten only when they change."""
    if _read_job(out_dir) == names:
        return
    _write_json(out_dir, JOB, {"shards": names})


def describe_out_dir(out_dir: Path) -> dict:
    """What an OUT_DIR holds: model and settings, counts, failures by kind, bytes, missing shards.

    Files that cannot be trusted or read are listed under `damaged`, each with its sentence, and
    left out of every count; shards of different models or settings are listed by `groups`.
    """
    from dmt_jepa.serve.shards import DATA_SUFFIX_PATTERN, OUTPUT_FORMAT, VECTOR_IDENTITY, data_files, load_record

    partial_name = re.compile(rf"\.(.+)\.{DATA_SUFFIX_PATTERN}(?:\.[^./]+)?\.partial")

    damaged: dict[str, str] = {}
    records = {}
    for path in sorted(out_dir.glob("*.json")):
        try:
            record = load_record(out_dir, path.stem)
        except FileRefused as err:
            damaged[path.name] = str(err)
            continue
        if record is not None:
            records[path.stem] = record
    job = _read_job(out_dir, damaged)
    kinds: Counter = Counter(failure_kind(f["reason"]) for r in records.values() for f in r.get("failures", []))
    data_bytes = sum((out_dir / f).stat().st_size for n, r in records.items() for f in data_files(r, n))
    embedded = sum(r["embedded"] for r in records.values())
    shown = ("layout", "dtype", "pooled", "pooled_only")
    groups: dict[str, dict] = {}
    for name, r in records.items():
        identity = r.get("identity", {})
        group = {
            "model": r.get("model"),
            "settings": {k: identity.get(k) for k in shown},
            "input_size": r.get("input_size"),
            "identity": {k: identity.get(k) for k in VECTOR_IDENTITY},
        }
        groups.setdefault(json.dumps(group, sort_keys=True), {**group, "shards": []})["shards"].append(name)
    settings = sorted({json.dumps(g["settings"]) for g in groups.values()})
    models = sorted({json.dumps(g["model"], sort_keys=True) for g in groups.values()})
    summary = read_summary(out_dir, damaged)
    read_stats(out_dir, damaged)  # only to list damaged stats records
    return {
        "out_dir": str(out_dir),
        "format": OUTPUT_FORMAT,
        "shards_done": len(records) if job is None else sum(n in records for n in job),
        "shards_in_job": None if job is None else len(job),
        "missing": None if job is None else [n for n in job if n not in records],
        "not_in_job": [] if job is None else [n for n in records if n not in set(job)],
        "in_progress": sorted({m.group(1) for p in out_dir.glob(".*.partial") if (m := partial_name.fullmatch(p.name))}),
        "embedded": embedded,
        "failed": sum(r.get("failed", 0) for r in records.values()),
        "failures_by_kind": dict(kinds.most_common()),
        "cut_shards": sorted(n for n, r in records.items() if r.get("cut")),
        "models": [json.loads(m) for m in models],
        "settings": [json.loads(x) for x in settings],
        "input_size": next((r.get("input_size") for r in records.values()), None),
        "groups": list(groups.values()),
        "data_bytes": data_bytes,
        "bytes_per_image": data_bytes / embedded if embedded else None,
        "damaged": damaged,
        "summary": summary,
    }
