"""How a worker rank runs its tasks: inline, in threads, or in child processes.

A worker rank has ``concurrency`` *slots*; each runs one task at a time.  The
pool decides what a slot is::

    pool        a slot is                      time_limit                  a crash of the task
    ---------   ----------------------------   -------------------------   -------------------
    solo        the rank's main thread (K=1)   SIGALRM, raised in Python   ends the rank
    threads     a thread of the rank           async exception, in Python  ends the rank
    processes   a child process of the rank    the child is killed         WorkerLostError, the
                (kept across tasks)                                        slot starts a new child

A task can also ask for its own isolation (``Task(isolation="process")``): in
a solo or threads pool it then runs in a child process of its slot, started
when first needed and reused; ``isolation="inline"`` runs a task of a
processes pool in the slot's thread.  One mechanism, `Child`, serves both.

``async def`` tasks: in the solo pool each runs to completion with
`asyncio.run`; in the threads pool every slot hands its coroutine to one event
loop of the rank (so up to K coroutines of the rank run at once on that loop);
in a child process each task gets `asyncio.run`.  Their time limit is
cancellation (`asyncio.wait`), not a signal.

Children and MPI: forking a process that has initialised MPI is unsafe on some
fabrics (InfiniBand registered memory is shared copy-on-write).  A child is
therefore never a fork of the rank: it is a fresh interpreter started with
`subprocess` (``vfork`` + ``exec`` on Linux, so no page of the rank is ever
copied), told not to initialise MPI (``mpi4py.rc.initialize = False``), and
stripped of the launcher's PMI variables.  It talks to its rank over a socket
pair, dies with its rank (``PR_SET_PDEATHSIG``), and lives in its own process
group so that killing it also kills what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from . import _serialization as ser
from ._errors import BrokenFarmError, TimeLimitExceeded, WorkerLostError
from ._protocol import Config, FnRef, Initializer, Part, PartResult, PartValues, TaskItem
from ._signals import start_thread

#: the pools, by name
POOLS = ("solo", "threads", "processes")
#: per-task isolation values (None: the pool's own way)
ISOLATIONS = ("inline", "process")
#: environment variable set in every child process (``"1"``)
CHILD_ENV = "TASKFARM_CHILD"
#: launcher variables a child must not see: with them an accidental MPI_Init
#: in a task would try to join the job as the rank's twin
_LAUNCHER_VARIABLES = re.compile(r"^(PMI_|PMIX_|OMPI_COMM_WORLD_|OMPI_UNIVERSE_SIZE|MPI_LOCAL|HYDI_|HYDRA_)")
#: how long a child that is asked to leave may take before it is killed
CHILD_EXIT_TIMEOUT = 2.0
#: how long a child may take to start and say hello
CHILD_START_TIMEOUT = 60.0
#: how long after a child's socket closes its exit status may take to appear
CHILD_REAP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


# -- configuration --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A farm's pool setting; the master sends it to every worker in `Config`.

    ``max_memory_per_child`` is in bytes of resident memory (RSS) measured
    after each task; ``max_tasks_per_child`` counts tasks.  Either recycles a
    child between tasks (processes pool, or tasks with isolation="process").
    """

    kind: str = "solo"
    concurrency: int = 1
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None

    @classmethod
    def make(
        cls,
        pool: str | None = None,
        concurrency: int | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
    ) -> PoolSpec:
        """Validate user options: ``pool`` defaults to solo, or threads when concurrency > 1."""
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ValueError(f"concurrency must be a whole number >= 1, not {concurrency!r}")
        if pool is None:
            pool = "threads" if concurrency is not None and concurrency > 1 else "solo"
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; not {pool!r}")
        if pool == "solo" and concurrency not in (None, 1):
            raise ValueError("pool='solo' runs one task at a time; use 'threads' or 'processes' for concurrency > 1")
        limits = (("max_tasks_per_child", max_tasks_per_child), ("max_memory_per_child", max_memory_per_child))
        for name, value in limits:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or None), not {value!r}")
        return cls(pool, concurrency or 1, max_tasks_per_child, max_memory_per_child)

    @classmethod
    def from_config(cls, config: Config) -> PoolSpec:
        return cls(config.pool, config.concurrency, config.max_tasks_per_child, config.max_memory_per_child)

    def config(self, heartbeat_interval: float) -> Config:
        return Config(
            heartbeat_interval, self.kind, self.concurrency, self.max_tasks_per_child, self.max_memory_per_child
        )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"2G"``, ``"500M"``, ``"64k"``, ``"1.5GiB"`` or a plain number of bytes.

    Suffixes are binary (K = 1024), as ``ulimit`` and Slurm's ``--mem`` use them.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (say 2G, 500M, 64K or bytes)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))
    if value < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return value


# -- running one call, anywhere -------------------------------------------------------
class _AsyncTimeLimit(TimeLimitExceeded):
    """Raised in a slot thread by the time limit's timer (an asynchronous exception)."""


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Make ``exc`` raise in thread ``thread_id`` at its next bytecode; None withdraws it."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


def _limit_message(seconds: float) -> str:
    return f"task exceeded its time limit of {seconds:g} s"


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[list[bool]]:
    """Raise TimeLimitExceeded in the main thread after ``seconds`` (SIGALRM).

    Yields a list that holds True once the alarm went off (the task may have
    caught the exception and carried on).
    """
    fired = [False]

    def on_alarm(signum: int, frame: Any) -> None:
        fired[0] = True
        raise TimeLimitExceeded(_limit_message(seconds))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _ThreadAlarm:
    """Raise TimeLimitExceeded in this (non-main) thread after ``seconds``.

    CPython checks for an asynchronous exception between bytecodes, so Python
    code is stopped promptly; a blocking call (``time.sleep``, a socket read,
    C code) is stopped only when it returns to Python.
    """

    def __init__(self, seconds: float) -> None:
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._active = True
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        start_thread(self._timer)

    def _fire(self) -> None:
        with self._lock:
            if self._active:
                self.fired = True
                _set_async_exc(self._thread_id, _AsyncTimeLimit)

    def end(self) -> None:
        """Disarm; a pending exception not raised yet is withdrawn (or raised here)."""
        self._timer.cancel()
        with self._lock:
            self._active = False
            if self.fired:
                _set_async_exc(self._thread_id, None)


#: the signal that cuts off a revoked task on the main thread (`Revocation`):
#: not one of the drain's signals, which worker ranks ignore (`taskfarm._cli`)
REVOKE_SIGNAL = signal.SIGUSR2
#: how often a cut-off sends that signal again until the task's Python has
#: taken it (seconds): Python runs a handler only at its next bytecode, so a
#: signal that lands just before the task enters a blocking call (a task's
#: ``time.sleep`` right after it started) is taken only when that call returns;
#: the next signal interrupts the call (4 in 6 runs of the unit test missed
#: a 30 s sleep's cut-off without it)
REVOKE_RESEND_SECONDS = 0.05


class _Revoked(BaseException):
    """Raised in a task cut off: its other copy won (a speculative task), or
    a drain's grace ran out.  A BaseException, so that the task's own
    ``except Exception`` lets it pass.  The master drops the outcome."""


class Revocation:
    """Lets another thread cut off the task a slot runs: its other copy won,
    or a drain's grace ran out (`cut_off`).

    A task on the main thread (the solo pool) is interrupted by
    `REVOKE_SIGNAL`, even inside a blocking call such as ``time.sleep``, once
    `installed`; one in a slot thread by an asynchronous exception, at its
    next Python bytecode; one in a child process by killing the child (the
    ``cut`` given to `begin`).  C code that never returns to Python runs on
    to its end in a thread.  A revocation names its task, so one that comes
    late never touches the slot's next task.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task = 0  # the task running between `begin` and `end`, 0 between tasks
        self._thread = 0
        self._cut: Callable[[], None] | None = None
        self._signalled = False  # REVOKE_SIGNAL's handler is ours (`installed`)
        self._async = False  # the last cut-off was an asynchronous exception
        self._raised = False  # REVOKE_SIGNAL's handler raised for the last cut-off
        self.fired = False

    def begin(self, task_id: int, cut: Callable[[], None] | None = None) -> None:
        """In the slot's thread, as ``task_id`` starts; ``cut`` ends it from outside."""
        with self._lock:
            self._task, self._thread, self._cut, self.fired = task_id, threading.get_ident(), cut, False

    def end(self) -> None:
        """In the slot's thread, as the task ends: a revocation now comes too late."""
        with self._lock:
            self._task = 0
            self._cut = None
            if self.fired and self._async:
                _set_async_exc(self._thread, None)  # not raised yet: withdrawn

    def revoke(self, task_id: int) -> bool:
        """From another thread: cut ``task_id`` off if the slot still runs it."""
        with self._lock:
            return self._task == task_id and self._fire()

    def cut_off(self) -> bool:
        """From another thread: cut off the task the slot runs, if any."""
        with self._lock:
            return bool(self._task) and self._fire()

    def _fire(self) -> bool:
        """Under the lock, a task running: cut it off (once)."""
        if self.fired:
            return False
        self.fired = True
        self._async = False
        if self._cut is not None:
            self._cut()
        elif self._on_main_thread() and self._signalled:
            self._raised = False
            signal.pthread_kill(self._thread, REVOKE_SIGNAL)
            start_thread(threading.Thread(target=self._resend, args=(self._task,), name="taskfarm-revoke", daemon=True))
        else:
            self._async = True
            _set_async_exc(self._thread, _Revoked)
        return True

    def _resend(self, task_id: int) -> None:
        """`REVOKE_SIGNAL` again every `REVOKE_RESEND_SECONDS`, until the
        handler has raised or task ``task_id`` has ended."""
        while True:
            time.sleep(REVOKE_RESEND_SECONDS)
            with self._lock:
                if self._raised or not self.fired or self._task != task_id or not self._signalled:
                    return
                signal.pthread_kill(self._thread, REVOKE_SIGNAL)

    def _on_main_thread(self) -> bool:
        return self._thread == threading.main_thread().ident

    def _on_signal(self, signum: int, frame: Any) -> None:
        # no lock here: the main thread may hold it in `begin` or `end`.  Once
        # per cut-off: a signal sent again meanwhile finds it raised already
        if self.fired and self._task and not self._raised:
            self._raised = True
            raise _Revoked(f"task {self._task} cut off: its other copy finished first, or the farm stopped")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """On the main thread, for as long as it serves as a slot: the signal's handler."""
        previous = signal.signal(REVOKE_SIGNAL, self._on_signal)
        self._signalled = True
        try:
            yield
        finally:
            self._signalled = False
            signal.signal(REVOKE_SIGNAL, previous)


#: result types that are never awaitable: `call_limited` skips the (ABC) check for them
_NOT_AWAITABLE = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict})


def call_limited(fn: Callable[..., Any], args: Any, kwargs: Any, seconds: float | None, loop: EventLoop | None) -> Any:
    """``fn(*args, **kwargs)``, awaited if it returns an awaitable, within ``seconds``.

    The sync part is bounded by SIGALRM on the main thread and by an
    asynchronous exception elsewhere; an awaitable by cancellation.  An
    awaitable runs on ``loop`` when given (the threads pool's shared loop),
    else with `asyncio.run`.
    """
    start = time.monotonic()
    if seconds is None:
        value = fn(*args, **kwargs)
    elif threading.current_thread() is threading.main_thread():
        with _alarm(seconds) as fired:
            value = fn(*args, **kwargs)
        if fired[0]:  # the task caught the exception and carried on
            raise TimeLimitExceeded(_limit_message(seconds))
    else:
        alarm = _ThreadAlarm(seconds)
        try:
            try:
                value = fn(*args, **kwargs)
            finally:
                alarm.end()
        except _AsyncTimeLimit:
            raise TimeLimitExceeded(_limit_message(seconds)) from None
        if alarm.fired:  # the task caught the exception and carried on
            raise TimeLimitExceeded(_limit_message(seconds))
    if type(value) not in _NOT_AWAITABLE and inspect.isawaitable(value):
        remaining = None if seconds is None else max(0.0, seconds - (time.monotonic() - start))
        value = _awaited(value, remaining, seconds, loop)
    return value


def _awaited(awaitable: Any, remaining: float | None, seconds: float | None, loop: EventLoop | None) -> Any:
    coro = _bounded(awaitable, remaining, seconds)
    if loop is not None:
        return loop.run(coro)
    return asyncio.run(coro)


async def _bounded(awaitable: Any, remaining: float | None, seconds: float | None) -> Any:
    if remaining is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=remaining)
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait({task}, timeout=1.0)
        raise TimeLimitExceeded(_limit_message(seconds or 0.0))
    return task.result()


class EventLoop:
    """One asyncio loop in a thread of its own; slots hand it their coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = start_thread(threading.Thread(target=self._serve, name="taskfarm-asyncio", daemon=True))

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)


class Outcome(NamedTuple):
    """What running one task produced (the worker turns it into a ResultItem)."""

    ok: bool
    payload: bytes
    buffers: tuple[Any, ...]
    traceback: str
    t_start: float
    t_end: float
    cpu: float  # CPU seconds of the thread that ran it
    crashed: bool = False


def traceback_head(rank: int, host: str, attempt: int, where: str = "") -> str:
    return f"Traceback on rank {rank} (host {host}, pid {os.getpid()}{where}), attempt {attempt}:\n"


def execute(
    fn: Callable[[], Callable[..., Any]],
    call: bytes | tuple[Any, ...],
    buffers: tuple[Any, ...],
    deps: tuple[tuple[int, bytes, tuple[Any, ...]], ...],
    time_limit: float | None,
    head: str,
    *,
    init_error: BaseException | None = None,
    loop: EventLoop | None = None,
    revocation: Revocation | None = None,
    task_id: int = 0,
) -> Outcome:
    """Load and run one task; its failure (an exception) is its outcome, never raised.

    With ``revocation``, another thread can cut the call off (`Revocation`).
    """
    t_start = time.time()
    cpu0 = time.thread_time()
    try:
        _check_initialized(init_error)
        function = fn()
        values = {dep: ser.loads(data, bufs) for dep, data, bufs in deps} if deps else None
        if isinstance(call, tuple):  # scalar arguments, as they are (`TaskItem.call`)
            args, kwargs = call, {}
        else:
            args, kwargs = ser.loads(call, buffers, values)
        if revocation is None:
            value = call_limited(function, args, kwargs, time_limit, loop)
        else:
            # inside the ``try``: a revocation that lands as the call returns
            # is still this task's failure, never the slot's
            revocation.begin(task_id)
            try:
                value = call_limited(function, args, kwargs, time_limit, loop)
            finally:
                revocation.end()
        payload, out = ser.dumps(value, "result")
        ok, tb = True, ""
    except BaseException as exc:  # noqa: BLE001 - a task's failure is its result
        ok = False
        payload, out, tb = _failure(exc, head)
    return Outcome(ok, payload, out, tb, t_start, time.time(), time.thread_time() - cpu0)


def _check_initialized(init_error: BaseException | None) -> None:
    if init_error is not None:
        raise BrokenFarmError(f"the executor's initializer failed: {init_error!r}") from init_error


def _failure(exc: BaseException, head: str) -> tuple[bytes, tuple[Any, ...], str]:
    """A failed call's payload, buffers and traceback text."""
    payload, buffers = ser.dumps_exception(exc)
    return payload, buffers, head + "".join(traceback.format_exception(exc))


class BundleProgress:
    """The calls of a running bundle that are done: `execute_parts` adds
    each as it ends, and `take` hands out those not yet taken, once each.

    A bundle's results used to go back together once its last call was
    done: a call much longer than the others held back the results of the
    calls before it (and their journal records), and a drain that cut the
    bundle off lost them.  The worker's comm thread now takes and sends
    what has waited `taskfarm._worker.RESULT_LINGER` (`Kind.PARTS`); the slot
    takes the rest when the bundle ends."""

    __slots__ = ("_lock", "_taken_results", "_taken_values", "ends", "results", "starts", "task_ids", "values")

    def __init__(self) -> None:
        # the columns of `PartValues`; a call's ``ends`` entry is added last,
        # so ``len(ends)`` calls are whole in every column
        self.task_ids: list[int] = []
        self.values: list[Any] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.results: list[PartResult] = []
        self._taken_values = 0
        self._taken_results = 0
        self._lock = threading.Lock()

    def waiting_since(self) -> float:
        """When the oldest call not yet taken ended (``time.time()``), 0.0 if none."""
        ends, results = self.ends, self.results
        since = ends[self._taken_values] if len(ends) > self._taken_values else 0.0
        if len(results) > self._taken_results:
            ended = results[self._taken_results].t_end
            since = min(since, ended) if since else ended
        return since

    def take(self) -> tuple[list[PartResult], PartValues | None]:
        """The calls done and not yet taken (any thread; each call once)."""
        with self._lock:
            n, m = len(self.ends), len(self.results)
            first, self._taken_values = self._taken_values, n
            results = self.results[self._taken_results : m]
            self._taken_results = m
        if first == n:
            return results, None
        columns = (self.task_ids[first:n], self.values[first:n], self.starts[first:n], self.ends[first:n])
        return results, PartValues(*columns)


def execute_parts(
    parts: Sequence[Part],
    function: Callable[[], Callable[..., Any]],
    head: str,
    *,
    init_error: BaseException | None = None,
    loop: EventLoop | None = None,
    progress: BundleProgress | None = None,
    revocation: Revocation | None = None,
    task_id: int = 0,
) -> tuple[list[PartResult], PartValues | None]:
    """A bundle's calls, one after another, each with its own outcome, as
    `execute` would give it: calls that returned a value of a plain type go
    in the `PartValues` (None if there are none), the others each get a
    `PartResult`.  With ``progress``, each call is added there as it ends,
    and what is returned is what another thread has not taken meanwhile.

    Bundled calls have no time limit, inputs or out-of-band buffers, and a
    part is a few microseconds of the farm's own Python around a short call:
    this loop does only what they need (half of `execute`'s cost per call
    here), and one clock reading ends a call and starts the next.

    With ``revocation`` (bundle ``task_id``), another thread can cut the
    bundle off (a drain): the call it lands in fails, the rest never run.
    """
    done = progress if progress is not None else BundleProgress()
    t_start = time.time()
    try:  # one function per bundle: loaded (or found wanting) once, not per call
        _check_initialized(init_error)
        fn = function()
    except BaseException as exc:  # noqa: BLE001 - every call fails with it, as each would alone
        payload, buffers, tb = _failure(exc, head)
        t_end = time.time()
        done.results.extend(PartResult(part.task_id, False, payload, buffers, tb, t_start, t_end) for part in parts)
        return done.take()
    if revocation is not None:
        revocation.begin(task_id)
    try:
        _run_parts(parts, fn, head, loop, done, t_start)
    except _Revoked:  # it landed between two calls: the bundle ends there
        pass
    finally:
        if revocation is not None:
            with contextlib.suppress(_Revoked):  # it landed as the bundle ended
                revocation.end()
    return done.take()


def _run_parts(
    parts: Sequence[Part],
    fn: Callable[..., Any],
    head: str,
    loop: EventLoop | None,
    done: BundleProgress,
    t_start: float,
) -> None:
    """`execute_parts`' loop, from ``t_start``: each call's outcome into ``done``."""
    results, task_ids, values, starts, ends = done.results, done.task_ids, done.values, done.starts, done.ends
    loads, dumps, now, plain = ser.loads, ser.dumps, time.time, ser.value_types()
    for part in parts:
        try:
            call = part.call
            if isinstance(call, bytes):
                args, kwargs = loads(call)
                value = fn(*args, **kwargs)
            else:  # scalars, not pickled (see `Part`)
                value = fn(*call)
            if type(value) in plain:  # the usual case: no pickle of its own, no record (`ser.value_types`)
                t_end = now()
                task_ids.append(part.task_id)
                values.append(value)
                starts.append(t_start)
                ends.append(t_end)  # last: the call is whole in every column (`BundleProgress`)
                t_start = t_end
                continue
            if type(value) not in _NOT_AWAITABLE and inspect.isawaitable(value):
                value = _awaited(value, None, None, loop)
            payload, buffers = dumps(value, "result")
            ok, tb = True, ""
        except _Revoked as exc:  # the bundle is cut off (a drain): the calls after this one never run
            payload, buffers, tb = _failure(exc, head)
            results.append(PartResult(part.task_id, False, payload, buffers, tb, t_start, now()))
            break
        except BaseException as exc:  # noqa: BLE001 - a call's failure is its result
            ok = False
            payload, buffers, tb = _failure(exc, head)
        t_end = now()
        results.append(PartResult(part.task_id, ok, payload, buffers, tb, t_start, t_end))
        t_start = t_end


def lost(message: str, head: str, t_start: float, *, crashed: bool = True) -> Outcome:
    """The outcome of a task whose process died (or was killed)."""
    error: BaseException = WorkerLostError(message) if crashed else TimeLimitExceeded(message)
    payload, buffers = ser.dumps_exception(error)
    return Outcome(False, payload, buffers, head + message + "\n", t_start, time.time(), 0.0, crashed)


# -- the rank's own state: functions, initializers --------------------------------------
class Library:
    """A worker's functions (by digest) and executor initializers, shared by its slots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.payloads: dict[bytes, bytes] = {}
        self._functions: dict[bytes, Callable[..., Any]] = {}
        self.initializers: dict[int, Initializer] = {}
        self._init_errors: dict[int, BaseException | None] = {}
        self._init_locks: dict[int, threading.Lock] = {}

    def learn(self, ref: FnRef) -> None:
        """Keep a shipped function's bytes (children load them too)."""
        if ref.payload is not None:
            self.payloads.setdefault(ref.digest, ref.payload)

    def add_initializer(self, init: Initializer) -> None:
        self.learn(init.fn)
        with self._lock:
            self.initializers.setdefault(init.executor_id, init)

    def payload(self, digest: bytes) -> bytes:
        try:
            return self.payloads[digest]
        except KeyError:
            raise BrokenFarmError("worker lost its function cache entry") from None  # a protocol bug

    def function(self, digest: bytes) -> Callable[..., Any]:
        fn = self._functions.get(digest)
        if fn is None:
            fn = ser.loads(self.payload(digest))
            self._functions[digest] = fn
        return fn  # type: ignore[no-any-return]

    def init_error(self, executor_id: int) -> BaseException | None:
        """Run the executor's initializer in this process once (slots wait for it)."""
        if executor_id in self._init_errors:
            return self._init_errors[executor_id]
        init = self.initializers.get(executor_id)
        if init is None:
            return None
        with self._lock:
            lock = self._init_locks.setdefault(executor_id, threading.Lock())
        with lock:
            if executor_id not in self._init_errors:
                try:
                    args, _ = ser.loads(init.call)
                    self.function(init.fn.digest)(*args)
                    self._init_errors[executor_id] = None
                except BaseException as exc:  # noqa: BLE001 - reported with every task of that executor
                    self._init_errors[executor_id] = exc
        return self._init_errors[executor_id]


# -- child processes --------------------------------------------------------------------
_BOOT = """\
import sys
try:
    import mpi4py
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
except ImportError:
    pass
from taskfarm._pools import child_main
child_main(int(sys.argv[1]))
"""


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if not _LAUNCHER_VARIABLES.match(k)}
    env[CHILD_ENV] = "1"
    return env


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Child:
    """A child process that runs tasks for one slot, one at a time, kept across tasks.

    Started with vfork+exec (`subprocess`), never a fork of the MPI rank.
    """

    def __init__(self, library: Library, rank: int, host: str) -> None:
        self._library = library
        self._rank = rank
        self._host = host
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env=child_environment(),
                start_new_session=True,  # its own process group: a kill takes its children too
            )
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.conn = Connection(ours.detach())
        self.tasks = 0
        self.rss = 0
        self._functions: set[bytes] = set()
        self._inits: set[int] = set()
        self.conn.send(("hello", list(sys.path), os.getcwd(), os.getpid()))
        if not self.conn.poll(CHILD_START_TIMEOUT):
            self.kill()
            raise BrokenFarmError(f"a child process of rank {rank} did not start in {CHILD_START_TIMEOUT:g} s")
        try:
            self.conn.recv()
        except (EOFError, OSError):
            code = self._reap()
            raise BrokenFarmError(f"a child process of rank {rank} {_describe_exit(code)} at start") from None

    def run(self, item: TaskItem, executor_id: int, head: str) -> Outcome:
        """Run one task in the child; its death or overrun is the task's outcome."""
        t_start = time.time()
        library = self._library
        digest = item.fn.digest
        payload = None if digest in self._functions else library.payload(digest)
        init = None
        if executor_id not in self._inits:
            found = library.initializers.get(executor_id)
            if found is not None:
                init_payload = None if found.fn.digest in self._functions else library.payload(found.fn.digest)
                init = (found.fn.digest, init_payload, found.call)
        buffers = [memoryview(b).cast("B") for b in item.buffers]
        try:
            self.conn.send(("task", executor_id, digest, payload, item.call, len(buffers), item.deps, init, head))
            for buf in buffers:
                self.conn.send_bytes(buf)
        except (OSError, ValueError):
            return self._died(item, head, t_start)
        self._functions.add(digest)
        if init is not None:
            self._functions.add(init[0])
            self._inits.add(executor_id)
        limit = item.time_limit
        try:
            ready = self.conn.poll(limit)
        except (OSError, ValueError):
            return self._died(item, head, t_start)
        if not ready:
            self.kill()
            return lost(
                f"task exceeded its time limit of {limit:g} s; its child process (pid {self.pid}) was killed",
                head,
                t_start,
                crashed=False,
            )
        try:
            ok, payload_out, nbufs, tb, t0, t1, cpu, rss = self.conn.recv()
            out = tuple(self.conn.recv_bytes() for _ in range(nbufs))
        except (EOFError, OSError, ValueError):
            return self._died(item, head, t_start)
        self.tasks += 1
        self.rss = rss
        return Outcome(ok, payload_out, out, tb, t0, t1, cpu)

    def _died(self, item: TaskItem, head: str, t_start: float) -> Outcome:
        code = self._reap()
        return lost(
            f"the child process running task {item.task_id} (pid {self.pid}) {_describe_exit(code)}",
            head,
            t_start,
        )

    def _reap(self) -> int | None:
        try:
            return self.proc.wait(timeout=CHILD_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, *, close: bool = True) -> None:
        """SIGKILL the child and everything it started; reap it.

        ``close=False`` from another thread than the slot's: the slot sees the
        socket end, reaps the child and reports the task's fate itself.
        """
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()
        if not close:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=CHILD_REAP_TIMEOUT)
        with contextlib.suppress(OSError):
            self.conn.close()

    def close(self) -> None:
        """Ask the child to leave (closing its socket), kill it if it dawdles."""
        with contextlib.suppress(OSError):
            self.conn.close()
        try:
            self.proc.wait(timeout=CHILD_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the rank died before prctl took effect
        os._exit(1)


def child_main(fd: int) -> None:
    """The loop of a child process: receive a task, run it, reply; leave at EOF."""
    conn = Connection(fd)
    try:
        hello = conn.recv()
    except (EOFError, OSError):
        return
    _, path, cwd, parent_pid = hello
    _die_with_parent(parent_pid)
    sys.path[:] = path
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    conn.send(("ready", os.getpid()))
    functions: dict[bytes, Callable[..., Any]] = {}
    payloads: dict[bytes, bytes] = {}
    init_errors: dict[int, BaseException | None] = {}

    def load(digest: bytes) -> Callable[..., Any]:
        fn = functions.get(digest)
        if fn is None:
            fn = ser.loads(payloads[digest])
            functions[digest] = fn
        return fn  # type: ignore[no-any-return]

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        _, executor_id, digest, payload, call, nbufs, deps, init, head = message
        buffers = tuple(conn.recv_bytes() for _ in range(nbufs))
        if payload is not None:
            payloads[digest] = payload
        if init is not None:
            init_digest, init_payload, init_call = init
            if init_payload is not None:
                payloads[init_digest] = init_payload
            try:
                args, _ = ser.loads(init_call)
                load(init_digest)(*args)
                init_errors[executor_id] = None
            except BaseException as exc:  # noqa: BLE001 - reported with each task of that executor
                init_errors[executor_id] = exc
        outcome = execute(
            lambda digest=digest: load(digest),  # type: ignore[misc]
            call,
            buffers,
            deps,
            None,  # the parent enforces the time limit by killing this process
            head,
            init_error=init_errors.get(executor_id),
        )
        try:
            conn.send(
                (
                    outcome.ok,
                    outcome.payload,
                    len(outcome.buffers),
                    outcome.traceback,
                    outcome.t_start,
                    outcome.t_end,
                    outcome.cpu,
                    _current_rss(),
                )
            )
            for buf in outcome.buffers:
                conn.send_bytes(memoryview(buf).cast("B"))
        except (OSError, ValueError):
            return
