"""The local engine's loop: a reader thread, batches in this thread, a writer thread.

  reader thread   claimed shards -> samples -> decode tasks for worker processes (serve/job/read.py)
  this thread     decoded images -> batches -> backend (batches never span two shards)
  writer thread   embeddings -> OUT/.NAME.tar.OWNER.partial -> OUT/NAME.tar, then OUT/NAME.json last
The Ray engine (serve/ray_engine.py) runs the same stages on a cluster with the same writer.
"""

from __future__ import annotations

import os
import queue
import threading
from functools import partial

import numpy as np

from dmt_jepa.serve.claims import Claims, owner_token
from dmt_jepa.serve.decode import Decoder
from dmt_jepa.serve.images import EncodedJpeg, ImageRejected
from dmt_jepa.serve.job.options import ShardRun
from dmt_jepa.serve.job.read import Decoding, ReaderFailed, _ByteBudget, claimed_shards, reader_thread
from dmt_jepa.serve.job.write import ShardWriting, WriterThread, embed_batch
from dmt_jepa.serve.progress import Progress
from dmt_jepa.serve.shards import ShardOutput


def run_local(run: ShardRun) -> None:
    """The local engine over the shards still to do: reader thread, batches here, writer thread."""
    options, summary, runner, out_dir = run.options, run.summary, run.runner, run.out_dir
    workers = max(1, (os.cpu_count() or 2) // 2) if options.workers is None else options.workers
    # forks its workers first: no other thread of ours may run yet
    decoder = Decoder(workers, run.prep, leave_jpeg=options.decode == "gpu")
    device_decoder = None
    if options.decode == "gpu":
        from dmt_jepa.serve.backends.torch_backend import TorchBackend
        from dmt_jepa.serve.device_decode import DeviceDecoder

        assert isinstance(runner, TorchBackend)  # embed_shards refuses --decode gpu on any other backend
        device_decoder = DeviceDecoder(runner.device, run.prep, decoder.decode_alone)
    claims = Claims(out_dir, owner_token(), options.lease_seconds)
    budget = _ByteBudget(options.max_queued_bytes)
    samples: queue.Queue = queue.Queue(maxsize=2 * options.batch_size + 2 * workers)
    stop = threading.Event()
    reader = threading.Thread(
        target=reader_thread,
        args=(claimed_shards(run, claims, stop), options.max_carried_bytes, decoder, budget, samples, stop),
        name="embed-reader",
        daemon=True,
    )
    writer = WriterThread(depth=4)
    writing = ShardWriting(run, claims)
    bar = Progress(options.progress, options.progress_every, len(run.pending))
    batch: list[tuple[str, np.ndarray | EncodedJpeg, dict, dict]] = []  # EncodedJpeg: --decode gpu's, until decode_left

    def decode_left(out: ShardOutput) -> None:
        """`--decode gpu`: the batch's JPEGs decoded on the device; one that cannot be decoded at all fails alone."""
        assert device_decoder is not None
        left = [(i, array) for i, (_, array, _, _) in enumerate(batch) if isinstance(array, EncodedJpeg)]
        failed = set()
        for (i, _), pixels in zip(left, device_decoder([jpeg for _, jpeg in left]), strict=True):
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
            if isinstance(item, ReaderFailed):
                raise item.error
            out = writing.output(item.shard)
            if isinstance(item, Decoding):
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
