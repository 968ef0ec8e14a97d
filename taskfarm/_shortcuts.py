"""The rounds user threads run on an idle farm: the farm's short cuts.

A round (steps 1-6) runs under `Farm._round`,
which the service thread holds except while it sleeps (step 7, and its
``sleep(0)`` naps: `Farm._nap`).  When a user thread submits the one
unfinished task of the farm and that lock is free, the user thread runs
the round itself and sends the task (so it does too for a task an idle
rank can start at once, with nothing else waiting and no stream of submits
under way, `_master.SUBMIT_APART`: 0.06-0.13 ms off its round trip while
another rank runs a long task, 2-core VM); when it
then waits in ``result()`` for the farm's only task, it sleeps on the
doorbell in the service thread's stead (`Wakeup.listen`: the result's ring
wakes it first) and runs the round that takes the result; a submit while it
listens pokes it, and it gives the doorbell back.  The service
thread sleeps through both, and is poked only when its planned sleep no
longer fits (`Farm._after_inline_round`).  That takes two of the four
thread wake-ups off an idle farm's round trip, ~0.2 ms on a 2-core VM where
a woken thread lands on an idle, cold core (docs/performance.md, tenth
round).  The submit's round also rings the task's rank before it takes the
submission in (`Farm._ring_ahead`), so that the rank wakes while this thread
prepares and sends the task, not after it (fourteenth round).  MPI is
initialised for ``MPI_THREAD_MULTIPLE`` and the lock keeps its calls to one
thread at a time, as on a worker (`_worker.Worker._mpi_lock`).  A busy farm
takes neither short cut: its threads already run and are woken by nothing.
"""

from __future__ import annotations

import logging
import threading
import time

from ._errors import BrokenFarmError
from ._farm_state import Submission
from ._future import _RESOLVED, FarmFuture
from ._intake import ResultIntake
from ._loopback import Loopback
from ._signals import NOT_STORED, hold_main_thread_signals, release_main_thread_signals
from ._transport import DOORBELL_POLL_CAP, POKED, RING_RECHECKS, RUNG, Rechecks

log = logging.getLogger("taskfarm.master")

#: a lone task's submit may ring its rank early (`Farm._ring_ahead`) only
#: once the farm has had no result for this long (seconds).  A rank that sent
#: one more recently sleeps on a warm core, and the early ring only cost it an
#: empty round: back to back, +0.02 ms (MPICH) and -0.02 (Open MPI) on an
#: Intel VM, +0.046 +- 0.011 and +0.150 +- 0.014 ms on an AMD one (interleaved
#: pairs).  The idle round trips it is for follow pauses of tens of ms.
RING_AHEAD_QUIET = 0.005


class ShortCuts(ResultIntake):
    """The rounds user threads run on an idle farm, or for an idle rank (see the module docstring)."""

    def resolves_here(self) -> bool:
        """True in the thread that runs a round now: the service thread, or a
        user thread in a short cut.  It resolves the futures (and runs their
        callbacks), so a wait there for one not yet resolved would never end."""
        me = threading.get_ident()
        return me == self._thread.ident or me == self._round_owner

    def _only_task_left(self) -> bool:
        """One unfinished task, and no other on its way in: the farm a
        listening thread (`wait_here`) may take the result of."""
        return len(self._tasks) == 1 and not self._submissions

    def wait_here(self, future: FarmFuture, timeout: float | None) -> float | None:
        """Called by a thread about to wait for ``future``: if it is the farm's
        only task and rings come, take its result in this thread (see the
        module docstring).  Returns the rest of ``timeout`` for the usual wait, which
        finds the future resolved unless this thread could not take it."""
        wakeup = self.transport.wakeup
        if (
            not self._only_task_left()
            or future.task_id not in self._tasks
            or not self._ringing[3]  # the service thread's `_all_ring`, as last counted
            or self.resolves_here()  # a done-callback's (a zero timeout: `FarmFuture._wait`)
            or self._service_only()
            or isinstance(self.transport, Loopback)  # rank 0's own worker pokes, it does not ring
            or not wakeup.can_listen()
            or not self._listening.acquire(blocking=False)  # one listener at a time
        ):
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listened = future
        rechecks = Rechecks(RING_RECHECKS)  # as the service thread's, after a ring whose probe found nothing
        try:
            while future._state not in _RESOLVED:
                if not self._only_task_left():
                    # the farm's only task no more: the rings are the service
                    # thread's again, and this thread waits as any other does
                    # (a main thread in slices, so that signal handlers run)
                    self._wake()
                    break
                # else as the service thread's safety net (a ring lost between nodes)
                nap = rechecks.delay(DOORBELL_POLL_CAP)
                if deadline is not None:
                    nap = min(nap, deadline - time.monotonic())
                    if nap <= 0.0:
                        break
                woken = wakeup.listen(nap)
                if woken == POKED or future._state in _RESOLVED:
                    continue  # the service thread resolved it (it pokes this listener)
                got = self._inline_round(receive=True, wait=True, rung=bool(woken & RUNG))
                if got is None:  # the farm ends or drains: the service thread's work alone
                    self._wake()  # the rings this thread took announced messages for it
                    break
                rechecks.probed(got, bool(woken & RUNG))
        finally:
            self._listened = None
            self._listening.release()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _inline_round(self, *, receive: bool, wait: bool, rung: bool = False) -> bool | None:
        """Steps 1-6 in a user thread (see the module docstring), taking `_round`
        (``wait``: until it is free); True if a message came.  None if the
        round was not free, or the farm ends or drains (`_service_only`): the
        caller pokes the service thread.  Step 1 only with ``receive`` (a submit's round
        leaves messages to the thread their rings wake); ``rung``: the
        caller's `Wakeup.listen` took the rings waiting, as the service
        thread's `_wait` does.  The main thread's signals are held from
        before the round is taken to after it is let go: a KeyboardInterrupt
        raised in between would leave the round taken for good, or the
        scheduler and the transport half changed."""
        held = NOT_STORED
        try:
            held = hold_main_thread_signals()
            if not self._round.acquire(wait):
                return None
            try:
                if self._service_only():
                    return None
                self._round_owner = threading.get_ident()
                self._rings_taken = rung
                return self._inline_steps(receive)
            finally:
                self._round_owner = 0
                self._round.release()
        finally:
            release_main_thread_signals(held)

    def _inline_steps(self, receive: bool) -> bool:
        """`_inline_round`'s steps, its error breaking the farm as one in the
        service thread does."""
        # wall time: such a round does not block, and thread_time() is a system
        # call (~5 us each, run cold), where monotonic() is not
        t0 = time.monotonic()
        got = False
        try:
            if receive:
                got = self._receive()
                self._commit()
            elif not self._tasks:
                self._ring_ahead(t0)
            self._dispatch_if_due(got | self._take_submissions() | self._notice_lost())
            sending = self.transport.progress(push=not self._all_ring())
            self._commit()  # what the submissions and the dispatch resolved (cancelled inputs, lost ranks)
            if got:
                self._rung = False
                self._rechecks.found()
            self._after_inline_round(sending)
        except BaseException as exc:
            log.exception("taskfarm round in a user thread failed")
            self._break(BrokenFarmError(f"the farm's round in a user thread failed: {exc!r}"))
            self._wake()
        finally:
            self._inline_cpu += time.monotonic() - t0
            if receive:
                self._result_rounds += 1
            else:
                self._submit_rounds += 1
        return got

    def _ring_ahead(self, now: float) -> None:
        """On an idle farm, before a plain submission is taken in: ring the
        rank its task will go to, which wakes (finds nothing yet, and sleeps
        again) while this thread prepares and sends the task; the ring after
        the send then finds it awake, or just asleep on a warm core.

        Whether that pays depends on the machine, so the farm times its
        first idle round trips both ways and keeps the faster
        (`taskfarm._trials.Trial`).  On a 2-core Intel VM, where a rank woke
        ~0.3 ms after its ring on the other, idle vCPU, ringing early took
        0.16 +- 0.02 ms off the round trip (10 interleaved pairs).  On an AMD
        VM whose kernel packs woken tasks onto the busy vCPU, the rank woke
        on the master's own vCPU about half the time and held it up:
        +0.08 +- 0.02 ms on MPICH, +0.19 +- 0.03 on Open MPI (12 pairs).
        Also tried: the rank probing without sleeping until its task came
        (a rank spinning as a burst of submits began lost its core to the
        master for up to 15 ms), and a later ring, just before the send (no
        better on the AMD VM).  A farm that had a result within
        `RING_AHEAD_QUIET` never rings early, and one that has kept not
        ringing early looks no further (its checks ran ~36 us, wrapped, on
        every lone submit; too little for interleaved pairs to see)."""
        trial = self._ring_trial
        if trial.decided is False:
            return
        sub = self._submissions[0] if self._submissions else None
        if (
            type(sub) is not Submission
            or sub.inputs
            or sub.not_before is not None
            or now - self._last_result < RING_AHEAD_QUIET
            or not self._all_ring()
        ):
            return
        rank = self.scheduler.next_rank()
        if rank is None:
            return
        early = trial.choose()
        if trial.decided is None:
            self._timed_trip = (sub.future.task_id, now, early)
        if early:
            self.transport.ring(rank)

    def _after_inline_round(self, sending: bool) -> None:
        """Poke the service thread if its planned sleep no longer fits."""
        if (
            sending  # sends to progress
            or self._submissions  # another thread's, which poked or will
            or not self._all_ring()  # messages that do not ring must be polled for
            or self._next_dispatch < self._sleep_until  # a timer earlier than its sleep
            or self._snapshot_wanted.is_set()
            or self.scheduler.live_workers() == 0
        ):
            self._wake()
