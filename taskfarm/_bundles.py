"""Which plain calls ride together, and how many: the held queue and its bundles.

A task costs the farm ~60 us of Python over its life (its scheduler entry,
its item in a message each way, a slot's round on the worker); on 1 ms tasks
that is 6% of the machine.  So plain calls submitted faster than they run
wait here, and the master takes from them only what the ranks have room for,
as bundles: one task to the scheduler and the wire, one outcome per call
(`taskfarm._dispatch`, "Bundles").  This module keeps the record and the size
rule; it does no I/O and reads no clock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ._future import FarmFuture

#: measured seconds of calls per bundle: as map's chunks
#: (`taskfarm._executor.MAP_CHUNK_SECONDS`), long enough that a bundle's own
#: cost is noise, short enough to balance (a sixteenth of the prefetch pipeline)
BUNDLE_SECONDS = 0.02
#: most calls in one bundle (no-op calls): bounds a bundle's message
BUNDLE_MAX = 512
#: a call whose arguments pickle to more bytes goes as a task of its own:
#: copying them costs more than a task's own overhead, and a bundle's message
#: stays under BUNDLE_MAX x this (32 MiB)
BUNDLE_CALL_BYTES = 64 << 10
#: guided self-scheduling: a bundle holds at most the held calls / (this * slots)
BUNDLE_GUIDED_FACTOR = 2
#: weight of the newest measurement in the running mean of seconds per call
CALL_TIME_EWMA = 0.3
#: functions whose call time is kept, at most (the oldest is forgotten first):
#: closures over different values are different functions
TIMED_FUNCTIONS_MAX = 1024
#: calls of a function not yet timed a worker slot may hold, its running one
#: included: a few, so that the slot works on while the first result travels
#: back to time the function, and never hundreds of unknown length
UNTIMED_DEPTH = 4
#: ``FarmFuture._bundle`` of a call waiting here (else its bundle's task id,
#: or 0 for a task of its own)
HELD = -1


def guided_size(
    per_item: float,
    remaining: int | None,
    workers: int,
    *,
    target: float,
    factor: int,
    cap: int,
    floor_seconds: float = 0.0,
) -> int:
    """Items in the next chunk of work (map's chunks, bundles of calls):
    ``target`` seconds of them at ``per_item`` seconds each, at most ``cap``;
    with ``remaining`` known, at most remaining / (``factor`` * workers), so
    that chunks shrink as the work runs out (guided self-scheduling), but never
    below ``floor_seconds`` of work."""
    size = int(target / per_item) if per_item > 0 else cap
    if remaining is not None:
        guided = -(-remaining // (factor * max(1, workers)))
        floor = 0
        if floor_seconds > 0:
            floor = int(floor_seconds / per_item) if per_item > 0 else cap
        size = min(size, max(guided, floor))
    return max(1, min(cap, size))


class Call(Protocol):
    """What a held call offers (the master's submission record)."""

    @property
    def future(self) -> FarmFuture: ...

    @property
    def executor_id(self) -> int: ...

    @property
    def fn(self) -> tuple[bytes, bytes]: ...  # digest, payload


C = TypeVar("C", bound=Call)


class Bundler(Generic[C]):
    """The held calls, the bundles made of them, and how big the next one is.

    Call times are kept per function: calls of a function never timed go one
    by one, however short the calls of another function were, so that a
    burst of long calls after short ones is never bundled by the short ones'
    time (a running bundle cannot be stolen back at the tail).  The master
    sends such calls only while no slot holds `UNTIMED_DEPTH` tasks (`first`,
    `timed`): the first result times the function, and no rank queues
    hundreds of calls of unknown length meanwhile."""

    def __init__(self) -> None:
        self.held: collections.deque[C] = collections.deque()
        #: held calls not cancelled (a cancelled one stays in ``held`` until taken)
        self.live = 0
        #: a bundle's scheduler task id -> its calls
        self.bundles: dict[int, list[C]] = {}
        #: function digest -> running mean of seconds per call
        self.call_time: dict[bytes, float] = {}
        #: calls that went out in bundles (the statistics' ``bundled``)
        self.bundled = 0

    def hold(self, call: C) -> None:
        call.future._bundle = HELD
        self.held.append(call)
        self.live += 1

    def first(self, alive: Callable[[C], bool]) -> C | None:
        """The oldest held call that is ``alive`` (the cancelled ones before it are dropped)."""
        held = self.held
        while held and not alive(held[0]):
            held.popleft()
        return held[0] if held else None

    def timed(self, fn: bytes) -> bool:
        """True once a call of ``fn`` has been timed (its calls may be bundled)."""
        return fn in self.call_time

    def take(self, room: int, slots: int, alive: Callable[[C], bool]) -> list[C]:
        """The next bundle's calls, oldest first: at most ``room`` and `size`
        of them, all of one executor (its initializer runs before them) and
        one function; calls not ``alive`` (cancelled) are dropped."""
        first = self.first(alive)
        if first is None:
            return []
        held = self.held
        size = min(room, self.size(first.fn[0], slots))
        parts: list[C] = []
        while held and len(parts) < size:
            call = held[0]
            if not alive(call):
                held.popleft()
                continue
            if call.executor_id != first.executor_id or call.fn[0] != first.fn[0]:
                break
            held.popleft()
            parts.append(call)
        self.live -= len(parts)
        return parts

    def size(self, fn: bytes, slots: int) -> int:
        """Calls of ``fn`` in the next bundle: `BUNDLE_SECONDS` of them, fewer as
        the held queue empties (guided self-scheduling); 1 until one has been timed."""
        mean = self.call_time.get(fn)
        if mean is None:
            return 1
        return guided_size(
            mean, self.live, slots, target=BUNDLE_SECONDS, factor=BUNDLE_GUIDED_FACTOR, cap=BUNDLE_MAX
        )

    def observe(self, fn: bytes, seconds: float) -> None:
        """A call of ``fn`` took ``seconds`` (a bundle: its calls' mean)."""
        times = self.call_time
        mean = times.get(fn)
        if mean is None:
            if len(times) >= TIMED_FUNCTIONS_MAX:
                del times[next(iter(times))]
            times[fn] = seconds
        else:
            times[fn] = mean + CALL_TIME_EWMA * (seconds - mean)

    def made(self, bundle_id: int, parts: list[C]) -> None:
        """``parts`` go out as the bundle ``bundle_id``."""
        for call in parts:
            call.future._bundle = bundle_id
        self.bundles[bundle_id] = parts
        self.bundled += len(parts)

    def unbundle(self, bundle_id: int) -> int:
        """A bundle given back before it started (stolen from its rank) is held
        again, its calls ahead of those held since, in their order; returns how
        many calls.  They are bundled anew for the current held count, so the
        work a steal moves at the tail goes in the smaller bundles that count
        gives, not in the one bundle sized when many calls were held."""
        parts = self.bundles.pop(bundle_id, None)
        if not parts:
            return 0
        for call in reversed(parts):
            call.future._bundle = HELD
            self.held.appendleft(call)
        self.live += len(parts)
        self.bundled -= len(parts)  # counted again when they go out
        return len(parts)

    def clear(self) -> None:
        """The farm ended early: its held calls and bundles failed with their tasks."""
        self.held.clear()
        self.live = 0
        self.bundles.clear()
