"""Progress for long runs: stage lines and tqdm bars on stderr; silent when quiet.

Every stage reports through a :class:`Progress`. ``fxprune.prune(progress=...)`` takes one, a plain
``callable(str)`` (stage names only), ``True`` (stderr) or ``None`` (silent); :func:`as_progress`
turns any of these into a :class:`Progress`. A new stage (an iterative step, recovery) needs three
lines::

    say = as_progress(progress)                       # once, at the top of the function
    say("recovery")                                    # a stage line: "[  3.1s] recovery"
    for batch in say.iter(batches, "recovery", unit="batch"): ...   # a bar over a loop

``say.bar(name, total)`` is the same bar as a context manager (``bar.update()``, ``bar.to(done)``)
for loops you don't own, and ``with say.task(name):`` times an opaque call (loading, capture)
with a live clock. Output only ever goes to stderr, so ``--json`` on stdout stays clean. Bars
draw live on a terminal; elsewhere (logs, CI) each finished bar is one summary line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar, Union

from tqdm import tqdm

T = TypeVar("T")
_TICK_S = 0.25  # how often a live task clock redraws


class Bar:
    """One progress bar: ``update(n)``, ``to(done, total)``, ``close()``; also a context manager."""

    def __init__(self, owner: "Progress", name: str, total: int | None, unit: str) -> None:
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.done = 0
        self.t0 = time.perf_counter()
        self._bar = owner._tqdm(name, total, unit) if owner.live else None
        if self._bar is None:
            owner.stage(name)  # logs: a line when it starts, a summary when it ends

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.to(self.done + n)

    def to(self, done: int, total: int | None = None) -> None:
        """Set the absolute position (and the total, when it becomes known or changes)."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.done = done
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def close(self) -> None:
        """Finish the bar: leave it on screen (terminal) or print one summary line (logs)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.owner.quiet and not self.owner.live:
            of = f"/{self.total}" if self.total is not None else ""
            self.owner.stage(f"{self.name} done: {self.done}{of} {self.unit} in {time.perf_counter() - self.t0:.1f}s")

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Progress:
    """Stage lines (``[  1.2s] capture``) and bars on ``stream`` (stderr).

    Args:
        quiet: print nothing at all (``--quiet``).
        stream: where to write; stderr by default (never stdout: it carries ``--json``).
        live: draw bars live; None = only when ``stream`` is a terminal.
    """

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = (isatty() if live is None else live) and not quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.stage(msg)

    def stage(self, name: str) -> None:
        """One timestamped line naming the stage that starts now."""
        if self.quiet:
            return
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {name}"
        if self.live:
            tqdm.write(line, file=self.stream)  # keeps a bar that is on screen intact
        else:
            print(line, file=self.stream, flush=True)

    def bar(self, name: str, total: int | None = None, unit: str = "step") -> Bar:
        """A bar of ``total`` steps (None: unknown); close it or use it as a context manager."""
        return Bar(self, name, total, unit)

    def iter(self, items: Iterable[T], name: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
        """Yield ``items`` with a bar advancing one step per item."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.bar(name, total, unit) as bar:
            for item in items:
                yield item
                bar.update()

    def callback(self, bar: Bar) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` function (as :func:`fxprune.data.perplexity` takes) driving ``bar``."""
        return lambda done, total: bar.to(done, total)

    @contextmanager
    def task(self, name: str) -> Iterator[None]:
        """Time one opaque call: a stage line, and on a terminal a clock that ticks while it runs."""
        if not self.live:
            self.stage(name)
            yield
            return
        bar = self._tqdm(name, None, "s", clock=True)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(_TICK_S):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            bar.close()

    def _tqdm(self, name: str, total: int | None, unit: str, clock: bool = False) -> tqdm:
        stamp = f"[{time.perf_counter() - self.t0:6.1f}s] {name}"
        fmt = "{desc} {elapsed}" if clock else None
        width = _columns(self.stream)  # a pty that reports 0 columns would draw empty bars
        return tqdm(total=total, desc=stamp, unit=unit, file=self.stream, leave=True, dynamic_ncols=width > 0,
                    ncols=None if width > 0 else 100, bar_format=fmt, mininterval=0.1)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a terminal, or a stream with no file number
        return 0


def silent() -> Progress:
    """A Progress that prints nothing."""
    return Progress(quiet=True)


class _Forward(Progress):
    """Stage names go to a user's ``callable(str)``; bars are kept silent."""

    def __init__(self, fn: Callable[[str], None]) -> None:
        super().__init__(quiet=True)
        self.fn = fn

    def stage(self, name: str) -> None:
        self.fn(name)


ProgressLike = Union[Progress, Callable[[str], None], bool, None]


def as_progress(progress: ProgressLike) -> Progress:
    """None / False: silent; True: stderr; a Progress: itself; a ``callable(str)``: stage names to it."""
    if isinstance(progress, Progress):
        return progress
    if progress is None or progress is False:
        return silent()
    if progress is True:
        return Progress()
    if callable(progress):
        return _Forward(progress)
    raise TypeError(f"progress must be a Progress, a callable(str), a bool or None, not {type(progress).__name__}")
