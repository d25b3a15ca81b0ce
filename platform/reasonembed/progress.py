"""One progress line per long step (rows done / total, rate, ETA), for the CLI verbs, Ray job drivers and the demo.

Usage (library code, driver side)::

    from reasonembed import progress

    with progress.step("encode", total=n_rows, unit="rows") as p:
        for batch in batches:
            ...
            p.update(len(batch))

    # or, when start and end live in different places:
    p = progress.step("generate", total=None, unit="rows")
    p.set_total(n)          # once the total is known
    p.update(k)             # k more done (relative) / p.set(n_done) (absolute)
    p.close()               # p.close(ok=False) marks it failed

How it renders (``mode()``), decided when a step starts:

- ``bar``: one tqdm line on stderr, redrawn in place; when stderr is a terminal, or ``REASONEMBED_PROGRESS=1``.
  While a bar is shown, console log records of the root logger are written above it (tqdm's logging redirect),
  so a log line never breaks the bar.
- ``log``: plain lines on stderr, one when the step starts, at most one per ``REASONEMBED_PROGRESS_INTERVAL``
  seconds (default 10) while it runs, and one at the end; when stderr is not a terminal (CI, a Ray job whose
  output is captured), or ``REASONEMBED_PROGRESS=log``. The format is fixed (``format_line``/``parse_line``),
  so a process that follows a job's log (the demo, ``reasonembed.workflow``) can relay it as its own live line::

      12:00:11 progress [encode] 1200/5183 rows 23% 120.0 rows/s ETA 33s

- ``off``: nothing is printed and ``update`` only adds to a counter; ``REASONEMBED_PROGRESS=0``.

Safe in the driver of a Ray job (it never calls Ray, holds no Ray object, and writes only to this process's
stderr) and from several threads (a lock guards the counters and the output).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Literal, TypeVar

ENV_MODE = "REASONEMBED_PROGRESS"
ENV_INTERVAL = "REASONEMBED_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
Mode = Literal["bar", "log", "off"]
T = TypeVar("T")

_clock = time.monotonic  # replaced by tests
_lock = threading.RLock()
_redirect_depth = 0  # bars that currently redirect console logging (only the outermost one does)
_redirect_cm: contextlib.AbstractContextManager | None = None


def mode(stream: IO[str] | None = None) -> Mode:
    """How a step started now would render (see the module docstring)."""
    value = os.environ.get(ENV_MODE, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "bar", "true", "yes", "tty"):
        return "bar"
    if value == "log":
        return "log"
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return "log"


def enabled() -> bool:
    """False when progress is switched off (callers can skip work done only to report progress)."""
    return mode() != "off"


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_duration(seconds: float) -> str:
    """45s, 3m07s, 2h05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(rate: float) -> str:
    """12.3 / 1234 / 0.047: three significant digits at most, never a bare 0.0 for slow steps."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 1 or rate == 0:
        return f"{rate:.1f}"
    return f"{rate:.2g}"


def format_line(name: str, n: int, total: int | None, unit: str, elapsed: float, state: str = "update",
                postfix: str = "") -> str:
    """The ``log`` mode line (without timestamp). ``state``: start, update, done or failed."""
    rate = n / elapsed if elapsed > 0 else 0.0
    head = f"progress [{name}] {n}/{total if total is not None else '?'} {unit}"
    if state == "start":
        tail = "started"
    elif state == "done":
        tail = f"done in {format_duration(elapsed)} ({format_rate(rate)} {unit}/s)"
    elif state == "failed":
        tail = f"failed after {format_duration(elapsed)}"
    else:
        parts = []
        if total:
            parts.append(f"{100 * n / total:.0f}%")
        parts.append(f"{format_rate(rate)} {unit}/s")
        if total and rate > 0 and n < total:
            parts.append(f"ETA {format_duration((total - n) / rate)}")
        tail = " ".join(parts)
    return f"{head} {tail}" + (f" ({postfix})" if postfix else "")


_LINE_RE = re.compile(r"progress \[(?P<name>[^\]]+)\] (?P<n>\d+)/(?P<total>\d+|\?) (?P<unit>\S+)(?: (?P<rest>.*))?$")


@dataclass
class ProgressEvent:
    """One parsed ``log`` mode line (see :func:`parse_line`)."""

    name: str
    n: int
    total: int | None
    unit: str
    state: str  # start | update | done | failed
    text: str  # the line from "progress [" on


def parse_line(line: str) -> ProgressEvent | None:
    """The progress event in one log line (anywhere in the line, after any prefix), or None."""
    m = _LINE_RE.search(line.rstrip())
    if m is None:
        return None
    rest = m.group("rest") or ""
    state = ("start" if rest.startswith("started") else "done" if rest.startswith("done")
             else "failed" if rest.startswith("failed") else "update")
    total = None if m.group("total") == "?" else int(m.group("total"))
    return ProgressEvent(m.group("name"), int(m.group("n")), total, m.group("unit"), state, line[m.start():].strip())


def write(message: str, stream: IO[str] | None = None) -> None:
    """Print one line to stderr without breaking a live bar (tqdm.write when bars may be shown)."""
    stream = stream if stream is not None else sys.stderr
    with _lock:
        if _redirect_depth:
            from tqdm import tqdm

            tqdm.write(message, file=stream)
        else:
            print(message, file=stream, flush=True)


class Step:
    """A running step. Create it with :func:`step`; use it as a context manager or call :meth:`close`."""

    def __init__(self, name: str, total: int | None = None, unit: str = "rows", *, stream: IO[str] | None = None,
                 interval: float | None = None, render: Mode | None = None):
        self.name, self.unit = name, unit
        self.total = int(total) if total is not None else None
        self.n = 0
        self.postfix = ""
        self.closed = False
        self.ok: bool | None = None
        self._stream = stream
        self.mode: Mode = render or mode(stream)
        self._interval = interval_s() if interval is None else interval
        self._t0 = self._last_emit = _clock()
        self._bar = None
        self._redirecting = False
        if self.mode == "bar":
            self._open_bar()
        elif self.mode == "log":
            self._emit("start")

    # -- counters --------------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return _clock() - self._t0

    @property
    def rate(self) -> float:
        """Units per second since the step (or its last :meth:`reset`) started."""
        e = self.elapsed
        return self.n / e if e > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None without a total or before the first unit."""
        r = self.rate
        if not self.total or r <= 0:
            return None
        return max(0.0, (self.total - self.n) / r)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        if self.mode == "off":
            self.n += n
            return
        with _lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            else:
                self._maybe_emit()

    def set(self, n: int) -> None:
        """Absolute count (for progress read back from elsewhere, e.g. a training log)."""
        self.update(int(n) - self.n)

    def set_total(self, total: int | None) -> None:
        """The total, once known (or corrected)."""
        with _lock:
            self.total = int(total) if total is not None else None
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def set_postfix(self, text: str) -> None:
        """A short note shown after the counts (the current shard, task, sub-stage ...)."""
        with _lock:
            self.postfix = text
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=True)

    def reset(self, total: int | None = None, unit: str | None = None) -> None:
        """Start counting again from 0 (a new sub-stage): new total, unit, rate and ETA."""
        with _lock:
            self.n, self.total = 0, (int(total) if total is not None else None)
            self.unit = unit or self.unit
            self._t0 = _clock()
            if self._bar is not None:
                self._bar.unit = self.unit
                self._bar.reset(total=self.total)
            elif self.mode == "log":
                self._emit("start")

    def close(self, ok: bool = True, report: bool = True) -> None:
        """End the step: the final line says done (with the mean rate) or failed. ``report=False``: no final
        ``log`` line (the caller prints its own summary); a bar stays as drawn."""
        with _lock:
            if self.closed:
                return
            self.closed, self.ok = True, ok
            if self._bar is not None:
                if not ok:
                    self._bar.set_postfix_str(f"{self.postfix + ', ' if self.postfix else ''}failed", refresh=True)
                self._bar.close()
                self._bar = None
                self._stop_redirect()
            elif self.mode == "log" and report:
                self._emit("done" if ok else "failed")

    def __enter__(self) -> Step:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    # -- rendering -------------------------------------------------------------------------------------------
    def _out(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    def _emit(self, state: str) -> None:
        self._last_emit = _clock()
        line = format_line(self.name, self.n, self.total, self.unit, self.elapsed, state, self.postfix)
        out = self._out()
        try:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=out, flush=True)
        except (ValueError, OSError):  # stream closed at interpreter shutdown
            pass

    def _maybe_emit(self) -> None:
        if _clock() - self._last_emit >= self._interval:
            self._emit("update")

    def _open_bar(self) -> None:
        from tqdm import tqdm

        global _redirect_depth, _redirect_cm
        with _lock:
            self._bar = tqdm(total=self.total, desc=self.name, unit=self.unit, file=self._out(), dynamic_ncols=True,
                             mininterval=0.5, smoothing=0.1, leave=True)
            if _redirect_depth == 0:
                from tqdm.contrib.logging import logging_redirect_tqdm

                # Console log records go through tqdm.write while bars are shown, so they appear above the bars.
                _redirect_cm = logging_redirect_tqdm(loggers=[logging.root])
                _redirect_cm.__enter__()
            _redirect_depth += 1
            self._redirecting = True

    def _stop_redirect(self) -> None:
        global _redirect_depth, _redirect_cm
        if not self._redirecting:
            return
        self._redirecting = False
        _redirect_depth -= 1
        if _redirect_depth == 0 and _redirect_cm is not None:
            _redirect_cm.__exit__(None, None, None)
            _redirect_cm = None


def step(name: str, total: int | None = None, unit: str = "rows", *, stream: IO[str] | None = None,
         interval: float | None = None) -> Step:
    """Start a progress step (see the module docstring); use the result as a context manager or close it."""
    return Step(name, total, unit, stream=stream, interval=interval)


def track(iterable: Iterable[T], name: str, total: int | None = None, unit: str = "rows") -> Iterator[T]:
    """Yield from ``iterable``, counting one unit per item (``total`` defaults to ``len(iterable)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with step(name, total, unit) as p:
        for item in iterable:
            yield item
            p.update(1)


__all__ = ["ENV_INTERVAL", "ENV_MODE", "ProgressEvent", "Step", "enabled", "format_duration", "format_line", "mode",
           "parse_line", "step", "track", "write"]
