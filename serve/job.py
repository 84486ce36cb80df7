"""The shard -> dense embeddings batch job.

Three stages run at once so that the slowest one sets the pace:
  reader thread   claimed shards -> samples -> decode tasks for worker processes (bounded queue)
  main thread     decoded images -> batches -> backend (batches never span two shards)
  writer thread   embeddings -> OUT/.NAME.tar.OWNER.partial -> OUT/NAME.tar, then OUT/NAME.json last
Every queue is bounded in count, and the encoded bytes between reader and batcher in bytes, so
memory grows neither with shard size nor with image size. Batches stay inside one shard so that a
shard's bytes do not depend on which shards a restarted run skips, or which process embeds it.
A shard is done when NAME.tar and NAME.json exist and NAME.json records this run's identity.
"""

from __future__ import annotations

import os
import posixpath
import queue
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

import dmt_jepa
from dmt_jepa.disk_space import free_space, out_of_space, size_in_words
from dmt_jepa.serve.api import preprocess_for
from dmt_jepa.serve.backends import Backend, BackendError, checked_run, load_backend
from dmt_jepa.serve.claims import DEFAULT_LEASE_SECONDS, Claims, owner_token
from dmt_jepa.serve.decode import Decoder, finished
from dmt_jepa.serve.images import DEFAULT_MAX_PIXELS, EncodedJpeg, ImageRejected, Preprocess
from dmt_jepa.serve.inputs import ShardSource, partition, resolve_inputs, resolve_rank
from dmt_jepa.serve.layouts import EMBEDDING_READER_DIRS, LAYOUTS, OutputSpec, open_output
from dmt_jepa.serve.pca import PCA_FILE, PcaError, load_or_fit, project
from dmt_jepa.serve.progress import Progress
from dmt_jepa.serve.quantize import DTYPES
from dmt_jepa.serve.remote import RemoteOut, is_url, location
from dmt_jepa.serve.safe_write import OutputDirError, checked, remove
from dmt_jepa.serve.shards import (
    ShardOutput,
    ShardReader,
    done_records,
    identity_difference,
    is_done,
    open_source,
    read_record,
    remove_leftovers,
    remove_shard_files,
)
from dmt_jepa.serve.stats import JOB, STATS_DIR, SUMMARY, read_summary, record_job, record_shard, write_summary

ENGINES = ("local", "ray")
DECODES = ("cpu", "gpu")


class EngineError(ValueError):
    """The chosen engine cannot run here (Ray missing, a cluster out of reach); one sentence for the user."""


class OutputWriteError(OSError):
    """Writing into OUT_DIR failed mid-job (a full disk, an I/O error); the message is one sentence."""


@dataclass(frozen=True)
class EmbedOptions:
    """Every setting of the embedding job; the CLI builds one, `embed_shards` reads it."""

    backend: str = "auto"
    precision: str | None = None  # None: the model's own
    size: tuple[int, int] | None = None  # [H, W]; None: the training size
    resize: str = "crop"
    batch_size: int = 32
    workers: int | None = None  # decode processes; None: half the CPUs, at least one; 0: in a thread
    pooled: bool = False
    layout: str = "tar"  # tar: WebDataset samples; array: .npy arrays and a Parquet table per shard;
    # embedding-reader: pooled vectors and tables in img_emb/ and metadata/ (serve/layouts.py)
    dtype: str = "float16"  # float32, float16, or int8 with a float32 scale per vector
    pooled_only: bool = False  # pooled vectors only, no patch grids
    max_carried_bytes: int = 64 << 10  # non-image input members up to this size are copied; 0: none
    pca: int | None = None  # store patch (and pooled) vectors projected on this many principal axes
    rank: int | None = None  # with world_size: a static split; None: from the environment, else shared
    world_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = False  # a bar on stderr (for a terminal)
    progress_every: float = 0.0  # without the bar: a plain progress line on stderr this often (seconds); 0: none
    overwrite: bool = False  # redo shards that OUT_DIR holds from other settings, instead of refusing
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # a claim unchanged this long belongs to a dead process
    max_queued_bytes: int = 256 << 20  # encoded image bytes between the reader and the batcher
    # blocks also written (tar: KEY.layer_<i>.npy, array: NAME.layer_<i>.npy); a Backend given has its own
    layers: tuple[int, ...] | None = None
    engine: str = "local"  # local: this process and its decode workers; ray: a Ray cluster (serve.ray_engine)
    address: str | None = None  # ray: the cluster to join ("auto": the one `ray start` began here); None: a new local one
    decode_workers: int | None = None  # ray: decode tasks at once; None: the cluster's CPUs less the model actors'
    model_workers: int = 1  # ray: model actors, each holding the model once
    gpus_per_worker: float = 0.0  # ray: GPUs per model actor; 0: CPU
    decode: str = "cpu"  # cpu: decode workers decode; gpu: they check JPEG headers, the PyTorch backend's device decodes

    def __post_init__(self) -> None:
        assert self.batch_size >= 1 and self.lease_seconds > 0 and self.max_queued_bytes > 0
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}.")
        ray_only = {"--address": self.address is not None, "--decode-workers": self.decode_workers is not None,
                    "--model-workers": self.model_workers != 1, "--gpus-per-worker": self.gpus_per_worker != 0}
        if self.engine != "ray" and any(ray_only.values()):
            given = ", ".join(flag for flag, set_ in ray_only.items() if set_)
            raise ValueError(f"{given} only apply to --engine ray; add --engine ray or leave them out.")
        if self.model_workers < 1 or self.gpus_per_worker < 0 or (self.decode_workers is not None and self.decode_workers < 1):
            raise ValueError("--model-workers and --decode-workers must be at least 1 and --gpus-per-worker at least 0.")
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r}; choose one of {', '.join(DECODES)}.")
        if self.decode == "gpu" and self.engine == "ray":
            raise ValueError("--decode gpu runs with --engine local; the Ray engine decodes in its own tasks on CPUs.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"--pca {self.pca} is not a number of dimensions; give one of at least 1.")
        if self.layout == "embedding-reader" and self.layers:
            raise ValueError("--layout embedding-reader holds pooled vectors only; use --layout array for --layers.")
        if self.layout == "embedding-reader" and self.dtype == "int8":
            raise ValueError("embedding-reader reads float16 or float32 vectors only; use --dtype float16 or float32.")
        if self.layers and self.pca is not None:
            raise ValueError("--layers and --pca cannot be combined: the layers would stay unprojected; choose one.")

    @property
    def output(self) -> OutputSpec:
        return OutputSpec(self.layout, self.dtype, self.pooled, self.pooled_only)  # layers: the runner's, absolute


@dataclass
class JobSummary:
    """What one process of the job did."""

    rank: int
    world_size: int
    shards: list[str]  # NAMEs assigned to this rank (all of them without a static split)
    skipped: list[str] = field(default_factory=list)  # already done before this run
    completed: list[str] = field(default_factory=list)  # committed by this process
    missing: dict[str, str] = field(default_factory=dict)  # NAME -> why it could not be read (not done)
    embedded: int = 0
    failed: int = 0
    cut_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""
    precision: str = ""
    notices: list[str] = field(default_factory=list)  # one line each, for the user
    job: dict | None = None  # the summary over all workers, once this run saw every shard done
    worst_patch_cosine: float | None = None  # first-batch check against fp32, where one ran
    check_seconds: float = 0.0  # part of `seconds` spent on that check (it runs the first batch twice)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def by_others(self) -> int:
        """Shards of this process's share that other processes finished during this run."""
        return len(self.shards) - len(self.skipped) - len(self.completed) - len(self.missing)


def run_identity(runner: Backend, prep: Preprocess, options: EmbedOptions) -> dict:
    """What makes a shard's bytes what they are; a shard made otherwise is not this run's to skip."""
    return {
        "model_sha256": runner.model_sha256,
        "input_size": list(prep.size),
        "resize": prep.resize,
        "pooled": options.pooled,
        "layout": options.layout,
        "dtype": options.dtype,
        "pooled_only": options.pooled_only,
        "max_carried_bytes": options.max_carried_bytes,
        "pca": options.pca,
        "precision": runner.precision,
        "backend": runner.name.split("-")[0],
        "version": dmt_jepa.__version__,
        **({"layers": list(runner.layers)} if runner.layers else {}),
        **({"decode": "gpu"} if options.decode == "gpu" else {}),  # a few grey levels from the CPU's resize
    }


def check_identity(out_dir: Path | str, identity: dict, records: dict[str, dict]) -> None:
    """Refuse a run whose settings differ from those of any shard OUT_DIR holds: one set of settings per OUT_DIR.

    Runs before the PCA is fitted, so the projection's hash is not compared here (a changed pca.npy
    only makes its shards not done).
    """
    for name, record in sorted(records.items()):
        difference = identity_difference(record, identity, unknown=("pca_sha256",))
        if difference is not None:
            raise OutputDirError(
                f"OUT_DIR {out_dir} already holds {name}, which {difference}; rerun with the same settings, "
                "choose another OUT_DIR, or pass --overwrite to replace every shard made otherwise."
            )


def refuse_out_over_inputs(out_dir: str | os.PathLike, shards: Sequence[ShardSource]) -> None:
    """Refuse an OUT_DIR (path or URL) that is an input shard's folder or one above it."""
    store, root = location(os.fspath(out_dir))
    above = root.rstrip("/") + "/"
    for shard in shards:
        if shard.url.startswith("pipe:"):
            continue
        shard_store, path = location(shard.url)
        folder = posixpath.dirname(path)
        if shard_store == store and (folder == root or folder.startswith(above)):
            raise OutputDirError(
                f"OUT_DIR {out_dir} is the folder of the input shard {shard.url} or one above it, so outputs would "
                "overwrite inputs; choose an OUT_DIR outside the input folders."
            )


def prepare_out_dir(out_dir: Path, layout: str = "tar") -> Path:
    """Create OUT_DIR and prove it writable; each name the job writes whatever its shards are called must be
    missing, or a real folder or regular file as the job writes it (serve/safe_write.py)."""
    folders = [STATS_DIR, *(EMBEDDING_READER_DIRS if layout == "embedding-reader" else ())]
    for name in folders:
        checked(out_dir, name, folder=True)
    for name in (f"{STATS_DIR}/{JOB}", f"{STATS_DIR}/{SUMMARY}", PCA_FILE):
        checked(out_dir, name)
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

    shard: ShardSource
    key: str
    task: Future  # (pixels, record), or raises ImageRejected
    data: bytes  # the encoded image, kept to decode it again if its worker dies
    carried: dict[str, bytes]  # the sample's non-image members, copied to its output
    not_carried: list[str]  # extensions of non-image members too large to copy


class ShardEnd(NamedTuple):
    shard: ShardSource
    cut: str | None  # why the shard ended early, if it did
    missing: str | None  # why the shard could not be read at all (then it is not done)


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


class _ByteBudget:
    """Bounds the encoded bytes between the reader and the batcher, whatever the count of samples.

    One item larger than the whole budget still passes when nothing else is queued, so that the
    job never waits for itself.
    """

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    def acquire(self, size: int, stop: threading.Event) -> None:
        with self._changed:
            while self.used and self.used + size > self.limit:
                if stop.is_set():
                    raise _Stopped
                self._changed.wait(timeout=0.1)
            self.used += size

    def release(self, size: int) -> None:
        with self._changed:
            self.used -= size
            self._changed.notify_all()


class ReadSample(NamedTuple):
    """One input sample as the read stage hands it on: its encoded image, or why it has none."""

    key: str
    data: bytes  # the encoded image; empty when rejected
    carried: dict[str, bytes]  # the sample's non-image members, copied to its output
    not_carried: list[str]  # extensions of non-image members too large to copy
    rejected: ImageRejected | None  # the sample has no usable image member


def read_shard(source: ShardSource, max_carried_bytes: int) -> Iterator[ReadSample | ShardEnd]:
    """Read stage: a ReadSample per sample of one shard, in order, then its ShardEnd (cut or missing)."""
    cut = missing = None
    try:
        stream = open_source(source.url)
    except OSError as err:
        yield ShardEnd(source, None, f"cannot open {source.url} ({err.strerror or err})")
        return
    reader = ShardReader(stream, images_only=True, max_carried_bytes=max_carried_bytes)
    try:
        with stream:
            for sample in reader:
                carried = sample.carried()
                try:
                    yield ReadSample(sample.key, sample.image()[1], carried, sample.not_carried, None)
                except ImageRejected as err:
                    yield ReadSample(sample.key, b"", {}, sample.not_carried, err)
        cut = reader.cut
    except (OSError, EOFError, zlib.error) as err:  # a stream that fails where the reader cannot see it
        cut = f"cannot read the shard ({err}); the samples before the error were kept"
    if reader.offset == 0:  # a pipe whose command failed reads as empty, as does a missing object
        missing = f"cannot read {source.url} ({cut})"
    yield ShardEnd(source, cut, missing)


def _read_shards(
    shards: Iterator[ShardSource],
    max_carried_bytes: int,
    decoder: Decoder,
    budget: _ByteBudget,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Reader thread: a _Decoding per sample and a ShardEnd per shard, in claim order, then None."""
    try:
        for source in shards:
            for item in read_shard(source, max_carried_bytes):
                if isinstance(item, ReadSample):
                    if item.rejected is None:
                        budget.acquire(len(item.data) + sum(map(len, item.carried.values())), stop)
                        task = decoder.submit(item.data)
                    else:
                        task = finished(error=item.rejected)
                    item = _Decoding(source, item.key, task, item.data, item.carried, item.not_carried)
                _put(out, item, stop)
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


def embed_shards(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | Backend,
    options: EmbedOptions | None = None,
    **settings,
) -> JobSummary:
    """Embed every shard of INPUT (this rank's share) into OUT_DIR; shards already done are skipped.

    `model` is a model file, or a Backend already built (then `backend` and `precision` are its own).
    Settings are an EmbedOptions, or its fields as keywords. Any number of processes may run this on
    one OUT_DIR at once: each shard is claimed by one of them (serve.claims).
    """
    options = replace(options or EmbedOptions(), **settings)
    shards = resolve_inputs(inputs)
    rank, world_size = resolve_rank(options.rank, options.world_size)
    mine = partition(shards, rank, world_size)
    with ExitStack() as stack:
        if options.engine == "ray":
            from dmt_jepa.serve import ray_engine  # Ray is an optional extra, imported only when asked for

            runner, run = stack.enter_context(ray_engine.session(model, options))
        else:
            runner = model if isinstance(model, Backend) else load_backend(model, options.backend, options.precision, options.layers)
            run = _run
            from dmt_jepa.serve.backends.torch_backend import TorchBackend

            if options.decode == "gpu" and not isinstance(runner, TorchBackend):
                raise BackendError(
                    f"--decode gpu decodes on the PyTorch backend's GPU, not with {runner.name}; add --backend torch-cuda."
                )
        prep = preprocess_for(runner, options.size, options.resize, options.max_pixels)
        refuse_out_over_inputs(out_dir, shards)
        remote = _open_remote(out_dir)
        if remote is not None:
            stack.callback(remote.close)
        return _embed_into(out_dir, remote, shards, mine, rank, world_size, runner, prep, options, run)


def _open_remote(out_dir: str | os.PathLike) -> RemoteOut | None:
    if not is_url(out_dir):
        return None
    try:
        return RemoteOut(str(out_dir))
    except (OSError, ValueError, ImportError) as err:
        raise OutputDirError(f"cannot open OUT_DIR {out_dir} ({err}); check the URL and its credentials.") from err


def _embed_into(
    out_dir: str | os.PathLike,
    remote: RemoteOut | None,
    shards: list[ShardSource],
    mine: list[ShardSource],
    rank: int,
    world_size: int,
    runner: Backend,
    prep: Preprocess,
    options: EmbedOptions,
    run: Callable[[ShardRun], None],
) -> JobSummary:
    """embed_shards once OUT_DIR is open: local, or a remote one staged in `remote.staging`."""
    out = Path(out_dir) if remote is None else remote.staging
    read = partial(read_record, out) if remote is None else remote.read_record
    identity = run_identity(runner, prep, options)
    records = done_records(out) if remote is None else remote.done_records()
    if not options.overwrite:
        check_identity(out_dir, identity, records)
    prepare_out_dir(out, options.layout)
    projection = None
    if options.pca is not None:
        if remote is not None:
            remote.pull(PCA_FILE)
        try:
            projection, identity["pca_sha256"] = load_or_fit(out, runner, prep, shards, options.pca, options.overwrite)
        except PcaError as err:
            raise OutputDirError(str(err)) from err
        if remote is not None:
            remote.push(PCA_FILE)
    if options.overwrite:
        _clear_other_settings(out, remote, identity, records, keep_pca=options.pca is not None)

    def done(name: str) -> bool:
        record = read(name)
        return record is not None and identity_difference(record, identity) is None

    summary = JobSummary(rank, world_size, [s.name for s in mine], backend=runner.name, precision=runner.precision)
    summary.notices += runner.notices
    summary.skipped = [s.name for s in mine if done(s.name)]
    pending = [s for s in mine if s.name not in set(summary.skipped)]
    start = time.perf_counter()
    if pending:
        try:
            publish = None if remote is None else remote.publish
            names = [s.name for s in shards]
            run(ShardRun(pending, names, out, runner, prep, identity, projection, options, summary, publish))
        except OSError as err:
            dim = runner.info.embed_dim if projection is None else options.pca
            raise OutputWriteError(_write_failure(out_dir, out, err, options, runner.layers, prep.grid, dim)) from err
    summary.seconds = time.perf_counter() - start
    names = [s.name for s in shards]
    if (summary.completed or read_summary(out) is None) and all(done(n) for n in names):
        try:
            if remote is not None:
                remote.pull_stats()  # the other workers' records, for totals over all of them
            summary.job = write_summary(out, names)
            if remote is not None:
                remote.push(f"{STATS_DIR}/{SUMMARY}")
        except OSError as err:
            summary.notices.append(f"the job summary could not be written to {out_dir} ({err.strerror or err})")
    return summary


def _write_failure(
    out_dir: str | os.PathLike, out: Path, err: OSError, options: EmbedOptions, layers, grid: tuple[int, int], dim: int
) -> str:
    """The sentence for a write into OUT_DIR that failed mid-job; for a full disk or quota, with the space free
    there and about how much each image's embeddings take (OutputSpec.bytes_per_image)."""
    kept = "the shards finished before are kept and nothing half-written is left"
    full = out_of_space(err)
    if full is None:
        return (
            f"writing into OUT_DIR {out_dir} failed ({err.strerror or err}); {kept}: fix the cause (free space?) "
            "and rerun the same command."
        )
    per_image = replace(options.output, layers=tuple(layers)).bytes_per_image(grid, dim)
    return (
        f"{full} while writing into OUT_DIR {out_dir} ({free_space(out)} free there); the embeddings take about "
        f"{size_in_words(per_image)} per image ({size_in_words(1000 * per_image)} per 1,000), plus the members "
        f"carried, so free that much for the images still to embed and rerun the same command: {kept}."
    )


def _clear_other_settings(
    out: Path, remote: RemoteOut | None, identity: dict, records: dict[str, dict], keep_pca: bool
) -> None:
    """--overwrite: remove every shard made with other settings (all layouts, with its stats), and a
    pca.npy this run does not use, so that OUT_DIR holds one set of settings again."""
    cleared = [name for name, record in records.items() if identity_difference(record, identity) is not None]
    relatives = [f"{STATS_DIR}/{name}.json" for name in cleared]
    if cleared:
        relatives.append(f"{STATS_DIR}/{SUMMARY}")
    if not keep_pca:
        relatives.append(PCA_FILE)
    for name in cleared:
        remove_shard_files(out, name)
        if remote is not None:
            remote.remove_shard(name)
    for relative in relatives:
        remove(out, relative)
        if remote is not None:
            remote.remove(relative)


@dataclass
class ShardRun:
    """What an engine's run takes: the shards still to do, and everything that fixes their bytes and records."""

    pending: list[ShardSource]
    names: list[str]  # every shard of the job, for the totals in the stats
    out_dir: Path
    runner: Backend
    prep: Preprocess
    identity: dict
    projection: np.ndarray | None  # [pca + 1, D] with --pca
    options: EmbedOptions
    summary: JobSummary
    publish: Callable[[str], None] | None = None  # a remote OUT_DIR: upload a committed shard


def claimed_shards(run: ShardRun, claims: Claims, stop: threading.Event) -> Iterator[ShardSource]:
    """Claim stage: each pending shard this process wins, in order, with whatever an earlier try left removed."""
    is_mine = partial(is_done, run.out_dir, identity=run.identity)
    for source in claims.each(run.pending, lambda s: s.name, lambda s: is_mine(s.name), stop):
        remove_leftovers(run.out_dir, source.name, claims.owner)
        remove_shard_files(run.out_dir, source.name)  # not done with this identity: its files in any layout go
        yield source


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
        self.dim = run.runner.info.embed_dim if run.projection is None else run.options.pca
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
        }
        self.run_info = {
            "rank": self.summary.rank, "world_size": self.summary.world_size, "backend": runner.name, "precision": runner.precision
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
        if self.run.projection is not None:
            matrix = self.run.projection
            grid, pooled = project(matrix, grid), None if pooled is None else project(matrix, pooled)
        for i, key in enumerate(keys):
            if records[i] is None:
                out.fail(key, "the model gave non-finite values (NaN or inf) for this image")
            else:
                layers = {"layers": {k: v[i] for k, v in result.layers.items()}} if result.layers else {}
                out.add(key, grid[i], records[i], None if pooled is None else pooled[i], carried[i], **layers)

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


def _run(run: ShardRun) -> None:
    """The local engine over the shards still to do: reader thread, batches here, writer thread."""
    options, summary, runner, out_dir = run.options, run.summary, run.runner, run.out_dir
    workers = max(1, (os.cpu_count() or 2) // 2) if options.workers is None else options.workers
    # forks its workers first: no other thread of ours may run yet
    decoder = Decoder(workers, run.prep, leave_jpeg=options.decode == "gpu")
    device_decoder = None
    if options.decode == "gpu":
        from dmt_jepa.serve.device_decode import DeviceDecoder

        device_decoder = DeviceDecoder(runner.device, run.prep, decoder.decode_alone)
    claims = Claims(out_dir, owner_token(), options.lease_seconds)
    budget = _ByteBudget(options.max_queued_bytes)
    samples: queue.Queue = queue.Queue(maxsize=2 * options.batch_size + 2 * workers)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_shards,
        args=(claimed_shards(run, claims, stop), options.max_carried_bytes, decoder, budget, samples, stop),
        name="embed-reader",
        daemon=True,
    )
    writer = _Writer(depth=4)
    writing = ShardWriting(run, claims)
    bar = Progress(options.progress, options.progress_every, len(run.pending))
    batch: list[tuple[str, np.ndarray, dict, dict]] = []

    def decode_left(out: ShardOutput) -> None:
        """`--decode gpu`: the batch's JPEGs decoded on the device; one that cannot be decoded at all fails alone."""
        left = [i for i, (_, array, _, _) in enumerate(batch) if isinstance(array, EncodedJpeg)]
        failed = set()
        for i, pixels in zip(left, device_decoder([batch[i][1] for i in left]), strict=True):
            key, _, record, carried = batch[i]
            if isinstance(pixels, ImageRejected):
                writer.submit(partial(out.fail, key, str(pixels)))
                summary.failed += 1
                failed.add(i)
            else:
                batch[i] = (key, pixels, record, carried)
        batch[:] = [sample for i, sample in enumerate(batch) if i not in failed]

    def flush(out: ShardOutput) -> None:
        """Batch stage: the samples gathered so far (one shard's) through the model, then to the writer."""
        if device_decoder is not None:
            decode_left(out)
        if not batch:
            return
        keys, arrays, records, carried = (list(column) for column in zip(*batch, strict=True))
        first = summary.embedded == 0 and summary.worst_patch_cosine is None
        result = embed_batch(runner, np.stack(arrays), check=first)  # uint8 [B, H, W, 3] in
        writing.count(result, records)
        writer.submit(partial(writing.write, out, keys, records, carried, result))
        batch.clear()
        bar.update(summary.embedded, summary.failed)

    reader.start()
    writer.start()
    try:
        for item in iter(samples.get, None):
            if isinstance(item, _ReaderFailed):
                raise item.error
            out = writing.output(item.shard)
            if isinstance(item, _Decoding):
                try:
                    array, record = decoder.result(item.task, item.data)
                except ImageRejected as err:
                    writer.submit(partial(out.fail, item.key, str(err)))
                    summary.failed += 1
                    continue
                finally:
                    budget.release(len(item.data) + sum(map(len, item.carried.values())))
                if item.not_carried:
                    record = {**record, "not_carried": item.not_carried}
                batch.append((item.key, array, record, item.carried))
                if len(batch) == options.batch_size:
                    flush(out)
            else:
                flush(out)
                writer.submit(partial(writing.finish, item.shard, writing.end(item), item.missing))
                bar.shard_done()
        writer.close()
        if writer.error is not None:
            raise writer.error
        bar.finish()
    finally:
        stop.set()
        reader.join(timeout=10)
        decoder.close()
        if writer.is_alive():
            writer.close()
        writing.close()
        claims.close()
        bar.close()
