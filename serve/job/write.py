"""The write side: a batch through the model, then into its shard's output, and NAME.json last.

  embed_batch      uint8 pixels -> patch grids, pooled vectors and any extra layers (the first batch checked)
  (with --head, `write` adds each image's label map: serve/labels.py)
  ShardWriting     one output per shard in progress; count (in order), write, end, finish (commit or abort)
  WriterThread     runs the write tasks in order, apart from the batcher
A shard is done when NAME.tar and NAME.json exist and NAME.json records this run's identity; what
is still open when the job stops is removed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple, cast

import numpy as np

from dmt_jepa.serve.backends import Backend, BackendError, checked_run
from dmt_jepa.serve.claims import Claims
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.job.options import ShardRun
from dmt_jepa.serve.job.read import ShardEnd
from dmt_jepa.serve.layouts import open_output
from dmt_jepa.serve.pca import project
from dmt_jepa.serve.shards import ShardOutput
from dmt_jepa.serve.stats import record_job, record_shard


class Embedded(NamedTuple):
    """One batch through the model."""

    grid: np.ndarray  # [B, h, w, D]
    pooled: np.ndarray  # [B, D]
    layers: dict[int, np.ndarray]  # block index -> [B, h, w, D]
    finite: np.ndarray  # bool [B]: no NaN or inf in the sample's grid and pooled vector
    worst_patch_cosine: float | None  # the fp32 check, on a checked batch where the backend has one
    check_seconds: float


def embed_batch(runner: Backend, pixels: np.ndarray, check: bool) -> Embedded:
    """Batch stage: uint8 [B, H, W, 3] through the model; a checked batch also runs in fp32 and is compared."""
    if check:
        start = time.perf_counter()
        (grid, pooled, *maps), worst = checked_run(runner, pixels)
        seconds = time.perf_counter() - start if worst is not None else 0.0
    else:
        (grid, pooled, *maps), worst, seconds = runner.run_pixels(pixels), None, 0.0
    finite = np.isfinite(grid).reshape(len(pixels), -1).all(axis=1) & np.isfinite(pooled).all(axis=1)
    return Embedded(grid, pooled, dict(zip(runner.layers, maps, strict=True)), finite, worst, seconds)


class ShardWriting:
    """Write and commit stages: one ShardOutput per shard in progress, batches into it, NAME.json last.

    `count` runs where batches come back in order (the main thread); `write`, `fail` and `finish`
    may run in a writer thread. Whatever is still open at `close` is removed.
    """

    def __init__(self, run: ShardRun, claims: Claims):
        self.run, self.claims, self.summary = run, claims, run.summary
        self.spec = replace(run.options.output, layers=tuple(run.runner.layers))
        self.dim = run.runner.info.embed_dim if run.projection is None else cast(int, run.options.pca)  # set with one
        self.outputs: dict[str, ShardOutput] = {}  # shards not yet committed
        self.started: dict[str, float] = {}
        options, runner = run.options, run.runner
        self.info = {
            "input_size": list(run.prep.size),
            "resize": run.prep.resize,
            "pooled": options.pooled,
            "layout": options.layout,
            "dtype": options.dtype,
            "identity": run.identity,
            **runner.describe(),
            **({"layers": list(runner.layers)} if runner.layers else {}),
            **({"head": run.labeller.describe()} if run.labeller is not None else {}),
        }
        self.run_info = {
            "rank": self.summary.rank,
            "world_size": self.summary.world_size,
            "backend": runner.name,
            "precision": runner.precision,
        }

    def output(self, source: ShardSource) -> ShardOutput:
        """The shard's output, opened on its first sample."""
        if source.name not in self.outputs:
            self.outputs[source.name] = open_output(
                self.run.out_dir, source.name, self.claims.owner, self.spec, self.run.prep.grid, self.dim, self.info
            )
            self.started[source.name] = time.time()
        return self.outputs[source.name]

    def count(self, result: Embedded, records: list[dict | None]) -> None:
        """Account for a batch in the summary; a sample with non-finite values becomes a failure (records[i] = None)."""
        first = self.summary.embedded == 0 and self.summary.worst_patch_cosine is None
        if first and not result.finite.all():
            raise BackendError(
                f"the model gives non-finite embeddings (NaN or inf) on the first batch in {self.run.runner.precision}; "
                "its weights are damaged or overflow: check the model file, or try --precision fp32."
            )
        if result.worst_patch_cosine is not None and self.summary.worst_patch_cosine is None:
            self.summary.worst_patch_cosine, self.summary.check_seconds = result.worst_patch_cosine, result.check_seconds
        for i in np.flatnonzero(~result.finite):
            records[i] = None
        self.summary.embedded += int(result.finite.sum())
        self.summary.failed += int((~result.finite).sum())

    def write(self, out: ShardOutput, keys: list[str], records: list[dict | None], carried: list[dict], result: Embedded) -> None:
        """Write one counted batch into its shard's output."""
        grid, pooled = result.grid, result.pooled if self.spec.writes_pooled else None
        # from the model's own float grid, before any projection or rounding to the output dtype
        labels = self.run.labeller(grid) if self.run.labeller is not None else None
        if self.run.projection is not None:
            matrix = self.run.projection
            grid, pooled = project(matrix, grid), None if pooled is None else project(matrix, pooled)
        for i, (key, record) in enumerate(zip(keys, records)):
            if record is None:
                out.fail(key, "the model gave non-finite values (NaN or inf) for this image")
            else:
                extra: dict = {"layers": {k: v[i] for k, v in result.layers.items()}} if result.layers else {}
                if labels is not None:
                    extra["labels"] = labels[i]
                out.add(key, grid[i], record, None if pooled is None else pooled[i], carried[i], **extra)

    def end(self, end: ShardEnd) -> dict:
        """The shard's NAME.json record, once all its samples were read."""
        if end.cut is not None and end.missing is None:
            self.summary.cut_shards.append(end.shard.name)
        return {"shard": f"{end.shard.name}.tar", "source": end.shard.url, "cut": end.cut, **self.info}

    def _committed(self, out: ShardOutput, name: str, record: dict) -> bool:
        """Commit; False where another process took the shard over meanwhile (it removed the files aside)."""
        try:
            out.commit(record)
        except OSError:
            if self.claims.owns(name):
                raise
            return False
        return True

    def finish(self, source: ShardSource, record: dict, missing: str | None) -> None:
        """Commit stage: commit a complete shard if this process still holds it, then give its claim back."""
        out = self.output(source)
        if missing is None and self.claims.owns(source.name) and self._committed(out, source.name, record):
            self.summary.completed.append(source.name)
            try:
                if len(self.summary.completed) == 1:  # not before: a job that commits nothing leaves OUT_DIR as it was
                    record_job(self.run.out_dir, self.run.names)
                record_shard(self.run.out_dir, source.name, self.started[source.name], out.embedded, out.failures, self.run_info)
            except OSError as err:  # the shard is done; only its figures are lost
                self.summary.notices.append(f"no stats record for {source.name} ({err.strerror or err})")
            if self.run.publish is not None:
                self.run.publish(source.name)
        else:  # unreadable, or taken over by another process after a pause longer than the lease
            out.abort()
            if missing is not None:
                self.summary.missing[source.name] = missing
        self.outputs.pop(source.name, None)
        self.claims.release(source.name)

    def close(self) -> None:
        for out in list(self.outputs.values()):
            out.abort()  # removes what an unfinished shard left aside; a committed shard has nothing aside


class WriterThread(threading.Thread):
    """Runs write tasks in order; after a failure it keeps draining so that producers never block."""

    def __init__(self, depth: int):
        super().__init__(name="embed-writer", daemon=True)
        self.tasks: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def run(self) -> None:
        for task in iter(self.tasks.get, None):
            if self.error is None:
                try:
                    task()
                except BaseException as err:
                    self.error = err

    def submit(self, task: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.tasks.put(task)

    def close(self) -> None:
        self.tasks.put(None)
        self.join()
