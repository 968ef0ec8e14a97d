"""Progress on rank 0: done/failed/retried of the total, rate, ETA and workers alive.

`Progress` is a farm listener that only bumps counters (O(1) on the service
thread); its own thread shows them: a tqdm bar on a terminal when tqdm is
installed, else a plain line every ``interval`` seconds, without control
characters, for batch logs::

    taskfarm progress: done=120/300 failed=0 retried=2 submitted=300 rate=5.31/s eta=34s workers=4 elapsed=23s

``done=N/T`` when the total is known (a task file), ``done=N`` otherwise
(a script submits as it goes); the ETA is then for the tasks submitted so
far and ends in ``+`` (more may come); ``eta=-`` while no rate is known.
``reused=`` appears on resume: tasks answered from the journal count
towards the total.  The rate is over the last minute or so.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any, NamedTuple

from ._signals import start_thread

#: seconds between plain lines in a batch job (``--progress-interval``)
DEFAULT_INTERVAL = 30.0
#: at most this often on a terminal without tqdm
TTY_INTERVAL = 10.0
#: redraws of the tqdm bar per second
BAR_REFRESH = 0.25
#: the rate (and so the ETA) is taken over about this many recent seconds
RATE_WINDOW = 60.0

#: the bar being drawn, if any: log lines go through it so they do not tear it
_active_bar: Any = None
_bar_lock = threading.Lock()


def write_line(stream: IO[str], text: str) -> None:
    """Write ``text`` + newline to ``stream`` without breaking a live progress bar."""
    bar = _active_bar
    if bar is not None:
        bar.write(text, file=stream)
        return
    stream.write(text + "\n")
    stream.flush()


class Figures(NamedTuple):
    """What a progress line shows."""

    done: int
    failed: int
    retried: int
    submitted: int
    reused: int
    total: int | None
    workers: int
    elapsed: float
    rate: float  # finished tasks per second, recent
    eta: float | None  # seconds; None when unknown

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.reused


def format_line(f: Figures) -> str:
    """The plain, parseable progress line (no control characters)."""
    done = f"{f.done}/{f.total}" if f.total is not None else str(f.done)
    parts = [
        f"done={done}",
        f"failed={f.failed}",
        f"retried={f.retried}",
        f"submitted={f.submitted}",
    ]
    if f.reused:
        parts.append(f"reused={f.reused}")
    parts += [
        f"rate={f.rate:.2f}/s",
        f"eta={_seconds(f.eta)}{'' if f.total is not None or f.eta is None else '+'}",
        f"workers={f.workers}",
        f"elapsed={f.elapsed:.0f}s",
    ]
    return "taskfarm progress: " + " ".join(parts)


def parse_line(line: str) -> dict[str, str] | None:
    """The fields of a progress line (for tests and log scrapers); None if it is not one."""
    prefix = "taskfarm progress: "
    if not line.startswith(prefix):
        return None
    return dict(part.split("=", 1) for part in line[len(prefix) :].split())


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}s"


class Progress:
    """Counts a farm's events and shows them on ``stream`` (rank 0's stderr)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        total: int | None = None,
        bar: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        tty = _isatty(self.stream)
        if bar is None:
            bar = tty and _tqdm_class() is not None
        self._use_bar = bar
        self.interval = interval if not tty or bar else min(interval, TTY_INTERVAL)
        # counters, written by the service thread only
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.submitted = 0
        self._joined: set[int] = set()
        self._lost: set[int] = set()
        self._farm: Any = None
        self._started = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self.lines = 0

    # -- the listener: counters only ------------------------------------------------
    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "succeeded":
            self.done += 1
        elif event == "failed":
            self.failed += 1
        elif event == "retried":
            self.retried += 1
        elif event == "submitted":
            self.submitted += 1
        elif event == "worker_joined":
            self._joined.add(fields["rank"])
        elif event == "rank_lost":
            self._lost.add(fields["rank"])

    def catch_up(self, ranks: Mapping[int, Any]) -> None:
        """Count the workers that joined before the listener was added (a snapshot's ranks)."""
        for rank, r in ranks.items():
            self._joined.add(rank)
            if not r.alive:
                self._lost.add(rank)

    # -- showing ----------------------------------------------------------------------
    def start(self, farm: Any = None) -> None:
        """Start showing; ``farm`` (optional) tells how many tasks came from a journal."""
        self._farm = farm
        self._started = time.monotonic()
        if self._use_bar:
            self._open_bar()
        self._thread = start_thread(threading.Thread(target=self._loop, name="taskfarm-progress", daemon=True))

    def figures(self) -> Figures:
        now = time.monotonic()
        reused = 0
        resume = getattr(self._farm, "resume", None)
        if resume is not None:
            reused = int(getattr(resume, "matched", 0))
        finished = self.done + self.failed + reused
        samples = self._samples
        samples.append((now, finished))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        t0, f0 = samples[0]
        if len(samples) < 2 or now - t0 <= 0:
            t0, f0 = self._started, 0
        rate = (finished - f0) / (now - t0) if now > t0 else 0.0
        target = self.total if self.total is not None else self.submitted
        eta = None
        if finished >= target:
            eta = 0.0
        elif rate > 0:
            eta = (target - finished) / rate
        return Figures(
            self.done,
            self.failed,
            self.retried,
            self.submitted,
            reused,
            self.total,
            len(self._joined - self._lost),
            now - self._started,
            rate,
            eta,
        )

    def _loop(self) -> None:
        wait = BAR_REFRESH if self._bar is not None else self.interval
        while not self._stop.wait(wait):
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            self._update_bar()
            return
        self.stream.write(format_line(self.figures()) + "\n")
        self.stream.flush()
        self.lines += 1

    def close(self) -> None:
        """Stop; in line mode, a last line with the final counts if any line was shown."""
        global _active_bar
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._bar is not None:
                self._update_bar()
                with _bar_lock:
                    self._bar.close()
                    if _active_bar is self._bar:
                        _active_bar = None
                self._bar = None
            elif self.lines:
                self._show()

    # -- tqdm -------------------------------------------------------------------------
    def _open_bar(self) -> None:
        global _active_bar
        tqdm = _tqdm_class()
        if tqdm is None:
            return
        self._bar = tqdm(
            total=self.total,
            unit="task",
            file=self.stream,
            dynamic_ncols=True,
            desc="taskfarm",
            leave=True,
            mininterval=BAR_REFRESH,
        )
        self._shown = 0
        with _bar_lock:
            _active_bar = self._bar

    def _update_bar(self) -> None:
        f = self.figures()
        bar = self._bar
        if bar.total != f.total and f.total is not None:
            bar.total = f.total
        bar.set_postfix(failed=f.failed, retried=f.retried, workers=f.workers, refresh=False)
        delta = f.finished - self._shown
        self._shown = f.finished
        if delta > 0:
            bar.update(delta)
        else:
            bar.refresh()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
