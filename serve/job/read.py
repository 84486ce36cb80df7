"""The read side: claimed shards -> samples -> decode tasks, in a thread of its own.

  claimed_shards   each pending shard this process wins, with an earlier try's leftovers removed
  read_shard       one shard's samples in order (encoded image and carried members), then its end
  reader_thread    a Decoding per sample into a bounded queue, a ShardEnd per shard, then None
The queue is bounded in count and `_ByteBudget` bounds the encoded bytes in it, so memory grows
neither with shard size nor with image size.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from typing import NamedTuple

from dmt_jepa.serve.claims import Claims
from dmt_jepa.serve.decode import Decoder, finished
from dmt_jepa.serve.images import ImageRejected
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.job.options import ShardRun
from dmt_jepa.serve.shards import ShardReader, is_done, open_source, remove_leftovers, remove_shard_files


def claimed_shards(run: ShardRun, claims: Claims, stop: threading.Event) -> Iterator[ShardSource]:
    """Claim stage: each pending shard this process wins, in order, with whatever an earlier try left removed."""
    is_mine = partial(is_done, run.out_dir, identity=run.identity)
    for source in claims.each(run.pending, lambda s: s.name, lambda s: is_mine(s.name), stop):
        remove_leftovers(run.out_dir, source.name, claims.owner)
        remove_shard_files(run.out_dir, source.name)  # not done with this identity: its files in any layout go
        yield source


class Decoding(NamedTuple):
    """One input sample on its way from the reader thread to the batcher."""

    shard: ShardSource
    key: str
    task: Future  # (pixels, record), or raises ImageRejected
    data: bytes  # the encoded image, kept to decode it again if its worker dies
    carried: dict[str, bytes]  # the sample's non-image members, copied to its output
    not_carried: list[str]  # extensions of members neither embedded nor carried, as written (MemberNames.listed)


class ShardEnd(NamedTuple):
    shard: ShardSource
    cut: str | None  # why the shard ended early, if it did
    missing: str | None  # why the shard could not be read at all (then it is not done)


class ReaderFailed(NamedTuple):
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
    not_carried: list[str]  # extensions of members neither embedded nor carried, as written (MemberNames.listed)
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
                    yield ReadSample(sample.key, sample.image()[1], carried, sample.not_carried.listed(), None)
                except ImageRejected as err:
                    yield ReadSample(sample.key, b"", {}, sample.not_carried.listed(), err)
        cut = reader.cut
    except (OSError, EOFError, zlib.error) as err:  # a stream that fails where the reader cannot see it
        cut = f"cannot read the shard ({err}); the samples before the error were kept"
    if reader.offset == 0:  # a pipe whose command failed reads as empty, as does a missing object
        missing = f"cannot read {source.url} ({cut})"
    yield ShardEnd(source, cut, missing)


def reader_thread(
    shards: Iterator[ShardSource],
    max_carried_bytes: int,
    decoder: Decoder,
    budget: _ByteBudget,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Reader thread: a Decoding per sample and a ShardEnd per shard, in claim order, then None."""
    try:
        for source in shards:
            for item in read_shard(source, max_carried_bytes):
                if isinstance(item, ReadSample):
                    if item.rejected is None:
                        budget.acquire(len(item.data) + sum(map(len, item.carried.values())), stop)
                        task = decoder.submit(item.data)
                    else:
                        task = finished(error=item.rejected)
                    _put(out, Decoding(source, item.key, task, item.data, item.carried, item.not_carried), stop)
                else:
                    _put(out, item, stop)
        _put(out, None, stop)
    except _Stopped:
        return
    except BaseException as err:  # a bug: hand it to the main thread rather than dying silently
        out.put(ReaderFailed(err))
