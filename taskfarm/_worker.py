"""The loop on a worker rank: receive tasks, run them, send results back.

One comm thread and the rank's task slots share the work::

    comm thread (MPI, under _mpi_lock)         slots (run the tasks; see _pools)
      Hello ->                                    |
      <- Config (pool, concurrency)  --------->  solo: the main thread is the one slot
      <- TaskBatch / Steal / Revoke / Stop        threads/processes: K slot threads
      TaskBatch: queue the items  ------------>  queue --> run --> outbox
      Steal: hand back queued, unstarted items    |                  |
      Revoke: hand back those queued, cut off     |                  |
        those running (a speculative copy lost)   |                  |
      results in the outbox: send at once  <------+-- poke ----------+
                                                  (or the slot sends them itself,
                                                   when the comm thread is not
                                                   using the transport)
                                                  an idle slot sleeps on the
                                                  master's rings itself and
                                                  takes its tasks in a comm
                                                  round of its own (_listen)
      heartbeat while any task is held
      log records: forward to rank 0
      Stop: cut off child processes still busy (a drain gave up on them);
            the slots leave, then Bye (own figures)
      an error in the farm's own code (either side): logged, the rank
            stops as at Stop and says Bye unasked (the master resubmits)

How a slot runs a task (inline, in a thread, in a child process; time limits;
``async def``) is `taskfarm._pools`' business.  The pool comes from the
master's `Config`, the first message a worker receives: in world mode workers
start before any executor exists, so the master is the one place that knows.

In the solo pool tasks run on the main thread, so that an inline
``time_limit`` can interrupt Python code with SIGALRM and libraries that
insist on the main thread work.  The comm thread sleeps on the transport's
`Wakeup` between polls: the master rings it after each message, a slot pokes
it when results are ready to go and it cannot send them itself (the comm
thread holds the transport, or a large send needs seeing through), so an
idle or busy worker's comm thread costs next to nothing and a message or
result moves without waiting for a poll; while the rank holds work it
sleeps at most `RESULT_LINGER`, so a result left to linger for company goes
in time without a poke.  While a slot is idle, the
master's rings wake that slot instead of the comm thread (`Worker._listen`),
so a task reaches an idle rank with one thread wake-up, not two.  Where the
master's rings do not arrive it polls on a backoff: up to 2 ms while a
slot is free, 10 ms while every slot runs a task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import BrokenFarmError
from ._pools import (
    BundleProgress,
    Child,
    EventLoop,
    Library,
    Outcome,
    PoolSpec,
    Revocation,
    execute,
    execute_parts,
    lost,
    traceback_head,
)
from ._protocol import (
    PROTOCOL_VERSION,
    Bye,
    Config,
    Heartbeat,
    Hello,
    Kind,
    LogRecords,
    Released,
    ResultBatch,
    ResultItem,
    TaskBatch,
    TaskItem,
)
from ._serialization import buffers_nbytes
from ._signals import start_thread
from ._transport import (
    DOORBELL_POLL_CAP,
    LARGE_SEND_NAP,
    MASTER,
    OOB_EMPTY_MIN,
    POKED,
    RING_RECHECKS,
    RUNG,
    Backoff,
    Rechecks,
    Transport,
    host,
)

log = logging.getLogger("taskfarm.worker")

#: longest sleep of an idle worker between polls for new tasks (seconds), when
#: the master cannot ring its doorbell: first-task latency against idle CPU
IDLE_POLL_CAP = 0.002
#: the same while every slot runs a task: no slot waits for what the poll
#: brings (its next task is queued already, or comes with a refill), only
#: steals, Stop and refills do, and a slot that runs out of tasks pokes the
#: comm thread back to `IDLE_POLL_CAP`.  A worker whose one task slept polled
#: 3.9-5.1% of a core at the idle cap (MPICH, 2-core VM, a slow hour)
BUSY_POLL_CAP = 0.01
#: heartbeat period until the master's Config says otherwise
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: results sent in one message at most, while more tasks are queued
RESULT_BATCH = 64
#: how long a finished result may wait for company while more tasks are queued
#: (seconds): fewer messages, rings and wake-ups on both sides for short tasks.
#: Half the scheduler's pipeline (`_scheduler.PIPELINE_SECONDS`, 320 ms), which
#: the master refills when half of it is free.  Results also go once half the
#: calls queued at the last refill (or send) are done: the pipeline is counted
#: in tasks of the mean duration, so when the mean overstates the queued tasks
#: the queue ran out before the linger and the rank sat idle for a round trip.
#: A result with nothing queued behind it, one that other tasks wait for, or
#: one of `OOB_EMPTY_MIN` or more (its copy dwarfs a message) goes at once.
#: 1 ms tasks, 2 workers: 2 ms -> 10 ms gave efficiency 0.86 -> 0.91, master
#: CPU 59 -> 33 us per task; 10 -> 40 ms (with the pipeline at 80 ms) 0.90 ->
#: 0.93; 40 -> 160 ms (pipeline 320 ms) 0.91-0.92 -> 0.94-0.95, where a 320 ms
#: pipeline with 80 ms gave 0.936-0.937: the message rate is what costs.
RESULT_LINGER = 0.16
#: environment variable that tells a task (and its child processes) its worker's rank
RANK_ENV = "TASKFARM_RANK"
#: GIL switch interval on workers, so the comm thread sends a finished result
#: within this many seconds even while the next task holds the GIL
WORKER_SWITCH_INTERVAL = 0.001


def _calls(item: TaskItem) -> int:
    """The user's calls in ``item``: a bundle counts its parts."""
    return len(item.parts) or 1


def _big(buffers: tuple[Any, ...]) -> bool:
    """True for a result whose buffers are large enough that copying them
    costs far more than a message: it does not wait for company."""
    return bool(buffers) and buffers_nbytes(buffers) >= OOB_EMPTY_MIN


class _LogForwarder(logging.Handler):
    """Queues this rank's log records; the comm thread sends them to rank 0 (Kind.LOG)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self.records: collections.deque[tuple[str, int, str, float]] = collections.deque(maxlen=10000)
        self._wake = wake

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.name, record.levelno, self.format(record), record.created))
            self._wake()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def take(self) -> LogRecords:
        out = []
        while self.records:
            out.append(self.records.popleft())
        return LogRecords(tuple(out))


class _Slot:
    """One place a task runs; in process isolation it owns a child process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = 0.0  # wall seconds inside tasks
        self.child: Child | None = None
        self.children_started = 0
        #: how the comm thread cuts off the task running here (a Revoke, or
        #: Stop after a drain's grace): a child process running it is killed
        self.revocation = Revocation()


class Worker:
    """One worker rank's state: its queue, outbox, slots, functions and figures.

    ``slots`` fixes the number of slots (rank 0's own worker with
    ``master_works`` has one); 0 takes the master's ``concurrency``.
    """

    def __init__(self, transport: Transport, *, slots: int = 0, forward_logs: bool = True) -> None:
        self.transport = transport
        self.rank = transport.rank
        self.host = host()
        # ``_cv``'s lock ("under ``_cv``" below means holding it), taken as
        # ``with self._lock``, not ``with self._cv``: Condition's __enter__ and
        # __exit__ are Python code, twelve calls per task on the worker
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[TaskItem, int]] = collections.deque()
        self._queued_calls = 0  # the user's calls in ``_queue`` (a bundle counts its parts)
        self._low_water = 0  # results go at once when ``_queued_calls`` falls to this
        self._outbox: list[ResultItem] = []
        self._outbox_since = 0.0  # when the oldest unsent result was made, 0 if none waits
        self._running: set[int] = set()
        #: bundles running in the slots: (attempt, calls done so far), by task id
        self._bundles: dict[int, tuple[int, BundleProgress]] = {}
        self._stopping = False
        # the transport's calls: the comm thread's rounds, and a slot that sends
        # its own results while the comm thread sleeps (`_send_outbox`); taken
        # before ``_cv`` when both are held
        self._mpi_lock = threading.Lock()
        # an idle slot that takes the master's rings itself (`_listen`), and
        # whether it sleeps on them right now (under ``_cv``)
        self._listener: _Slot | None = None
        self._in_listen = False
        self._last_sent = time.monotonic()  # the last results or heartbeat, for the next heartbeat
        self._fixed_slots = slots
        self._spec: PoolSpec | None = None
        self._slots: list[_Slot] = []
        self._library = Library()
        self._heads: dict[tuple[int, str], str] = {}  # see `_head`
        self._loop: EventLoop | None = None
        self._loop_lock = threading.Lock()
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.tasks = 0
        self.task_cpu_time = 0.0
        self.child_restarts = 0
        self._started = time.monotonic()
        # CPU from here on: start-up (interpreter, imports, MPI_Init) is no farm overhead
        self._cpu_started = time.process_time()
        self._logs = _LogForwarder(transport.poke) if forward_logs else None
        # tasks (and their child processes) can tell where they run
        os.environ[RANK_ENV] = str(self.rank)

    # -- comm thread -------------------------------------------------------
    def _comm_loop(self) -> None:
        t = self.transport
        t.send(MASTER, Kind.HELLO, Hello(PROTOCOL_VERSION, self.host, os.getpid(), self._fixed_slots, t.doorbell()))
        backoff = Backoff(IDLE_POLL_CAP)  # until (unless) the master's rings arrive
        ringing = False
        woken = 0
        rechecks = Rechecks(RING_RECHECKS)  # after a ring that found nothing
        probe = True  # probe MPI this round even if nothing rang (after a sleep ran out)
        try:
            while True:
                ringing = ringing or t.rings_from(MASTER)
                with self._mpi_lock:
                    active, rung, got, sending = self._comm_round(probe, ringing, woken)
                probe = False
                if self._stopping:
                    self._send_done()
                    break
                woken = 0
                if got:
                    rechecks.found()
                elif rung:
                    # rung, and the probe found nothing yet (MPI shows a message a
                    # moment late): look again, even if this round was busy sending
                    # results, which used to skip the rechecks and leave a refill
                    # unseen until DOORBELL_POLL_CAP (250 ms idle, seen in skewed runs)
                    rechecks.rang_empty()
                    probe = True
                if active or (sending and not ringing):
                    backoff.reset()
                    continue
                if sending:  # a large send the master has not taken yet: it rings once it has
                    woken = t.wait(LARGE_SEND_NAP)
                    probe = not woken
                    continue
                if ringing:  # every message comes with a ring: sleep until one does
                    delay = rechecks.next_delay(DOORBELL_POLL_CAP)
                else:  # polling (the master's rings do not arrive)
                    backoff.cap = BUSY_POLL_CAP if self._slots_all_busy() else IDLE_POLL_CAP
                    delay = backoff.next()
                    if not delay:
                        time.sleep(0)
                        continue
                with self._lock:
                    lingering = self._outbox_since  # a result waiting for company, 0 if none
                    ready = bool(self._outbox) and not lingering
                    holds_work = self._holds_work()
                if lingering:  # it goes when its linger is over, whatever comes
                    delay = max(0.0, min(delay, lingering + RESULT_LINGER - time.monotonic()))
                elif holds_work:
                    # a result that starts to linger while this sleeps goes in
                    # time without a poke (see `_serve_slot`)
                    delay = min(delay, RESULT_LINGER)
                if not ready:
                    woken = t.wait(delay)  # a slot's poke after the check wakes it at once
                    probe = not woken  # a sleep that ran out (a recheck, the cap): look anyway
        except Exception:
            # as a slot's error (`_serve_slot_or_leave`): the rank leaves and
            # `run` says Bye, which fails in turn if the link itself broke
            log.critical(
                "rank %d (%s): the comm thread failed; this rank leaves the farm", self.rank, self.host, exc_info=True
            )
        finally:
            with self._lock:
                self._stopping = True
                self._wake_slots()

    def _holds_work(self) -> bool:
        """Under ``_cv``: a task runs or waits in the queue (heartbeats are
        due, and a result may start to linger)."""
        return bool(self._running or self._queue)

    def _slots_all_busy(self) -> bool:
        """True while every slot runs a task (read without ``_cv``: a stale
        answer costs one sleep at the other cap, and a slot that runs dry pokes)."""
        slots = len(self._slots)
        return slots > 0 and len(self._running) >= slots

    def _send_done(self) -> None:
        """Once Stop has come: the results held for company and the calls
        done in running bundles go now, without their linger.  Stop comes
        at the farm's end, when nothing runs, or when a drain's grace ran
        out, and then they are the work its journal would lose (the round
        that took Stop had looked at them before, and let them linger), and
        a resumed run would do again."""
        with self._mpi_lock:
            self._send_held()
            if self._bundles:
                self._send_parts(linger=0.0)

    def _comm_round(self, probe: bool, ringing: bool, woken: int) -> tuple[bool, bool, bool, bool]:
        """The comm thread's MPI calls of one round, under ``_mpi_lock``: send
        what is due, take what came.  Returns (active: sent or received,
        rung, got: received, sending: sends still under way)."""
        t = self.transport
        active = False
        with self._lock:
            lingering = self._outbox_since  # results waiting for company since then, 0 if none
            if lingering and time.monotonic() - lingering < RESULT_LINGER and not self._stopping:
                outbox = []  # woken by the first of them: they go when the linger is over
            else:
                outbox, self._outbox = self._outbox, []
                self._outbox_since = 0.0
            busy = self._holds_work()
        if outbox:
            self._send_results(outbox)
            active = True
        elif busy and time.monotonic() - self._last_sent > self._heartbeat_interval:
            with self._lock:
                running = tuple(self._running)
            t.send(MASTER, Kind.HEARTBEAT, Heartbeat(running))
            self._last_sent = time.monotonic()
        if self._bundles:  # a slot runs a bundle: calls done a while ago go now
            active = self._send_parts() or active
        if self._logs is not None and self._logs.records:
            t.send(MASTER, Kind.LOG, self._logs.take())
        rung = t.take_rings() or bool(woken & RUNG)
        # with rings, no message can wait unless one rang: a round woken
        # by a slot's poke (results to send) skips the probes, which
        # cost ~10 us each on MPICH (ch4 polls every netmod)
        got = False
        if probe or rung or not ringing:
            while (message := t.poll()) is not None:
                got = True
                self._handle(*message)
        sending = t.progress(push=not ringing)  # a ringing master says when it took a large send
        return active or got, rung, got, sending

    def _handle(self, peer: int, kind: Kind, record: Any) -> None:
        if kind is Kind.TASKS:
            batch: TaskBatch = record
            executor_id = batch.executor_id or (batch.init.executor_id if batch.init else 0)
            if batch.init is not None:
                self._library.add_initializer(batch.init)
            for item in batch.items:
                self._library.learn(item.fn)  # a bundle's function too
            with self._lock:
                self._queue.extend((item, executor_id) for item in batch.items)
                self._queued_calls += sum(map(_calls, batch.items))
                self._low_water = self._queued_calls // 2
                self._wake_slots()
        elif kind is Kind.STEAL:
            with self._lock:
                given = self._unqueue(set(record.task_ids))
                if self._outbox and self._queue_drained():
                    # results held for company (a slot finished while the stolen
                    # tasks were still queued behind it) go now, as the slot would
                    # have sent them had the steal come first: held, they let the
                    # master think this rank still busy for RESULT_LINGER (a
                    # 160 ms stall, 1 burst in ~40)
                    self._release_outbox()
            self.transport.send(MASTER, Kind.RELEASED, Released(tuple(given)))
        elif kind is Kind.REVOKE:
            self._revoke(set(record.task_ids))
        elif kind is Kind.CONFIG:
            config: Config = record
            self._heartbeat_interval = config.heartbeat_interval
            if self.transport.connect_doorbell(MASTER, config.doorbell):
                self.transport.ring(MASTER)  # so the master learns that this rank's rings arrive
            spec = PoolSpec.from_config(config)
            if self._fixed_slots:
                spec = dataclasses.replace(spec, concurrency=self._fixed_slots)
            with self._lock:
                self._spec = spec
                self._cv.notify_all()
        elif kind is Kind.STOP:
            self._stopping = True
            # tasks still running were given up by the master (a drain's grace ran
            # out): they are cut off, so the rank says Bye in time
            for slot in list(self._slots):
                # a child is killed (its slot sees the socket close and moves
                # on); inline, a signal or an asynchronous exception
                slot.revocation.cut_off()
        else:
            log.warning("rank %d: unexpected message %s from %d", self.rank, kind.name, peer)

    def _unqueue(self, wanted: set[int]) -> list[int]:
        """Under ``_cv``: take the queued, unstarted tasks among ``wanted`` out
        of the queue (a steal, a revoke); returns their ids."""
        given = [q[0].task_id for q in self._queue if q[0].task_id in wanted]
        if given:
            self._queue = collections.deque(q for q in self._queue if q[0].task_id not in wanted)
            self._queued_calls = sum(_calls(q[0]) for q in self._queue)
        return given

    def _revoke(self, wanted: set[int]) -> None:
        """Copies whose other copy won (speculative tasks): those queued go
        back as after a steal, those running are cut off, and their slots
        send the failure as the result, which the master drops.  One that
        finished meanwhile is left alone: its result is on its way."""
        with self._lock:
            given = self._unqueue(wanted)
            running = wanted & self._running
        for slot in list(self._slots):
            for task_id in running:
                slot.revocation.revoke(task_id)  # only the slot that runs it takes it
        if given:
            self.transport.send(MASTER, Kind.RELEASED, Released(tuple(given)))

    # -- the slots -----------------------------------------------------------
    def run(self) -> None:
        """Serve until the master says stop; returns after Bye is sent."""
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(WORKER_SWITCH_INTERVAL)
        comm = start_thread(threading.Thread(target=self._comm_loop, name="taskfarm-comm", daemon=True))
        if self._logs is not None:
            logging.getLogger().addHandler(self._logs)
        try:
            with self._lock:
                while self._spec is None and not self._stopping:
                    self._cv.wait()
                spec = self._spec
            if spec is not None and not self._stopping:
                self._slots = [_Slot(i) for i in range(spec.concurrency)]
                if spec.kind == "solo":
                    slot = self._slots[0]
                    on_main = threading.current_thread() is threading.main_thread()
                    # on the main thread a task is cut off by a signal (`Revocation`)
                    with slot.revocation.installed() if on_main else contextlib.nullcontext():
                        self._serve_slot_or_leave(slot)
                else:
                    threads = [
                        threading.Thread(
                            target=self._serve_slot_or_leave, args=(slot,), name=f"taskfarm-slot-{slot.index}"
                        )
                        for slot in self._slots
                    ]
                    for thread in threads:
                        start_thread(thread)
                    for thread in threads:
                        thread.join()
        finally:
            comm.join()
            self._close_children()
            if self._loop is not None:
                self._loop.close()
            if self._logs is not None:
                logging.getLogger().removeHandler(self._logs)
            sys.setswitchinterval(previous_interval)
        if self._logs is not None and self._logs.records:
            self.transport.send(MASTER, Kind.LOG, self._logs.take())
        if self._outbox:  # finished after Stop (a speculative copy's loser, a drain's straggler)
            self._send_results(self._outbox)
            self._outbox = []
        slot_busy = tuple(slot.busy for slot in self._slots)
        bye = Bye(
            self.tasks,
            sum(slot_busy),
            time.process_time() - self._cpu_started,
            self.task_cpu_time,
            time.monotonic() - self._started,
            spec.kind if spec is not None else "solo",
            slot_busy,
            self.child_restarts,
            self.transport.rings_from(MASTER),
        )
        self.transport.send(MASTER, Kind.BYE, bye)
        self.transport.flush(timeout=10.0)

    def _serve_slot_or_leave(self, slot: _Slot) -> None:
        """`_serve_slot`; if it fails (the farm's own code, or an MPI call the
        slot made itself: a task's failure is its result and never gets here),
        the whole rank stops, comm thread and all, and says Bye, which tells
        the master to resubmit its tasks elsewhere (`taskfarm._intake`); a
        link that is really broken fails that send, and `run` raises.  Before,
        a slot's MPI error ended the rank without a Bye, and any other error
        left the comm thread sending heartbeats for the task the slot had
        held: the master waited on it for good, and the job hung silently."""
        try:
            self._serve_slot(slot)
        except Exception:
            # an MPI call of the slot's own may have failed too: `run` still
            # tries the Bye, and a link that is really broken fails that send
            log.critical(
                "rank %d (%s): the farm's worker loop failed; this rank leaves the farm",
                self.rank,
                self.host,
                exc_info=True,
            )
            self._stop_rank()
        except BaseException:  # KeyboardInterrupt, SystemExit: as before, once the comm thread is told
            self._stop_rank()
            raise

    def _serve_slot(self, slot: _Slot) -> None:
        spec = self._spec
        assert spec is not None
        if spec.kind == "processes":
            self._replace_child(slot)  # every slot starts its child at once, in parallel
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    if self._may_listen():
                        self._listen(slot)
                    else:
                        self._cv.wait()
                if self._stopping:
                    break
                item, executor_id = self._queue.popleft()
                self._queued_calls -= _calls(item)
                self._running.add(item.task_id)
            result = self._run(slot, item, executor_id)
            with self._lock:
                self._running.discard(item.task_id)
                self._outbox.append(result)
                if not self._outbox_since:
                    self._outbox_since = time.monotonic()
                # send now when nothing else is queued, half of what the last
                # refill left is done, or the batch is old or big; otherwise
                # results ride together in one message
                big = _big(result.buffers) or any(_big(part.buffers) for part in result.parts)
                dry = not self._queue
                if (
                    self._queue_drained()
                    or item.urgent
                    or big
                    or len(self._outbox) >= RESULT_BATCH
                    or time.monotonic() - self._outbox_since > RESULT_LINGER
                ):
                    self._release_outbox()
                    wake = True
                else:
                    wake = False
            if wake and not big and self._send_outbox():
                wake = False
            if wake or (dry and not self.transport.rings_from(MASTER)):
                # the comm thread wakes (to send; polling, to poll for this
                # slot's next task at the idle cap) and takes the GIL within the
                # switch interval; no sleep(0) here, which on an oversubscribed
                # node would hand this core to another rank.  A result left to
                # linger needs no poke: while the rank holds work the comm
                # thread sleeps at most RESULT_LINGER, so it wakes in time to
                # send it.  That poke was half the comm thread's wake-ups in a
                # burst of short calls, each taking the GIL from a running task
                self.transport.poke()
            self._maintain(slot)

    def _wake_slots(self) -> None:
        """Under ``_cv``: the queue or ``_stopping`` changed; the slots look."""
        self._cv.notify_all()
        if self._in_listen:
            self.transport.wakeup.poke_listener()

    def _stop_rank(self) -> None:
        """The slots and the comm thread leave (`run` then says Bye): after
        an error in a slot, in the farm's code or in one of its MPI calls, as
        one in the comm thread does (else `run` would wait for it forever)."""
        with self._lock:
            self._stopping = True
            self._wake_slots()
        self.transport.poke()

    def _may_listen(self) -> bool:
        """Under ``_cv``: may an idle slot take the master's rings itself?"""
        return (
            self._listener is None
            and self.transport.wakeup.can_listen()
            and self.transport.rings_from(MASTER)
        )

    def _listen(self, slot: _Slot) -> None:
        """Under ``_cv``, in an idle slot: sleep on the master's rings in the
        comm thread's stead, and take what they announce with a comm round
        of this slot's own; returns when a task is queued or the rank stops.

        The comm thread would take a task, queue it and wake this slot: on an
        idle farm's round trip that hand-off was one more thread wake-up.
        While this slot sleeps here a ring wakes it and not the comm thread
        (`Wakeup.listen`); once it runs a task, rings wake the comm thread
        again, which hears steals and Stop as before.  Nothing needs waking
        when a task starts, which any other way would have cost the task's
        start or idle CPU."""
        t = self.transport
        self._listener = slot
        # as the comm thread's: after a ring whose probe found nothing (here
        # in whole milliseconds, `Wakeup.listen`'s resolution)
        rechecks = Rechecks(RING_RECHECKS)
        try:
            while not self._queue and not self._stopping:
                timeout = rechecks.delay(None)
                self._in_listen = True
                self._cv.release()
                try:
                    woken = t.wakeup.listen(timeout)
                finally:
                    self._cv.acquire()
                    self._in_listen = False
                if self._queue or self._stopping:
                    break
                if woken == POKED:
                    continue  # a poke that found nothing new: the queue was taken already
                self._cv.release()
                try:
                    with self._mpi_lock:
                        _, rung, got, sending = self._comm_round(True, True, woken)
                finally:
                    self._cv.acquire()
                if sending or self._stopping:
                    t.poke()  # the comm thread sees a large send through; or leaves
                rechecks.probed(got, rung)  # a sleep without a timeout had no recheck pending
        finally:
            self._listener = None
            self._cv.notify()  # another idle slot may listen in this one's stead

    def _send_outbox(self) -> bool:
        """From a slot whose results go now: send them itself, unless the comm
        thread is using the transport (False: it is poked instead).  Waking the
        comm thread to send cost an idle farm's round trip two thread
        wake-ups (~220 us of ~1.75 ms here); a large result still goes
        through the comm thread, which sees its send through."""
        if not self._mpi_lock.acquire(blocking=False):
            return False
        try:
            self._send_held()  # another slot's result held meanwhile goes too
            under_way = self.transport.progress(push=False)
        finally:
            self._mpi_lock.release()
        if under_way:
            self.transport.poke()  # the comm thread progresses what MPI has not taken yet
        return True

    def _send_held(self) -> None:
        """Under ``_mpi_lock``: every result held for company goes now."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
            self._outbox_since = 0.0
        if outbox:
            self._send_results(outbox)

    def _send_results(self, outbox: list[ResultItem]) -> None:
        """Send ``outbox`` to the master, under ``_mpi_lock`` (or once no other
        thread is left); a heartbeat is due only a whole interval after it."""
        self.transport.send(MASTER, Kind.RESULTS, ResultBatch(tuple(outbox)))
        self._last_sent = time.monotonic()

    def _send_parts(self, linger: float = RESULT_LINGER) -> bool:
        """Under ``_mpi_lock``, in the comm thread's round: the calls of running
        bundles that ended ``linger`` seconds ago or more go now (`Kind.PARTS`),
        not when their bundle ends: a long call after them would hold them
        back, and a drain that cut it off would lose them.  True if sent."""
        due = time.time() - linger
        items = []
        for task_id, (attempt, progress) in list(self._bundles.items()):
            if 0.0 < progress.waiting_since() <= due:
                parts, values = progress.take()
                if parts or values is not None:
                    items.append(ResultItem(task_id, attempt, True, b"", (), "", 0.0, 0.0, False, tuple(parts), values))
        if items:
            self.transport.send(MASTER, Kind.PARTS, ResultBatch(tuple(items)))
            self._last_sent = time.monotonic()
        return bool(items)

    def _queue_drained(self) -> bool:
        """Under ``_cv``: nothing queued, or half of what the last refill (or
        send) left is done; held results need wait no longer."""
        return not self._queue or self._queued_calls <= self._low_water

    def _release_outbox(self) -> None:
        """Under ``_cv``: the held results go now (the slot sends them itself,
        or the comm thread at its next round: see `_send_outbox`).  The next
        go once half of what is queued now is done, unless a refill comes
        first: the master may not refill at once (the pipeline it keeps
        follows the mean task time, which a long task can raise)."""
        self._outbox_since = 0.0
        self._low_water = self._queued_calls // 2

    def _run(self, slot: _Slot, item: TaskItem, executor_id: int) -> ResultItem:
        spec = self._spec
        assert spec is not None
        if item.parts:
            return self._run_bundle(slot, item, executor_id)
        isolation = item.isolation or ("process" if spec.kind == "processes" else "inline")
        if isolation == "process":
            head = self._head(item.attempt, ", in a child process")
            outcome = self._run_in_child(slot, item, executor_id, head)
        else:
            head = self._head(item.attempt)
            library = self._library
            outcome = execute(
                lambda: library.function(item.fn.digest),
                item.call,
                item.buffers,
                item.deps,
                item.time_limit,
                head,
                init_error=library.init_error(executor_id),
                loop=self._event_loop() if spec.kind == "threads" else None,
                revocation=slot.revocation,
                task_id=item.task_id,
            )
        slot.busy += outcome.t_end - outcome.t_start
        with self._lock:
            self.tasks += 1
            if isolation != "process":
                self.task_cpu_time += outcome.cpu
        return ResultItem(
            item.task_id,
            item.attempt,
            outcome.ok,
            outcome.payload,
            outcome.buffers,
            outcome.traceback,
            outcome.t_start,
            outcome.t_end,
            outcome.crashed,
        )

    def _run_bundle(self, slot: _Slot, item: TaskItem, executor_id: int) -> ResultItem:
        """A bundle's calls, one after another in this slot, each with its own outcome."""
        spec = self._spec
        assert spec is not None
        head = self._head(item.attempt)
        library = self._library
        init_error = library.init_error(executor_id)
        loop = self._event_loop() if spec.kind == "threads" else None
        t_start = time.time()
        cpu0 = time.thread_time()  # of all the calls together (a thread's CPU clock is a system call)
        digest = item.fn.digest
        progress = BundleProgress()
        self._bundles[item.task_id] = (item.attempt, progress)
        try:
            parts, values = execute_parts(
                item.parts,
                lambda: library.function(digest),
                head,
                init_error=init_error,
                loop=loop,
                progress=progress,
                revocation=slot.revocation,  # a drain's Stop cuts the bundle off
                task_id=item.task_id,
            )
        finally:
            del self._bundles[item.task_id]
        cpu = time.thread_time() - cpu0
        t_end = time.time()
        slot.busy += t_end - t_start
        with self._lock:
            self.tasks += len(item.parts)
            self.task_cpu_time += cpu
        return ResultItem(item.task_id, item.attempt, True, b"", (), "", t_start, t_end, False, tuple(parts), values)

    def _head(self, attempt: int, where: str = "") -> str:
        """The head of a traceback from a task's ``attempt`` here, made once
        per attempt number: it names the pid, a system call (one per task
        on an idle farm's round trip, run cold)."""
        key = (attempt, where)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = traceback_head(self.rank, self.host, attempt, where)
        return head

    def _event_loop(self) -> EventLoop:
        with self._loop_lock:
            if self._loop is None:
                self._loop = EventLoop()
            return self._loop

    # -- child processes ---------------------------------------------------
    def _run_in_child(self, slot: _Slot, item: TaskItem, executor_id: int, head: str) -> Outcome:
        child = slot.child
        if child is None or not child.alive():
            try:
                child = self._replace_child(slot)
            except BrokenFarmError as exc:
                return lost(f"{exc}", head, time.time())
        # a Revoke, or Stop after a drain's grace, kills the child (`_handle`)
        slot.revocation.begin(item.task_id, cut=lambda: child.kill(close=False))
        try:
            if self._stopping:
                # Stop came while this slot took the task or started its child, and
                # found nothing to cut off: cut this one off as Stop does (it ends
                # the slot's wait below); the master has given up on the task
                child.kill(close=False)
            outcome = child.run(item, executor_id, head)
        finally:
            slot.revocation.end()
        if not child.alive():  # crashed, or killed at its time limit
            slot.child = None
        return outcome

    def _replace_child(self, slot: _Slot) -> Child:
        if slot.child is not None:
            slot.child.close()
            slot.child = None
        if slot.children_started:
            with self._lock:
                self.child_restarts += 1
        slot.children_started += 1
        slot.child = Child(self._library, self.rank, self.host)
        return slot.child

    def _maintain(self, slot: _Slot) -> None:
        """Between tasks: recycle a child that reached its limits; replace a dead one."""
        spec = self._spec
        assert spec is not None
        if self._stopping:
            return
        child = slot.child
        if child is not None and (
            (spec.max_tasks_per_child is not None and child.tasks >= spec.max_tasks_per_child)
            or (spec.max_memory_per_child is not None and child.rss > spec.max_memory_per_child)
        ):
            child.close()
            slot.child = None  # the next isolated task starts a fresh one (counted as a restart)
        if slot.child is None and spec.kind == "processes":
            try:
                self._replace_child(slot)
            except BrokenFarmError as exc:
                log.warning("rank %d: %s", self.rank, exc)

    def _close_children(self) -> None:
        children = [slot.child for slot in self._slots if slot.child is not None]
        for child in children:
            with contextlib.suppress(OSError):
                child.conn.close()
        for child in children:
            child.close()


def serve(transport: Transport) -> None:
    """Run the worker loop on this rank until the master ends the farm."""
    Worker(transport).run()


def serve_in_thread(transport: Transport) -> threading.Thread:
    """Rank 0's own worker (``master_works``): one slot, in a thread of the master's process."""
    worker = Worker(transport, slots=1, forward_logs=False)
    return start_thread(threading.Thread(target=worker.run, name="taskfarm-rank0-worker", daemon=True))
