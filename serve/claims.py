"""Shard claims: any number of processes, on one machine or many sharing a filesystem, split one OUT_DIR.

A process works on shard NAME only while it holds OUT/.NAME.claim, which it creates exclusively
(O_CREAT | O_EXCL: atomic on local filesystems and NFS v3 and later). While it holds claims, a
thread refreshes their modification times every lease / 4 seconds: the heartbeat. Another process
that sees a claim unchanged for a whole lease, timed on its own monotonic clock (so that the
clocks of different machines never need to agree), takes it over: holding OUT/.NAME.claim.takeover,
itself created exclusively, it checks the claim is still the one it watched and replaces it with
its own. A claim whose holder ran on the same machine and no longer exists is taken over at once,
so that a rerun after a crash does not wait a lease. The claim is removed once the shard is
committed, or given back when it is not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from dmt_jepa.serve.safe_read import FileRefused, read_json

DEFAULT_LEASE_SECONDS = 60.0
T = TypeVar("T")


def owner_token() -> str:
    """A token unique to this process among all machines: host, pid and random bits (no dots)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a claim is refreshed or replaced; None where there is no claim."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


class Claims:
    """The claims this process holds in one OUT_DIR, with their heartbeat."""

    def __init__(self, out_dir: Path, owner: str, lease: float = DEFAULT_LEASE_SECONDS):
        assert lease > 0
        self.out_dir, self.owner, self.lease = out_dir, owner, lease
        self.held: set[str] = set()
        self._watched: dict[Path, tuple[tuple[int, int, int], float]] = {}  # claim -> (signature, first seen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        self._beat.start()

    def _path(self, name: str) -> Path:
        return self.out_dir / f".{name}.claim"

    def _content(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def _holder(self, name: str) -> dict:
        try:  # a claim file is small; anything else (a FIFO, a link out, a huge file) holds nothing usable
            holder = read_json(self.out_dir, f".{name}.claim", max_bytes=4096)
        except (OSError, FileRefused):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _owner_of(self, name: str) -> str | None:
        return self._holder(name).get("owner")

    def _holder_is_gone(self, name: str) -> bool:
        """The holder ran on this machine and its process no longer exists: no need to wait a lease."""
        holder = self._holder(name)
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by another user
            return False
        return False

    def try_claim(self, name: str) -> bool:
        """Claim shard NAME if nobody holds it, or if its holder stopped beating for a lease."""
        path = self._path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return self._take_over_if_stale(path, name)
        with os.fdopen(fd, "wb") as f:
            f.write(self._content())
        with self._lock:
            self.held.add(name)
        return True

    def _stale(self, path: Path, name: str | None = None) -> tuple[int, int, int] | None:
        """The claim's signature if it has not changed for a lease since this process first saw it,
        or at once if its holder was a process of this machine that is gone (killed, crashed)."""
        signature, now = _signature(path), time.monotonic()
        if signature is None:
            self._watched.pop(path, None)
            return None
        if name is not None and self._holder_is_gone(name):
            return signature
        seen = self._watched.get(path)
        if seen is None or seen[0] != signature:
            self._watched[path] = (signature, now)
            return None
        return signature if now - seen[1] >= self.lease else None

    def _take_over_if_stale(self, path: Path, name: str) -> bool:
        signature = self._stale(path, name)
        if signature is None:
            return False
        lock = path.with_name(path.name + ".takeover")
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            if self._stale(lock) is not None:  # a process died in the middle of a takeover
                lock.unlink(missing_ok=True)
            return False
        try:
            if _signature(path) != signature:
                return False
            aside = path.with_name(f"{path.name}.{self.owner}")
            aside.write_bytes(self._content())
            os.replace(aside, path)
            self._watched.pop(path, None)
            with self._lock:
                self.held.add(name)
            return True
        finally:
            lock.unlink(missing_ok=True)

    def owns(self, name: str) -> bool:
        """Whether this process still holds NAME (no one took it over after a pause longer than the lease)."""
        return name in self.held and self._owner_of(name) == self.owner

    def release(self, name: str) -> None:
        """Give NAME back: the claim file goes, if it is still this process's."""
        with self._lock:
            self.held.discard(name)
        if self._owner_of(name) == self.owner:
            self._path(name).unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            with self._lock:
                names = list(self.held)
            for name in names:
                if self._owner_of(name) != self.owner:
                    with self._lock:
                        self.held.discard(name)  # taken over: commit() will see it is no longer ours
                    continue
                try:
                    os.utime(self._path(name))
                except OSError:
                    pass  # gone or unreachable for a moment; the next beat tries again

    def each(
        self, items: Sequence[T], name_of: Callable[[T], str], done: Callable[[T], bool], stop: threading.Event
    ) -> Iterator[T]:
        """Claim and yield the items not done, until each is done or was yielded here once.

        Items others hold are revisited every lease / 4 seconds (at most 1 s), so that one whose
        holder dies is taken over; a yielded item is never yielded again, whatever became of it.
        """
        remaining = list(items)
        while remaining and not stop.is_set():
            waiting = []
            for item in remaining:
                if stop.is_set():
                    return
                if done(item):
                    continue
                if not self.try_claim(name_of(item)):
                    waiting.append(item)
                elif done(item):  # finished by another process between the check and the claim
                    self.release(name_of(item))
                else:
                    yield item
            remaining = waiting
            if remaining:
                stop.wait(min(self.lease / 4, 1.0))

    def close(self) -> None:
        """Stop beating and give back every claim still held."""
        self._stop.set()
        self._beat.join(timeout=5)
        with self._lock:
            names = list(self.held)
        for name in names:
            self.release(name)
