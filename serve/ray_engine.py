"""The embedding job on a Ray cluster: CPU decode and model inference scaled apart, the same files as the local engine.

  driver        claims shards and reads them with the damage-tolerant reader -> chunks of encoded images
  decode tasks  a chunk -> the pixels of its usable images (one object-store object) and a record per sample
  driver        usable images -> batches of object-store slices, never across shards, as the local engine cuts them
  model actors  a batch -> embeddings; each actor loads the model once (on a GPU of its own with gpus_per_worker)
  driver        writes and commits each shard with serve.job's ShardWriting, NAME.json last
The invariant: results come back in the order they were asked for, so each batch holds the same
images as in the local engine and the bytes written are the same. Back-pressure follows from it:
the driver keeps at most 2 chunks per decode worker being decoded and 2 batches per model actor
waiting, and reads no further until the oldest comes back, so decoded pixels in the object store
stay bounded whichever stage is slow. Ray runs a decode task again when its worker dies, and
restarts a model actor whose process dies and runs its unfinished batches again; a chunk that keeps
killing its workers is decoded image by image, so that only the image that crashes becomes a failure.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dmt_jepa.serve.backends import Backend, BackendError, load_backend
from dmt_jepa.serve.claims import Claims, owner_token
from dmt_jepa.serve.decode import decode_chunk
from dmt_jepa.serve.images import Preprocess
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.job import (
    Embedded,
    EmbedOptions,
    EngineError,
    ReadSample,
    ShardEnd,
    ShardRun,
    ShardWriting,
    claimed_shards,
    embed_batch,
    read_shard,
)
from dmt_jepa.serve.progress import Progress

TASK_RETRIES = 3  # a decode task, or a model actor's process, lost this many times in a row fails the job
MODEL_ACTOR = "ModelWorker"  # the actors' class name, which Ray also shows in their process titles


def import_ray():
    """The ray module, or EngineError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise EngineError(
            "--engine ray needs Ray, which is not installed here; install it with pip install 'dmt-jepa[ray]', "
            "or use --engine local."
        ) from err
    return ray


class ModelWorker:
    """Model actor: loads the model once; embeds batches given as slices of decoded chunks."""

    def __init__(self, model: str, backend: str, precision: str | None, layers: tuple[int, ...] | None):
        self.runner: Backend | None = None
        self.error: str | None = None
        self.checked = False
        try:
            self.runner = load_backend(model, backend, precision, layers)
        except (BackendError, ValueError, OSError) as err:  # reported by the driver in one sentence
            self.error = str(err)

    def facts(self) -> dict | str:
        """What the driver needs to know of the model here, or the sentence saying why it did not load."""
        if self.runner is None:
            return self.error or "the model did not load"
        r = self.runner
        return {
            "name": r.name, "precision": r.precision, "info": r.info, "model_path": r.model_path,
            "model_sha256": r.model_sha256, "notices": tuple(r.notices), "layers": tuple(r.layers),
            "describe": r.describe(), "pid": os.getpid(),
        }

    def check_size(self, size: tuple[int, int]) -> str | None:
        try:
            self.runner.check_size(size)
        except BackendError as err:
            return str(err)
        return None

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.runner.run(images)

    def embed(self, spans: list[tuple[int, int, int]], *chunks: np.ndarray) -> Embedded:
        """spans: (chunk, start, stop) in order -> one batch; an actor checks its first batch against fp32."""
        parts = [chunks[c][start:stop] for c, start, stop in spans]
        pixels = np.concatenate(parts)  # uint8 [B, H, W, 3], writable (object-store arrays are read-only)
        result = embed_batch(self.runner, pixels, check=not self.checked)
        self.checked = True
        return result


class ActorBackend(Backend):
    """The driver's view of the model actors: what they run, and `run` on one of them (the PCA fit)."""

    def __init__(self, facts: dict, actor, ray):
        self.name, self.precision, self.info = facts["name"], facts["precision"], facts["info"]
        self.model_path, self.model_sha256 = facts["model_path"], facts["model_sha256"]
        self.notices, self.layers, self._describe = facts["notices"], facts["layers"], facts["describe"]
        self._actor, self._ray = actor, ray

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._ray.get(self._actor.run.remote(images))

    def check_size(self, size: tuple[int, int]) -> None:
        problem = self._ray.get(self._actor.check_size.remote(size))
        if problem is not None:
            raise BackendError(problem)

    def describe(self) -> dict:
        return self._describe


def _same_model(facts: list[dict]) -> None:
    keys = ("name", "precision", "model_sha256", "layers")
    for other in facts[1:]:
        if any(other[k] != facts[0][k] for k in keys):
            raise BackendError(
                f"the model actors run the model differently ({facts[0]['name']} {facts[0]['precision']} and "
                f"{other['name']} {other['precision']}); pass --backend and --precision so that every worker runs it alike."
            )


def _connect(ray, address: str | None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a job never reports usage unless its user asks
    # Ray runs its workers at niceness 15 to keep its own daemons responsive; here the workers are the
    # job, and on a busy machine at 15 they starve (a model actor took minutes to import torch).
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise EngineError(
            f"cannot start or join the Ray cluster{'' if address is None else ' at ' + address} ({err}); "
            "check --address (auto: the cluster `ray start --head` began on this machine)."
        ) from err


@contextmanager
def session(model, options: EmbedOptions) -> Iterator[tuple[Backend, Callable[[ShardRun], None]]]:
    """Join (or start) Ray and the model actors; yields the driver's Backend and the engine's run function.

    A Ray instance this call started is shut down at the end; one already running is left as it was.
    """
    ray = import_ray()
    if isinstance(model, Backend):
        raise EngineError("--engine ray loads the model in its actors from a model file; pass the file's path.")
    path = Path(model).resolve()
    started = not ray.is_initialized()
    if started:
        _connect(ray, options.address)
    actors: list = []
    try:
        worker = ray.remote(ModelWorker).options(
            num_cpus=1,
            num_gpus=options.gpus_per_worker,  # Ray sets CUDA_VISIBLE_DEVICES, so `auto` picks the GPU it was given
            max_restarts=TASK_RETRIES,
            max_task_retries=TASK_RETRIES,
        )
        actors = [
            worker.remote(str(path), options.backend, options.precision, options.layers)
            for _ in range(options.model_workers)
        ]
        facts = ray.get([actor.facts.remote() for actor in actors])
        for fact in facts:
            if isinstance(fact, str):
                raise BackendError(fact)
        _same_model(facts)
        decode_workers = options.decode_workers
        if decode_workers is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            decode_workers = max(1, cpus - options.model_workers)
        yield ActorBackend(facts[0], actors[0], ray), _RayRun(ray, actors, decode_workers)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


class _Chunk(NamedTuple):
    """Consecutive samples of one shard, decoded by one task."""

    source: ShardSource
    samples: list[ReadSample]


class _Failure(NamedTuple):
    source: ShardSource
    key: str
    reason: str


class _Image(NamedTuple):
    source: ShardSource
    key: str
    record: dict
    carried: dict[str, bytes]
    pixels: object  # ObjectRef of the chunk's uint8 [n, H, W, 3]
    index: int


class _Batch(NamedTuple):
    """Images of one shard for one model call: `spans` (chunk, start, stop) index into `chunks`."""

    source: ShardSource
    keys: list[str]
    records: list[dict]
    carried: list[dict[str, bytes]]
    spans: list[tuple[int, int, int]]
    chunks: list  # ObjectRefs


def _chunks(shards: Iterable[ShardSource], max_carried_bytes: int, size: int) -> Iterator[_Chunk | ShardEnd]:
    """Read stage (driver): each shard's samples in chunks of `size`, then its ShardEnd."""
    for source in shards:
        chunk: list[ReadSample] = []
        for item in read_shard(source, max_carried_bytes):
            if isinstance(item, ShardEnd):
                if chunk:
                    yield _Chunk(source, chunk)
                yield item
                continue
            chunk.append(item)
            if len(chunk) == size:
                yield _Chunk(source, chunk)
                chunk = []


def in_order(items: Iterable, start: Callable[[object], Callable[[], object]], depth: int) -> Iterator:
    """Start each item's remote work as it comes; yield the results in the items' order, with at most
    `depth` started and not yet yielded (what bounds the memory between two stages)."""
    window: deque[Callable[[], object]] = deque()
    for item in items:
        window.append(start(item))
        if len(window) >= depth:
            yield window.popleft()()
    while window:
        yield window.popleft()()


class _RayRun:
    """The Ray engine's pipeline over the shards still to do (serve.job._run's counterpart)."""

    def __init__(self, ray, actors: list, decode_workers: int):
        self.ray, self.actors, self.decode_workers = ray, actors, decode_workers
        self.decode = ray.remote(decode_chunk).options(num_cpus=1, num_returns=2, max_retries=TASK_RETRIES)
        self._calls = 0

    def _start_decode(self, prep: Preprocess) -> Callable:
        def start(item):
            if not isinstance(item, _Chunk):
                return lambda: [item]
            datas = [s.data for s in item.samples if s.rejected is None]
            if not datas:
                return lambda: self._decoded(item, [])
            meta, pixels = self.decode.remote(datas, prep)
            return lambda: self._decoded(item, self._parts(meta, pixels, datas, prep))

        return start

    def _parts(self, meta, pixels, datas: list[bytes], prep: Preprocess) -> list[tuple[dict | str, object]]:
        """(record or reason, pixels ref, index) per image; a chunk whose worker keeps dying is decoded alone per image."""
        try:
            records = self.ray.get(meta)
            return [(record, pixels) for record in records]
        except self.ray.exceptions.WorkerCrashedError:
            pass
        alone = self.decode.options(max_retries=0)
        parts = []
        for data in datas:
            one_meta, one_pixels = alone.remote([data], prep)
            try:
                parts.append((self.ray.get(one_meta)[0], one_pixels))
            except self.ray.exceptions.WorkerCrashedError:
                parts.append(("the image crashed the decoder process", None))
        return parts

    def _decoded(self, chunk: _Chunk, parts: list) -> list[_Image | _Failure]:
        out: list[_Image | _Failure] = []
        usable = iter(parts)
        counts: dict[int, int] = {}
        for sample in chunk.samples:
            if sample.rejected is not None:
                out.append(_Failure(chunk.source, sample.key, str(sample.rejected)))
                continue
            record, pixels = next(usable)
            if isinstance(record, str):
                out.append(_Failure(chunk.source, sample.key, record))
                continue
            index = counts.get(id(pixels), 0)
            counts[id(pixels)] = index + 1
            if sample.not_carried:
                record = {**record, "not_carried": sample.not_carried}
            out.append(_Image(chunk.source, sample.key, record, sample.carried, pixels, index))
        return out

    @staticmethod
    def _batches(decoded: Iterable[list], size: int) -> Iterator[_Batch | _Failure | ShardEnd]:
        """Batch stage: usable images in order, `size` at a time, never across a shard's end."""
        images: list[_Image] = []

        def batch() -> _Batch:
            chunks: list = []
            spans: list[list[int]] = []
            for image in images:
                if not chunks or chunks[-1] is not image.pixels:
                    chunks.append(image.pixels)
                    spans.append([len(chunks) - 1, image.index, image.index])
                spans[-1][2] = image.index + 1
            made = _Batch(images[0].source, [i.key for i in images], [i.record for i in images],
                          [i.carried for i in images], [tuple(s) for s in spans], chunks)
            images.clear()
            return made

        for items in decoded:
            for item in items:
                if isinstance(item, _Image):
                    images.append(item)
                    if len(images) == size:
                        yield batch()
                    continue
                if isinstance(item, ShardEnd) and images:
                    yield batch()
                yield item

    def _start_model(self, item) -> Callable:
        if not isinstance(item, _Batch):
            return lambda: (item, None)
        actor = self.actors[self._calls % len(self.actors)]
        self._calls += 1
        result = actor.embed.remote(item.spans, *item.chunks)
        return lambda: (item, self._get(result))

    def _get(self, ref):
        """A model result; an error the user can act on (a precision too far from fp32) comes back as itself."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, BackendError):
                raise err.cause from None
            raise

    def __call__(self, run: ShardRun) -> None:
        options, summary = run.options, run.summary
        claims = Claims(run.out_dir, owner_token(), options.lease_seconds)
        stop = threading.Event()
        writing = ShardWriting(run, claims)
        bar = Progress(options.progress, options.progress_every, len(run.pending))
        chunks = _chunks(claimed_shards(run, claims, stop), options.max_carried_bytes, options.batch_size)
        prep = run.prep
        decoded = in_order(chunks, self._start_decode(prep), 2 * self.decode_workers)
        results = in_order(self._batches(decoded, options.batch_size), self._start_model, 2 * len(self.actors))
        try:
            for item, result in results:
                out = writing.output(item.source if not isinstance(item, ShardEnd) else item.shard)
                if isinstance(item, _Batch):
                    records = list(item.records)
                    writing.count(result, records)
                    writing.write(out, item.keys, records, item.carried, result)
                    bar.update(summary.embedded, summary.failed)
                elif isinstance(item, _Failure):
                    out.fail(item.key, item.reason)
                    summary.failed += 1
                else:
                    writing.finish(item.shard, writing.end(item), item.missing)
                    bar.shard_done()
            bar.finish()
        finally:
            stop.set()
            results.close()
            writing.close()
            claims.close()
            bar.close()
