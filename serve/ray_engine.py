"""The embedding job on a Ray cluster: CPU decode and model inference scaled apart, the same files as the local engine.

  driver        claims shards and reads them with the damage-tolerant reader -> chunks of encoded images
  decode tasks  a chunk -> the pixels of its usable images (one object-store object) and a record per sample
  driver        usable images -> batches of object-store slices, never across shards, as the local engine cuts them
  model actors  a batch -> embeddings; each actor loads the model once (on a GPU of its own with gpus_per_worker)
  driver        writes and commits each shard with serve.job.write's ShardWriting, NAME.json last
The invariant: results come back in the order they were asked for, so each batch holds the same
images as in the local engine and the bytes written are the same. Back-pressure follows from it:
the driver keeps at most 2 chunks per decode worker being decoded and 2 batches per model actor
waiting, and reads no further until the oldest comes back, so decoded pixels in the object store
stay bounded whichever stage is slow. Ray runs a decode task again when its worker dies, and
restarts a model actor whose process dies and runs its unfinished batches again; a chunk that keeps
killing its workers is decoded image by image, so that only the image that crashes becomes a failure.

No wait on Ray is open-ended: an --address that does not answer, model actors the cluster cannot
place (more than its CPUs, a GPU it does not have), a model that does not load, or a result that
does not come back each end in one EngineError sentence naming what is missing, after the
deadlines below. A local instance that cannot hold the actors is refused before any is made.
The actors' CPUs and GPUs are reserved as one placement group first, so that a cluster short of
them is told apart from a model that is slow to load. A local Ray this driver starts is watched
by a small process of its own, which kills what Ray left behind should the driver die (kill -9):
Ray stops most of its processes with their parent, not all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
from dmt_jepa.serve.job.options import EmbedOptions, EngineError, ShardRun
from dmt_jepa.serve.job.read import ReadSample, ShardEnd, claimed_shards, read_shard
from dmt_jepa.serve.job.write import Embedded, ShardWriting, embed_batch
from dmt_jepa.serve.progress import Progress

TASK_RETRIES = 3  # a decode task, or a model actor's process, lost this many times in a row fails the job
CONNECT_SECONDS = 10  # for an --address to answer at all
PLACEMENT_SECONDS = 60  # for the cluster to reserve the model actors' CPUs and GPUs
LOAD_SECONDS = 600  # for the placed actors to load the model (a busy machine took minutes to import torch)
RESULT_SECONDS = 600  # for one decode task or one model batch to come back
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
            "name": r.name,
            "precision": r.precision,
            "info": r.info,
            "model_path": r.model_path,
            "model_sha256": r.model_sha256,
            "notices": tuple(r.notices),
            "layers": tuple(r.layers),
            "describe": r.describe(),
            "pid": os.getpid(),
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
        return wait_for(self._ray, self._actor.run.remote(images), RESULT_SECONDS, "a batch from a model actor")

    def check_size(self, size: tuple[int, int]) -> None:
        problem = wait_for(self._ray, self._actor.check_size.remote(size), RESULT_SECONDS, "a model actor's size check")
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


def _probe(address: str) -> None:
    """EngineError where a HOST:PORT (or ray://HOST:PORT) --address does not accept a connection within CONNECT_SECONDS;
    Ray itself retries such an address for minutes, silently."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto` and other forms Ray resolves itself, at once
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise EngineError(
            f"the Ray cluster at {address} does not answer ({err.strerror or err}, within {CONNECT_SECONDS} s); "
            "check --address and that the cluster is up (`ray status` on its head node)."
        ) from err


def _connect(ray, address: str | None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a job never reports usage unless its user asks
    # Ray runs its workers at niceness 15 to keep its own daemons responsive; here the workers are the
    # job, and on a busy machine at 15 they starve (a model actor took minutes to import torch).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address is not None:
        _probe(address)
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
    watchdog = None
    if started:
        watchdog = _watch_driver() if options.address is None else None
        try:
            _connect(ray, options.address)
        except BaseException:
            _stop_watching(watchdog)
            raise
    actors: list = []
    group = None
    try:
        if started and options.address is None:
            _check_local_resources(ray, options)
        group = _reserve(ray, options)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker = ray.remote(ModelWorker).options(
            num_cpus=1,
            num_gpus=options.gpus_per_worker,  # Ray sets CUDA_VISIBLE_DEVICES, so `auto` picks the GPU it was given
            max_restarts=TASK_RETRIES,
            max_task_retries=TASK_RETRIES,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group),
        )
        actors = [
            worker.remote(str(path), options.backend, options.precision, options.layers) for _ in range(options.model_workers)
        ]
        facts = wait_for(ray, [actor.facts.remote() for actor in actors], LOAD_SECONDS, "the model actors to load the model")
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
        if group is not None:
            ray.util.remove_placement_group(group)
        if started:
            ray.shutdown()
            _stop_watching(watchdog)


def _needs(options: EmbedOptions) -> str:
    gpus = options.gpus_per_worker * options.model_workers
    return f"{options.model_workers + 1} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")


def _check_local_resources(ray, options: EmbedOptions) -> None:
    """A local instance cannot grow: refuse at once what it cannot hold (each actor holds a CPU for the whole
    job, and the decode tasks need at least one more)."""
    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), have.get("GPU", 0)
    if options.model_workers + 1 > cpus or options.gpus_per_worker * options.model_workers > gpus:
        raise EngineError(
            f"--model-workers {options.model_workers} with --gpus-per-worker {options.gpus_per_worker:g} needs "
            f"{_needs(options)} (one CPU per model worker and one to decode), and this machine's Ray has {cpus} CPUs "
            f"and {gpus:g} GPUs; lower --model-workers or --gpus-per-worker, or join a larger cluster with --address."
        )


def _reserve(ray, options: EmbedOptions):
    """A placement group holding each model actor's CPU and GPUs, ready; EngineError naming what the cluster
    lacks where it is not ready within PLACEMENT_SECONDS."""
    bundle = {"CPU": 1, **({"GPU": options.gpus_per_worker} if options.gpus_per_worker else {})}
    group = ray.util.placement_group([bundle] * options.model_workers)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_SECONDS)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        have = ray.cluster_resources()
        raise EngineError(
            f"the Ray cluster could not place {options.model_workers} model workers within {PLACEMENT_SECONDS} s: "
            f"the job needs {_needs(options)}, the cluster has {int(have.get('CPU', 0))} CPUs and "
            f"{have.get('GPU', 0):g} GPUs in all; lower --model-workers or --gpus-per-worker, or add nodes."
        ) from None
    return group


def wait_for(ray, refs, seconds: float, what: str):
    """ray.get(refs) within `seconds`; EngineError naming `what` did not come back, and the cluster's free share."""
    try:
        return ray.get(refs, timeout=seconds)
    except ray.exceptions.GetTimeoutError:
        free = ray.available_resources()
        raise EngineError(
            f"waited {seconds:g} s for {what} in vain (the Ray cluster has {int(free.get('CPU', 0))} CPUs and "
            f"{free.get('GPU', 0):g} GPUs free); check its nodes with `ray status`, then rerun: finished shards are kept."
        ) from None


# The watchdog: polls the driver's descendants that are Ray's, and kills them where the driver dies
# without saying goodbye (stdin ends without a byte). A pid is killed only with the start time it had.
_WATCHDOG = r"""
import os, select, signal, sys
driver, me = int(sys.argv[1]), os.getpid()
def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()
def ray_descendants():
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents.setdefault(int(stat(name)[1]), []).append(int(name))
            except (OSError, IndexError):
                pass
    found, todo = {}, [driver]
    while todo:
        for child in parents.get(todo.pop(), []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    line = f.read()
                if child != me and (line.startswith(b"ray::") or b"/ray/" in line):
                    found[child] = stat(child)[19]
            except (OSError, IndexError):
                pass
    return found
seen = {}
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if ready:
        said = os.read(sys.stdin.fileno(), 1)
        if said:
            sys.exit(0)
        break
    seen.update(ray_descendants())
for pid, started in seen.items():
    try:
        if stat(pid)[19] == started:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""


def _watch_driver() -> subprocess.Popen | None:
    """The watchdog over the Ray this driver is about to start (Linux: it reads /proc); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.PIPE, start_new_session=True)


def _stop_watching(watchdog: subprocess.Popen | None) -> None:
    """Ray was shut down in order: the watchdog leaves without killing anything."""
    if watchdog is not None:
        try:
            watchdog.stdin.write(b"x")
            watchdog.stdin.close()
        except OSError:
            pass
        watchdog.wait(timeout=10)


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
    """The Ray engine's pipeline over the shards still to do (serve.job.loop.run_local's counterpart)."""

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
            records = wait_for(self.ray, meta, RESULT_SECONDS, "a decode task")
            return [(record, pixels) for record in records]
        except self.ray.exceptions.WorkerCrashedError:
            pass
        alone = self.decode.options(max_retries=0)
        parts = []
        for data in datas:
            one_meta, one_pixels = alone.remote([data], prep)
            try:
                parts.append((wait_for(self.ray, one_meta, RESULT_SECONDS, "a decode task")[0], one_pixels))
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
            made = _Batch(
                images[0].source,
                [i.key for i in images],
                [i.record for i in images],
                [i.carried for i in images],
                [tuple(s) for s in spans],
                chunks,
            )
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
            return wait_for(self.ray, ref, RESULT_SECONDS, "a batch from a model actor")
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
