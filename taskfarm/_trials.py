"""Which of two ways is faster on the machine at hand, learned while a farm runs.

Some choices on an idle farm's round trip pay on one machine and cost on
another, and the difference is larger than the noise of a few dozen round
trips: ringing a lone task's rank before the task is made
(`taskfarm._shortcuts.ShortCuts._ring_ahead`) took 0.16 ms off the round trip on
one 2-core VM and added 0.08 (MPICH) to 0.19 ms (Open MPI) on another,
whose kernel packs woken tasks onto the busy vCPU.  A `Trial` lets the
two ways take turns until each has been timed `samples` times, then keeps
the one with the lower median for the rest of the farm.  It reads no clock
and does no I/O: the farm times the round trips and says which way each took.
"""

from __future__ import annotations

import statistics


class Trial:
    """Two ways (True, False) taking turns until each has ``samples``
    timings; then the one whose median is lower, True on a tie."""

    __slots__ = ("_next", "_samples", "_times", "decided")

    def __init__(self, samples: int) -> None:
        self._samples = samples
        self._times: dict[bool, list[float]] = {True: [], False: []}
        self._next = True
        #: the way kept once both are timed (None while they take turns)
        self.decided: bool | None = None

    def choose(self) -> bool:
        """The way to take next (the kept one once decided)."""
        if self.decided is not None:
            return self.decided
        way = self._next
        self._next = not way
        return way

    def record(self, way: bool, seconds: float) -> None:
        """A timing of ``way``; decides once each way has its ``samples``."""
        if self.decided is not None:
            return
        times = self._times[way]
        if len(times) < self._samples:
            times.append(seconds)
        if all(len(t) >= self._samples for t in self._times.values()):
            self.decided = statistics.median(self._times[True]) <= statistics.median(self._times[False])
