"""OUT_DIR as an fsspec URL (s3://, gs://, file://, memory://, ...): written through a local staging folder.

Each shard is made exactly as for a local OUT_DIR, in a private staging folder (atomic renames,
byte for byte the same files), then published: its data files uploaded first, NAME.json last, so a
reader that trusts NAME.json never sees a shard half-written, even on a store without rename.
The staged copies are deleted once published, so local disk holds only the shards in flight.

What an object store does not give: an exclusive create, so the claims that let any number of
processes share a local OUT_DIR are private to each process here; split the work with
--rank/--world-size (or SLURM/torchrun) instead. A process killed between uploads can leave data
files without NAME.json: not done, redone and overwritten by the next run.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from pathlib import Path

from dmt_jepa.serve.safe_read import MAX_JSON_BYTES
from dmt_jepa.serve.shards import OUTPUT_FORMAT, data_files, record_problem, shard_files
from dmt_jepa.serve.stats import STATS_DIR


def is_url(out_dir: object) -> bool:
    return isinstance(out_dir, str) and "://" in out_dir


def location(target: str) -> tuple[str, str]:
    """(store, absolute path) of a local path or URL: two names with the same pair are one place.

    A local path and a file:// or local:// URL are the same store, compared after resolving links;
    a chained URL (simplecache::s3://...) stores in its last part.
    """
    target = target.split("::")[-1]
    if "://" not in target:
        return "file", str(Path(target).resolve())
    protocol, _, path = target.partition("://")
    if protocol in ("file", "local"):
        return "file", str(Path(path or "/").resolve())
    return protocol, posixpath.normpath("/" + path.split("?", 1)[0])


class RemoteOut:
    """An fsspec OUT_DIR and the local folder its shards are staged in."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix="dmtjepa-out-"))

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def read_record(self, name: str) -> dict | None:
        """The remote NAME.json of a shard whose data files all exist, or None.

        Read by the local rules: at most MAX_JSON_BYTES, and a record that is not as `dmtjepa embed`
        writes it (hand-edited, too large, not JSON) is not done, so the shard is redone.
        """
        try:
            data = self.fs.cat_file(self._path(f"{name}.json"), start=0, end=MAX_JSON_BYTES + 1)
            record = json.loads(data) if len(data) <= MAX_JSON_BYTES else None
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(record, dict) or record.get("format") != OUTPUT_FORMAT or record_problem(record, name):
            return None
        if not all(self.fs.exists(self._path(f)) for f in data_files(record, name)):
            return None
        return record

    def done_records(self) -> dict[str, dict]:
        """NAME -> NAME.json of every done shard the remote OUT_DIR holds, whichever run made it."""
        files = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        names = [f[: -len(".json")] for f in files if f.endswith(".json") and not f.startswith(".")]
        records = {name: self.read_record(name) for name in names}
        return {name: record for name, record in records.items() if record is not None}

    def remove_shard(self, name: str) -> None:
        """Delete shard NAME's remote files in every layout, NAME.json first."""
        for file in shard_files(name, self.read_record(name)):
            self.remove(file)

    def remove(self, relative: str) -> None:
        if self.fs.exists(self._path(relative)):
            self.fs.rm(self._path(relative))

    def pull(self, relative: str) -> bool:
        """Copy one remote file into staging, if it exists."""
        if not self.fs.exists(self._path(relative)):
            return False
        (self.staging / relative).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(relative), str(self.staging / relative))
        return True

    def push(self, relative: str) -> None:
        if "/" in relative:  # a local filesystem wants the folder; object stores have none to make
            self.fs.makedirs(self._path(relative.rsplit("/", 1)[0]), exist_ok=True)
        self.fs.put_file(str(self.staging / relative), self._path(relative))

    def pull_stats(self) -> None:
        if self.fs.exists(self._path(STATS_DIR)):
            for path in self.fs.ls(self._path(STATS_DIR), detail=False):
                self.pull(f"{STATS_DIR}/{path.rstrip('/').rsplit('/', 1)[-1]}")

    def publish(self, name: str) -> None:
        """Upload a shard committed in staging: data files, then NAME.json, then its stats; drop the copies."""
        record = json.loads((self.staging / f"{name}.json").read_text())
        files = data_files(record, name)
        for relative in files:
            self.push(relative)
        self.push(f"{name}.json")
        for relative in (f"{STATS_DIR}/{name}.json", f"{STATS_DIR}/job.json"):
            if (self.staging / relative).exists():
                self.push(relative)
        for relative in files:
            (self.staging / relative).unlink()

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
