"""What a running job shows on stderr: a bar on a terminal, else one plain line every N seconds.

Plain lines are for batch schedulers (srun, sbatch, Kubernetes), whose logs take no cursor moves:
each line stands alone, with images, rate, shards done of this process's total, failures and an
ETA from the shard rate so far.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Does nothing when neither the bar nor lines are asked for."""

    def __init__(self, bar: bool, every: float, total: int):
        self.bar = None
        self.every, self.total = every, total
        self.started = self.last_line = time.perf_counter()
        self.images = self.failed = self.shards = 0
        if not bar:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(
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

    def _rate(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def update(self, images: int, failed: int) -> None:
        self.images, self.failed = images, failed
        if self.bar is not None:
            self.bar.update(self.task, images=images, rate=self._rate())
        self._maybe_line()

    def shard_done(self) -> None:
        self.shards += 1
        if self.bar is not None:
            self.bar.advance(self.task)
        self._maybe_line()

    def _maybe_line(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.bar is not None or self.every <= 0 or (not force and now - self.last_line < self.every):
            return
        self.last_line = now
        elapsed = now - self.started
        if self.shards:
            left = elapsed / self.shards * (self.total - self.shards)
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days"
        else:
            eta = "unknown"
        print(
            f"embed: {self.images} images, {self._rate():.1f} images/s, shards {self.shards}/{self.total}, "
            f"{self.failed} failed, elapsed {elapsed:.0f} s, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        """The last line, on success only: after a failure the error is the one thing to read."""
        self._maybe_line(force=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
