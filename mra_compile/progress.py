"""Progress lines for long work (kernel compiles, the tuner, the demo, the benchmark).

Results (tables, reports) go to stdout; progress never does. Two kinds of line:

- ``log(message)``: a lasting line, ``mra_compile: <message>``; ``timed(message)`` logs
  work that runs a second or longer (every kernel compile: ``compiling kernel ... ...``
  after a second, then ``...: done in 4.2 s``).
- ``Status``: the state of a long job with steps (a counter, the tuner's search): on a
  terminal one line rewritten in place (``\\r``) and erased when done; elsewhere (a file, a
  pipe, CI logs) printed at most every few seconds. ``Status.line`` adds a lasting line.

Where they go: stderr; or, when the application configured logging (a handler on the
``mra_compile`` logger or an ancestor, e.g. ``logging.basicConfig``), INFO records of the
``mra_compile`` logger, under that logging's levels and handlers.

Quiet: nothing is written when ``MRA_COMPILE_QUIET`` is set (to anything but ``""`` or
``"0"``) or inside ``silenced()`` (what the tools' ``--quiet`` does).

Imports nothing of mra_compile (a lowest layer, like ``host``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

ENV_QUIET = "MRA_COMPILE_QUIET"
PREFIX = "mra_compile: "
LOG_THRESHOLD_S = 1.0  # ``timed`` reports the time of work at least this long
logger = logging.getLogger("mra_compile")

_LOCK = threading.RLock()
_silenced = 0  # depth of nested silenced() blocks
_showing: Status | None = None  # the status line now on a terminal (no newline yet)


def quiet() -> bool:
    """True when progress lines are off (``MRA_COMPILE_QUIET`` or ``silenced()``)."""
    return _silenced > 0 or os.environ.get(ENV_QUIET, "") not in ("", "0")


@contextlib.contextmanager
def silenced(on: bool = True):
    """No progress lines inside the block (``on=False``: no change)."""
    global _silenced
    if not on:
        yield
        return
    with _LOCK:
        _silenced += 1
    try:
        yield
    finally:
        with _LOCK:
            _silenced -= 1


def _to_logging() -> bool:
    return logger.hasHandlers()


def _write(stream, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: progress is not worth failing
        pass


def _end_status() -> None:
    """End the terminal's status line (if one shows) before a lasting line."""
    global _showing
    if _showing is not None:
        _write(_showing.target(), "\n")
        _showing.width = 0
        _showing = None


def log(message: str) -> None:
    """A lasting progress line (see the module docstring for where it goes)."""
    if quiet():
        return
    with _LOCK:
        if _to_logging():
            logger.info(message)
            return
        _end_status()
        _write(sys.stderr, PREFIX + message + "\n")


@contextlib.contextmanager
def timed(message: str, threshold: float | None = None):
    """Work that may take long: when it is still running after ``threshold`` seconds
    (default ``LOG_THRESHOLD_S``), ``log(message + " ...")``, and at its end
    ``log(message + ": done in 4.2 s")`` (or ``": failed after 4.2 s"``). Shorter work
    writes nothing."""
    threshold = LOG_THRESHOLD_S if threshold is None else threshold
    start = time.perf_counter()
    started = threading.Event()

    def announce():
        with _LOCK:  # (a lock shared with the end below: the two lines keep their order)
            if not finished:
                log(f"{message} ...")
                started.set()

    finished = False
    timer = threading.Timer(threshold, announce)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        with _LOCK:
            finished = True
        timer.cancel()
        if started.is_set():
            seconds = time.perf_counter() - start
            log(f"{message}: {'done in' if ok else 'failed after'} {seconds:.1f} s")


class Status:
    """The status line of one job: ``[name 12.3/60 s] text`` (``budget``: the planned
    seconds, shown after the elapsed ones).

    ``update(text)`` replaces the status (terminal: in place; elsewhere: printed when
    ``every`` seconds passed since the last printed one, or ``force``); ``line(text)``
    writes a lasting line; ``close()`` erases the status from the terminal. ``stream``:
    where to write (default: stderr or logging, as ``log``); ``enabled=False`` writes
    nothing.
    """

    def __init__(self, name: str, *, budget: float | None = None, every: float = 5.0,
                 stream=None, enabled: bool = True):
        self.name = name
        self.budget = budget
        self.every = every
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter()
        self.last = -1e9
        self.width = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def target(self):
        return self.stream if self.stream is not None else sys.stderr

    def _off(self) -> bool:
        return not self.enabled or quiet()

    def _tty(self) -> bool:
        if self.stream is None and _to_logging():
            return False
        return bool(getattr(self.target(), "isatty", lambda: False)())

    def _text(self, text: str) -> str:
        total = f"/{self.budget:.0f}" if self.budget else ""
        return f"[{self.name} {self.seconds:5.1f}{total} s] {text}"

    def _emit(self, text: str) -> None:
        if self.stream is None and _to_logging():
            logger.info(text)
        else:
            _write(self.target(), text + "\n")

    def update(self, text: str, force: bool = False) -> None:
        global _showing
        if self._off():
            return
        with _LOCK:
            line = self._text(text)
            if self._tty():
                if _showing is not None and _showing is not self:
                    _end_status()
                line = line[:110]
                _write(self.target(), "\r" + line.ljust(self.width))
                self.width = len(line)
                _showing = self
            elif force or time.perf_counter() - self.last >= self.every:
                self._emit(line)
                self.last = time.perf_counter()

    def line(self, text: str) -> None:
        """A lasting line (replaces the status on a terminal)."""
        if self._off():
            return
        with _LOCK:
            if self._tty():
                self.close()
            self._emit(self._text(text))
            self.last = time.perf_counter()

    def close(self) -> None:
        """Erase the status line from the terminal (nothing elsewhere)."""
        global _showing
        with _LOCK:
            if self.width and self._tty():
                _write(self.target(), "\r" + " " * self.width + "\r")
            self.width = 0
            if _showing is self:
                _showing = None
