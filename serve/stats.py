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

STATS_DIR = "_stats"
SUMMARY = "summary.json"
JOB = "job.json"


def failure_kind(reason: str) -> str:
    """A reason without what is particular to one sample (names, numbers, details in brackets)."""
    head = re.split(r"[(;:]", reason, maxsplit=1)[0]
    head = re.sub(r"member \S+", "member X", head)
    return re.sub(r"\d+", "N", head).strip()


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
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
    _write_json(out_dir / STATS_DIR / f"{name}.json", record)
    return record


def read_stats(out_dir: Path) -> dict[str, dict]:
    """The per-shard stats records OUT_DIR holds, by shard name."""
    stats = {}
    for path in sorted((out_dir / STATS_DIR).glob("*.json")):
        if path.name in (SUMMARY, JOB):
            continue
        try:
            stats[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
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
    _write_json(out_dir / STATS_DIR / SUMMARY, summary)
    return summary


def read_summary(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STATS_DIR / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def record_job(out_dir: Path, names: list[str]) -> None:
    """OUT/_stats/job.json: the input shard names; rewritten only when they change."""
    path = out_dir / STATS_DIR / JOB
    value = {"shards": names}
    try:
        if json.loads(path.read_text()) == value:
            return
    except (OSError, ValueError):
        pass
    _write_json(path, value)


def describe_out_dir(out_dir: Path) -> dict:
    """What an OUT_DIR holds: model and settings, counts, failures by kind, bytes, missing shards."""
    from serve.shards import DATA_SUFFIXES, OUTPUT_FORMAT, data_files, read_record

    suffixes = "|".join(map(re.escape, DATA_SUFFIXES))
    partial_name = re.compile(rf"\.(.+)\.(?:{suffixes})(?:\.[^./]+)?\.partial")

    records = {}
    for path in sorted(out_dir.glob("*.json")):
        record = read_record(out_dir, path.stem)
        if record is not None:
            records[path.stem] = record
    try:
        job = json.loads((out_dir / STATS_DIR / JOB).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        job = None
    kinds: Counter = Counter(failure_kind(f["reason"]) for r in records.values() for f in r.get("failures", []))
    data_bytes = sum((out_dir / f).stat().st_size for n, r in records.items() for f in data_files(r, n))
    embedded = sum(r.get("embedded", 0) for r in records.values())
    shown = ("layout", "dtype", "pooled", "pooled_only")
    settings = sorted({json.dumps({k: r.get("identity", {}).get(k) for k in shown}) for r in records.values()})
    models = sorted({json.dumps(r.get("model"), sort_keys=True) for r in records.values()})
    return {
        "out_dir": str(out_dir),
        "format": OUTPUT_FORMAT,
        "shards_done": len(records),
        "shards_in_job": None if job is None else len(job),
        "missing": None if job is None else [n for n in job if n not in records],
        "in_progress": sorted({m.group(1) for p in out_dir.glob(".*.partial") if (m := partial_name.fullmatch(p.name))}),
        "embedded": embedded,
        "failed": sum(r.get("failed", 0) for r in records.values()),
        "failures_by_kind": dict(kinds.most_common()),
        "cut_shards": sorted(n for n, r in records.items() if r.get("cut")),
        "models": [json.loads(m) for m in models],
        "settings": [json.loads(x) for x in settings],
        "input_size": next((r.get("input_size") for r in records.values()), None),
        "data_bytes": data_bytes,
        "bytes_per_image": data_bytes / embedded if embedded else None,
        "summary": read_summary(out_dir),
    }
