"""What a pretraining run shows while it trains: a live bar on a terminal, plain lines elsewhere.

A pipe or a log file (a scheduler's stdout, `| tee run.log`) cannot redraw a bar, so there the
same figures come as one line every `every_s` seconds, plus the first and the last step:
`step 12/256  loss 0.4321  lr 1.00e-03  38.2 img/s  ETA 0:01:23`. The rate is the mean since the
previous line (a steady figure, not one step's), the ETA the mean step time so far times the
steps left.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """A context manager told after every optimizer step where the run stands."""

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, step: int, *, loss: float, lr: float, images_per_s: float) -> None: ...


class NoProgress:
    """Shows nothing (run.progress false, or a rank other than 0)."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, step: int, *, loss: float, lr: float, images_per_s: float) -> None:
        pass


def format_duration(seconds: float) -> str:
    """H:MM:SS, or ? when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class LineProgress:
    """One plain line per `every_s` seconds (0: every step), and always the first and last step."""

    def __init__(
        self, total: int, start: int, batch_size: int, every_s: float, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total, self.start, self.batch_size, self.every_s = total, start, batch_size, every_s
        self.stream, self.clock = stream, clock

    def __enter__(self) -> LineProgress:
        self.began = self.clock()
        self.last_time, self.last_step, self.printed, self.gone = self.began, self.start, False, False
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, step: int, *, loss: float, lr: float, images_per_s: float) -> None:
        now = self.clock()
        due = not self.printed or now - self.last_time >= self.every_s or step >= self.total
        if not due or step <= self.last_step or self.gone:
            return
        rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        eta = (now - self.began) / (step - self.start) * (self.total - step)
        self.last_time, self.last_step, self.printed = now, step, True
        try:
            self.stream.write(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} img/s  ETA {format_duration(eta)}\n"
            )
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away (`| head`, a closed log): the run goes on unseen
            self.gone = True


class BarProgress:
    """Rich's live bar, redrawn in place on a terminal."""

    def __init__(self, total: int, start: int, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.1f} img/s  ETA"),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
        )
        self.task = self.bar.add_task("pretrain", total=total, completed=start, loss=float("nan"), lr=0.0, ips=0.0)

    def __enter__(self) -> BarProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, *, loss: float, lr: float, images_per_s: float) -> None:
        self.bar.update(self.task, completed=step, loss=loss, lr=lr, ips=images_per_s)


def progress_for(
    enabled: bool, *, total: int, start: int, batch_size: int, every_s: float, stream: TextIO | None = None
) -> Progress:
    """The bar where `stream` (default stdout) is a terminal, plain lines where it is not, or nothing."""
    if not enabled:
        return NoProgress()
    stream = stream if stream is not None else sys.stdout
    # The stream itself, not rich's guess: rich counts FORCE_COLOR (set by many CI systems) as a
    # terminal, and a redrawn bar in a log file is unreadable.
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return BarProgress(total, start, stream)
    return LineProgress(total, start, batch_size, every_s, stream)
