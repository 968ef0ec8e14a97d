"""The event log (``--events PATH``): one JSON object per line for every state change of a farm.

A farm listener runs on the master's service thread, so `EventLog` costs it
one deque append per event: a writer thread encodes and writes the backlog
once a second (`FLUSH_INTERVAL`) or as soon as `FLUSH_EVENTS` are waiting,
and `close` writes the rest.  The format is described in docs/events.md.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

from ._signals import start_thread

log = logging.getLogger("taskfarm.events")

#: the ``format`` of the first line; bumped if a field changes meaning
EVENTS_FORMAT = 1
#: longest time an event waits in memory before it is written (seconds)
FLUSH_INTERVAL = 1.0
#: events waiting that wake the writer before its interval is up
FLUSH_EVENTS = 4096
#: error texts longer than this are cut (the journal keeps the whole traceback)
MAX_ERROR_CHARS = 2000


class EventLog:
    """A farm listener that appends every event to a JSON-lines file.

    Use as ``farm.add_listener(log)``; the first line (``log_opened``) is
    written at once, the last (``run_ended``, with the run's statistics) by
    `close`.  The file is overwritten: give each job its own path.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        meta: Mapping[str, Any] | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        flush_events: int = FLUSH_EVENTS,
    ) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._queue: collections.deque[tuple[str, Mapping[str, Any]]] = collections.deque()
        self._flush_interval = flush_interval
        self._flush_events = flush_events
        self._kick = threading.Event()
        self._closing = False
        self._closed = False
        self._failed: BaseException | None = None
        self._joined: set[int] = set()
        self.events = 0
        self._write_lock = threading.Lock()
        head = {
            "format": EVENTS_FORMAT,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **(meta or {}),
            "t": time.time(),
        }
        self._queue.append(("log_opened", head))
        self._write_pending()
        self._thread = start_thread(threading.Thread(target=self._loop, name="taskfarm-events", daemon=True))

    # -- the listener (service thread): O(1), never blocks ----------------------------
    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if self._closing or self._failed is not None:
            return
        if event == "worker_joined":
            self._joined.add(fields["rank"])
        self._queue.append((event, fields))
        if len(self._queue) >= self._flush_events:
            self._kick.set()

    def catch_up(self, ranks: Mapping[int, Any]) -> None:
        """Log ``worker_joined`` for ranks that joined before this log was attached.

        ``ranks`` is `FarmStatistics.ranks` from a snapshot taken after
        ``add_listener``: a rank in it whose event this log has not seen joined
        earlier (its line says ``"late": true``).
        """
        for rank, r in sorted(ranks.items()):
            if rank not in self._joined:
                self._joined.add(rank)
                fields = {"rank": rank, "host": r.host, "pid": None, "slots": r.slots, "late": True}
                self._queue.append(("worker_joined", {**fields, "t": time.time()}))

    def close(self, final: Mapping[str, Any] | None = None) -> None:
        """Write what is waiting, then ``final`` as a ``run_ended`` line; close the file."""
        if self._closed:
            return
        self._closing = True
        self._kick.set()
        self._thread.join()
        if final is not None:
            self._queue.append(("run_ended", {**final, "t": time.time()}))
        self._write_pending()
        self._closed = True
        self._file.close()

    # -- the writer thread --------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            self._kick.wait(self._flush_interval)
            self._kick.clear()
            self._write_pending()

    def _write_pending(self) -> None:
        with self._write_lock:
            if self._failed is not None:
                self._queue.clear()
                return
            lines = []
            queue = self._queue
            while queue:
                event, fields = queue.popleft()
                lines.append(encode(event, fields))
            if not lines:
                return
            try:
                self._file.write("".join(lines))
                self._file.flush()
            except OSError as exc:
                self._failed = exc
                log.error("event log %s: %s; no more events are written", self.path, exc)
                return
            self.events += len(lines)


def encode(event: str, fields: Mapping[str, Any]) -> str:
    """One line of the log: ``event`` and ``t`` first, then the event's fields."""
    record: dict[str, Any] = {"event": event, "t": fields.get("t")}
    record.update(fields)
    error = record.get("error")
    if isinstance(error, str) and len(error) > MAX_ERROR_CHARS:
        record["error"] = error[: MAX_ERROR_CHARS - 3] + "..."
    return json.dumps(record, separators=(",", ":"), default=str) + "\n"


class EventsFormatError(ValueError):
    """A line of an event log that is not a JSON object (before the last line)."""


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of an event log, in order.

    A last line cut short (the job was killed mid-write) is skipped; a bad
    line before it raises `EventsFormatError` naming its line number.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for number, line in enumerate(lines[: last + 1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number - 1 == last:
                return  # torn tail
            raise EventsFormatError(f"{os.fspath(path)}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or "event" not in record:
            raise EventsFormatError(f"{os.fspath(path)}:{number}: not an event record")
        yield record


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of an event log (see `iter_events`)."""
    return list(iter_events(path))


def is_event_log(path: str | os.PathLike[str]) -> bool:
    """True if the file starts like an event log (a JSON object), not a journal."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")
