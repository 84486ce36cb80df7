"""The shard -> dense embeddings batch job.

Three stages run at once so that the slowest one sets the pace:
  reader thread   shards -> samples -> decode tasks for worker processes (bounded queue)
  main thread     decoded images -> batches -> backend (batches never span two shards)
  writer thread   embeddings -> OUT/.NAME.tar.partial -> OUT/NAME.tar, then OUT/NAME.json last
Every queue is bounded, so memory does not grow with shard size. Batches stay inside one shard so
that a shard's bytes do not depend on which shards a restarted run skips.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from serve.api import preprocess_for
from serve.backends import Backend, checked_run, load_backend
from serve.decode import Decoder, finished
from serve.images import DEFAULT_MAX_PIXELS, ImageRejected, Preprocess
from serve.inputs import ShardSource, partition, resolve_inputs, resolve_rank
from serve.shards import ShardOutput, ShardReader, is_done, open_source


class OutputDirError(ValueError):
    """OUT_DIR cannot hold the outputs; the message is one sentence for the user."""


@dataclass
class JobSummary:
    """What one process of the job did."""

    rank: int
    world_size: int
    shards: list[str]  # NAMEs assigned to this rank
    skipped: list[str] = field(default_factory=list)  # already done before this run
    embedded: int = 0
    failed: int = 0
    cut_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""
    precision: str = ""
    worst_patch_cosine: float | None = None  # first-batch check against fp32, where one ran
    check_seconds: float = 0.0  # part of `seconds` spent on that check (it runs the first batch twice)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def prepare_out_dir(out_dir: Path, shards: Sequence[ShardSource]) -> Path:
    """Create OUT_DIR, prove it writable, and refuse one where outputs would overwrite inputs."""
    for shard in shards:
        target = out_dir / f"{shard.name}.tar"
        if "://" not in shard.url and target.exists() and target.resolve() == Path(shard.url).resolve():
            raise OutputDirError(
                f"OUT_DIR {out_dir} holds the input shard {shard.url}, which the output would overwrite; "
                "choose another OUT_DIR."
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(
            f"cannot write to OUT_DIR {out_dir} ({err.strerror or err}); choose a writable directory."
        ) from err
    return out_dir


class _Decoding(NamedTuple):
    """One input sample on its way from the reader thread to the batcher."""

    shard: int  # index into the pending shards
    key: str
    task: Future  # (pixels, record), or raises ImageRejected
    data: bytes  # the encoded image, kept to decode it again if its worker dies


class _ShardEnd(NamedTuple):
    shard: int
    cut: str | None  # why the shard ended early, if it did


class _ReaderFailed(NamedTuple):
    error: BaseException


class _Stopped(Exception):
    """The job is shutting down; the reader thread leaves."""


def _put(q: queue.Queue, item: object, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _read_shards(
    pending: Sequence[ShardSource],
    decoder: Decoder,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Reader thread: a _Decoding per sample and a _ShardEnd per shard, in input order, then None."""
    try:
        for index, source in enumerate(pending):
            cut = None
            try:
                with open_source(source.url) as stream:
                    reader = ShardReader(stream)
                    for sample in reader:
                        try:
                            data = sample.image()[1]
                            task = decoder.submit(data)
                        except ImageRejected as err:
                            data, task = b"", finished(error=err)
                        _put(out, _Decoding(index, sample.key, task, data), stop)
                    cut = reader.cut
            except (OSError, EOFError, zlib.error) as err:  # unreadable or corrupt-compressed shard
                cut = f"cannot read the shard ({err}); the samples before the error were kept"
            _put(out, _ShardEnd(index, cut), stop)
        _put(out, None, stop)
    except _Stopped:
        return
    except BaseException as err:  # a bug: hand it to the main thread rather than dying silently
        out.put(_ReaderFailed(err))


class _Writer(threading.Thread):
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


def _write_batch(
    out: ShardOutput,
    keys: list[str],
    records: list[dict],
    grid: np.ndarray,
    pooled: np.ndarray | None,
    layers: dict[int, np.ndarray],
) -> None:
    for i, key in enumerate(keys):
        out.add(key, grid[i], records[i], None if pooled is None else pooled[i], {k: v[i] for k, v in layers.items()})


class _Progress:
    """A progress bar on stderr over shards, with images and images/s; does nothing when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards  {task.fields[images]} images  {task.fields[rate]:.1f} images/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("embed", total=total, images=0, rate=0.0)
        self.bar.start()
        self.started = time.perf_counter()

    def images(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, images=count, rate=count / max(time.perf_counter() - self.started, 1e-9))

    def shard_done(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def embed_shards(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | Backend,
    *,
    backend: str = "auto",
    precision: str | None = None,
    size: tuple[int, int] | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    workers: int | None = None,
    pooled: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    layers: Sequence[int] | None = None,
) -> JobSummary:
    """Embed every shard of INPUT assigned to this rank into OUT_DIR; finished shards are skipped.

    `model` is a model file, or a Backend already built (then `backend`, `precision` and `layers`
    are its own). `layers` also writes those blocks per sample (KEY.layer_<i>.npy).
    `workers` decode processes (None: half the CPUs, at least one; 0: decode in a thread).
    """
    assert batch_size >= 1
    shards = resolve_inputs(inputs)
    rank, world_size = resolve_rank(rank, world_size)
    mine = partition(shards, rank, world_size)
    runner = model if isinstance(model, Backend) else load_backend(model, backend, precision, layers)
    prep = preprocess_for(runner, size, resize, max_pixels)
    out = prepare_out_dir(Path(out_dir), shards)
    summary = JobSummary(rank, world_size, [s.name for s in mine], backend=runner.name, precision=runner.precision)
    summary.skipped = [s.name for s in mine if is_done(out, s.name)]
    pending = [s for s in mine if not is_done(out, s.name)]
    start = time.perf_counter()
    if pending:
        workers = max(1, (os.cpu_count() or 2) // 2) if workers is None else workers
        _run(pending, out, runner, prep, batch_size, workers, pooled, summary, progress)
    summary.seconds = time.perf_counter() - start
    return summary


def _run(
    pending: list[ShardSource],
    out_dir: Path,
    runner: Backend,
    prep: Preprocess,
    batch_size: int,
    workers: int,
    pooled: bool,
    summary: JobSummary,
    progress: bool,
) -> None:
    """The pipeline over the shards still to do; commits each shard as soon as it is complete."""
    decoder = Decoder(workers, prep)
    samples: queue.Queue = queue.Queue(maxsize=2 * batch_size + 2 * workers)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_shards, args=(pending, decoder, samples, stop), name="embed-reader", daemon=True
    )
    writer = _Writer(depth=4)
    outputs: dict[int, ShardOutput] = {}
    shard_info = {"input_size": list(prep.size), "resize": prep.resize, "pooled": pooled, **runner.describe()}
    if runner.layers:
        shard_info["layers"] = list(runner.layers)
    bar = _Progress(progress, len(pending))
    batch: list[tuple[str, np.ndarray, dict]] = []

    def flush(out: ShardOutput) -> None:
        if not batch:
            return
        keys, arrays, records = zip(*batch, strict=True)
        pixels = np.stack(arrays)  # uint8 [B, H, W, 3]
        if summary.embedded == 0:
            check_start = time.perf_counter()
            (grid, pool_vec, *maps), summary.worst_patch_cosine = checked_run(runner, pixels)
            if summary.worst_patch_cosine is not None:
                summary.check_seconds = time.perf_counter() - check_start
        else:
            grid, pool_vec, *maps = runner.run_pixels(pixels)  # [B, h, w, D], [B, D], [B, h, w, D] per layer
        layer_maps = dict(zip(runner.layers, maps, strict=True))
        writer.submit(
            partial(_write_batch, out, list(keys), list(records), grid, pool_vec if pooled else None, layer_maps)
        )
        summary.embedded += len(keys)
        batch.clear()
        bar.images(summary.embedded)

    reader.start()
    writer.start()
    try:
        for item in iter(samples.get, None):
            if isinstance(item, _ReaderFailed):
                raise item.error
            source = pending[item.shard]
            out = outputs.setdefault(item.shard, ShardOutput(out_dir, source.name))
            if isinstance(item, _Decoding):
                try:
                    array, record = decoder.result(item.task, item.data)
                except ImageRejected as err:
                    writer.submit(partial(out.fail, item.key, str(err)))
                    summary.failed += 1
                    continue
                batch.append((item.key, array, record))
                if len(batch) == batch_size:
                    flush(out)
            else:
                flush(out)
                if item.cut is not None:
                    summary.cut_shards.append(source.name)
                done = {"shard": f"{source.name}.tar", "source": source.url, "cut": item.cut, **shard_info}
                writer.submit(partial(out.commit, done))
                del outputs[item.shard]  # from here on the writer owns it; memory stays flat over many shards
                bar.shard_done()
        writer.close()
        if writer.error is not None:
            raise writer.error
    finally:
        stop.set()
        reader.join(timeout=10)
        decoder.close()
        if writer.is_alive():
            writer.close()
        for out in outputs.values():
            out.abort()  # removes what an unfinished shard left aside; a committed shard has nothing aside
        bar.close()
