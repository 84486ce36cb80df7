"""Decode worker processes for the embedding job, robust to a worker that dies mid-image; and the
Ray engine's decode task, here so that its workers import no torch."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection

import numpy as np

from dmt_jepa.serve.images import ImageRejected, Preprocess, prepare, prepare_leaving_jpeg

# fork, not spawn/forkserver: those re-import the caller's __main__, which breaks unguarded scripts.
# Workers never touch torch, whose thread pools do not survive a fork.
_FORK = multiprocessing.get_context("fork")


def _exit_with_parent(parent: int) -> None:
    """Worker initialiser: leave when the job process is gone, even if it was killed with SIGKILL."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _decode_into(conn: Connection, data: bytes, prep: Preprocess, function=prepare) -> None:
    try:
        conn.send(function(data, prep))
    except ImageRejected as err:
        conn.send(err)


def finished(result: tuple[np.ndarray, dict] | None = None, error: Exception | None = None) -> Future:
    """A Future that is already done."""
    done: Future = Future()
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
    return done


class Decoder:
    """`prepare` in `workers` processes (0: in the calling thread).

    A worker that dies (a crash inside an image library, not an exception) breaks the pool: the
    pool is replaced, and each sample it held is decoded again alone in a throwaway process, so
    that only the sample that really crashes becomes a failure. With `leave_jpeg` (`embed --decode
    gpu`), RGB and grayscale JPEGs are only checked and come back encoded, for the device.
    """

    def __init__(self, workers: int, prep: Preprocess, *, leave_jpeg: bool = False):
        self.workers, self.prep = workers, prep
        self._prepare = prepare_leaving_jpeg if leave_jpeg else prepare
        self._lock = threading.Lock()
        self._pool = self._new_pool() if workers > 0 else None

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=_FORK, initializer=_exit_with_parent, initargs=(os.getpid(),)
        )
        pool.submit(int).result()  # forks every worker now, before the job starts its threads
        return pool

    def submit(self, data: bytes) -> Future:
        """Start decoding one image; the Future holds (pixels, record) or raises ImageRejected."""
        if self._pool is None:
            try:
                return finished(self._prepare(data, self.prep))
            except ImageRejected as err:
                return finished(error=err)
        with self._lock:
            try:
                return self._pool.submit(self._prepare, data, self.prep)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(self._prepare, data, self.prep)

    def result(self, task: Future, data: bytes) -> tuple[np.ndarray, dict]:
        """The decoded image, re-decoding alone if its worker died; ImageRejected if it cannot be used."""
        try:
            return task.result()
        except BrokenProcessPool:
            return self._isolated(data, self._prepare)

    def decode_alone(self, data: bytes) -> tuple[np.ndarray, dict]:
        """The CPU path's decode of one image in a throwaway process (a JPEG the device refused)."""
        return self._isolated(data, prepare)

    def _isolated(self, data: bytes, function) -> tuple[np.ndarray, dict]:
        receive, send = _FORK.Pipe(duplex=False)
        process = _FORK.Process(target=_decode_into, args=(send, data, self.prep, function), daemon=True)
        process.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:
            process.join()
            raise ImageRejected(f"the image crashed the decoder process (exit code {process.exitcode})") from None
        process.join()
        if isinstance(result, ImageRejected):
            raise result
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def decode_chunk(datas: list[bytes], prep: Preprocess) -> tuple[list[dict | str], np.ndarray]:
    """The Ray engine's decode task: per image its record, or why it was rejected; and uint8
    [n, H, W, 3] of the n usable ones."""
    meta: list[dict | str] = []
    pixels: list[np.ndarray] = []
    for data in datas:
        try:
            array, record = prepare(data, prep)
        except ImageRejected as err:
            meta.append(str(err))
            continue
        meta.append(record)
        pixels.append(array)
    return meta, np.stack(pixels) if pixels else np.zeros((0, *prep.size, 3), np.uint8)
