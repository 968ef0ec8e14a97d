"""The loop on a worker rank: receive tasks, run them, send results back.

Two threads share the work::

    comm thread (owns every MPI call)          main thread (runs the tasks)
      Hello ->                                    |
      <- Config / TaskBatch / Steal / Stop        |
      TaskBatch: queue the items  ------------>  queue --> run --> outbox
      Steal: hand back queued, unstarted items    |                  |
      results in the outbox: send at once  <--------------------------+
      heartbeat while any task is held
      Stop: Bye (own figures), leave

Tasks run on the main thread so that an inline ``time_limit`` can interrupt
Python code with SIGALRM, and libraries that insist on the main thread work.
The comm thread sleeps on a condition variable between polls (with bounded
backoff), so an idle worker costs a fraction of a percent of a core and a
finished result is sent without waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from . import _serialization as ser
from ._errors import BrokenFarmError, TimeLimitExceeded
from ._protocol import (
    PROTOCOL_VERSION,
    Bye,
    Config,
    Heartbeat,
    Hello,
    Kind,
    Released,
    ResultBatch,
    ResultItem,
    TaskBatch,
    TaskItem,
)
from ._transport import MASTER, Backoff, Transport, host

log = logging.getLogger("taskfarm.worker")

#: longest sleep of an idle worker between polls for new tasks (seconds):
#: the latency of the first task on an idle farm against idle CPU
IDLE_POLL_CAP = 0.002
#: heartbeat period until the master's Config says otherwise
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: results sent in one message at most, while more tasks are queued
RESULT_BATCH = 64
#: how long a finished result may wait for company while more tasks are queued
RESULT_LINGER = 0.0005
#: GIL switch interval on workers, so the comm thread sends a finished result
#: within this many seconds even while the next task holds the GIL
WORKER_SWITCH_INTERVAL = 0.001


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeLimitExceeded in the running task after ``seconds`` (main thread only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"task exceeded its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Worker:
    """One worker rank's state: its queue, outbox, function cache and figures."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.rank = transport.rank
        self.host = host()
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[TaskItem, int]] = collections.deque()
        self._outbox: list[ResultItem] = []
        self._outbox_since = 0.0  # when the oldest unsent result was made, 0 if none waits
        self._running: set[int] = set()
        self._stopping = False
        self._functions: dict[bytes, Callable[..., Any]] = {}
        self._inits_done: dict[int, BaseException | None] = {}
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.tasks = 0
        self.busy_time = 0.0
        self.task_cpu_time = 0.0
        self._started = time.monotonic()

    # -- comm thread -------------------------------------------------------
    def _comm_loop(self) -> None:
        t = self.transport
        t.send(MASTER, Kind.HELLO, Hello(PROTOCOL_VERSION, self.host, os.getpid(), 1))
        backoff = Backoff(IDLE_POLL_CAP)
        last_beat = time.monotonic()
        try:
            while True:
                active = False
                with self._cv:
                    outbox, self._outbox = self._outbox, []
                    self._outbox_since = 0.0
                    busy = bool(self._running or self._queue)
                if outbox:
                    t.send(MASTER, Kind.RESULTS, ResultBatch(tuple(outbox)))
                    active = True
                    last_beat = time.monotonic()
                elif busy and time.monotonic() - last_beat > self._heartbeat_interval:
                    with self._cv:
                        running = tuple(self._running)
                    t.send(MASTER, Kind.HEARTBEAT, Heartbeat(running))
                    last_beat = time.monotonic()
                while (message := t.poll()) is not None:
                    active = True
                    self._handle(*message)
                sending = t.progress()
                if self._stopping:
                    break
                if active:
                    backoff.reset()
                elif not sending:
                    delay = backoff.next()
                    if delay:
                        with self._cv:
                            if not self._outbox or self._outbox_since:
                                self._cv.wait(delay)
                    else:
                        time.sleep(0)
        finally:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()

    def _handle(self, peer: int, kind: Kind, record: Any) -> None:
        if kind is Kind.TASKS:
            batch: TaskBatch = record
            with self._cv:
                if batch.init is not None and batch.init.executor_id not in self._inits_done:
                    self._queue.append((batch.init, -1))  # type: ignore[arg-type]
                for item in batch.items:
                    self._queue.append((item, batch.init.executor_id if batch.init else 0))
                self._cv.notify_all()
        elif kind is Kind.STEAL:
            wanted = set(record.task_ids)
            with self._cv:
                kept = collections.deque(q for q in self._queue if q[0].task_id not in wanted or q[1] < 0)
                given = [q[0].task_id for q in self._queue if q[0].task_id in wanted and q[1] >= 0]
                self._queue = kept
            self.transport.send(MASTER, Kind.RELEASED, Released(tuple(given)))
        elif kind is Kind.CONFIG:
            config: Config = record
            self._heartbeat_interval = config.heartbeat_interval
        elif kind is Kind.STOP:
            self._stopping = True
        else:
            log.warning("rank %d: unexpected message %s from %d", self.rank, kind.name, peer)

    # -- main thread -------------------------------------------------------
    def run(self) -> None:
        """Serve until the master says stop; returns after Bye is sent."""
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(WORKER_SWITCH_INTERVAL)
        comm = threading.Thread(target=self._comm_loop, name="taskfarm-comm", daemon=True)
        comm.start()
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    item, executor_id = self._queue.popleft()
                    if executor_id >= 0:
                        self._running.add(item.task_id)
                if executor_id < 0:
                    self._run_initializer(item)
                    continue
                result = self._execute(item, executor_id)
                with self._cv:
                    self._running.discard(item.task_id)
                    self._outbox.append(result)
                    if not self._outbox_since:
                        self._outbox_since = time.monotonic()
                    # send now when nothing else is queued or the batch is old or big;
                    # otherwise results ride together in one message
                    if (
                        not self._queue
                        or len(self._outbox) >= RESULT_BATCH
                        or time.monotonic() - self._outbox_since > RESULT_LINGER
                    ):
                        self._outbox_since = 0.0
                        self._cv.notify_all()
                        wake = True
                    else:
                        wake = False
                if wake:
                    time.sleep(0)  # let the comm thread take the GIL and send them
        finally:
            comm.join()
            sys.setswitchinterval(previous_interval)
        cpu = time.process_time()
        bye = Bye(self.tasks, self.busy_time, cpu, self.task_cpu_time, time.monotonic() - self._started)
        self.transport.send(MASTER, Kind.BYE, bye)
        self.transport.flush(timeout=10.0)

    def _run_initializer(self, init: Any) -> None:
        try:
            fn = self._function(init.fn)
            args, _ = ser.loads(init.call)
            fn(*args)
            self._inits_done[init.executor_id] = None
        except BaseException as exc:  # noqa: BLE001 - reported to the master per task
            self._inits_done[init.executor_id] = exc

    def _function(self, ref: Any) -> Callable[..., Any]:
        fn = self._functions.get(ref.digest)
        if fn is None:
            if ref.payload is None:
                raise BrokenFarmError("worker lost its function cache entry")  # a protocol bug
            fn = ser.loads(ref.payload)
            self._functions[ref.digest] = fn
        return fn  # type: ignore[no-any-return]

    def _execute(self, item: TaskItem, executor_id: int) -> ResultItem:
        t_start = time.time()
        cpu0 = time.thread_time()
        try:
            init_error = self._inits_done.get(executor_id)
            if init_error is not None:
                raise BrokenFarmError(
                    f"the executor's initializer failed on rank {self.rank}: {init_error!r}"
                ) from init_error
            fn = self._function(item.fn)
            deps = None
            if item.deps:
                deps = {task_id: ser.loads(data, bufs) for task_id, data, bufs in item.deps}
            args, kwargs = ser.loads(item.call, item.buffers, deps)
            with _time_limit(item.time_limit):
                value = fn(*args, **kwargs)
                if inspect.isawaitable(value):
                    value = asyncio.run(_await(value))
            payload, buffers = ser.dumps(value, "result")
            ok, tb = True, ""
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a task's failure is its result
            ok = False
            tb = self._traceback(exc, item.attempt)
            payload, buffers = ser.dumps_exception(exc)
        t_end = time.time()
        self.tasks += 1
        self.busy_time += t_end - t_start
        self.task_cpu_time += time.thread_time() - cpu0
        return ResultItem(
            item.task_id, item.attempt, ok, payload, buffers, tb, t_start, t_end, False
        )

    def _traceback(self, exc: BaseException, attempt: int) -> str:
        head = (
            f"Traceback on rank {self.rank} (host {self.host}, pid {os.getpid()}), "
            f"attempt {attempt}:\n"
        )
        return head + "".join(traceback.format_exception(exc))


async def _await(awaitable: Any) -> Any:
    return await awaitable


def serve(transport: Transport) -> None:
    """Run the worker loop on this rank until the master ends the farm."""
    Worker(transport).run()
