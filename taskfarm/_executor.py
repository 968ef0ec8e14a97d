"""`FarmExecutor` and `farm()`: the concurrent.futures face of the farm.

Where the workers come from depends on how the program was started:

* under ``mpiexec -n N`` (directly, or through ``python -m taskfarm run``),
  ranks 1..N-1 are the workers and every executor on rank 0 shares them; the
  farm ends with ``farm()``'s block, with ``taskfarm run``, or at exit;
* as a plain ``python script.py``, an executor spawns ``max_workers`` worker
  processes with MPI spawn and ends them at shutdown.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import datetime as _dt
import itertools
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from . import _periodic, _transport
from . import _serialization as ser
from ._bundles import guided_size
from ._errors import BrokenFarmError, ExitCode, JournalError, RemoteTraceback
from ._farm_state import DEFAULT_HEARTBEAT_TIMEOUT, NOT_PICKLED, Submission
from ._future import FarmFuture, PendingSet, _Encoded
from ._journal import JournalNotFoundError, read_journal
from ._journal_writer import JournalWriter
from ._master import Farm
from ._pools import PoolSpec
from ._protocol import FnRef, Initializer
from ._resume import Recorded, ResumeIndex, content_key, function_digest, label_for
from ._signals import start_thread
from ._statistics import FarmStatistics
from ._task import Task, TaskPolicy, TaskState, wall_time_of
from ._worker import serve

#: tasks ``map`` keeps submitted ahead of the result being consumed, per worker
MAP_WINDOW_PER_WORKER = 64
#: but never fewer than this many (small farms still need a deep pipeline)
MAP_WINDOW_MIN = 1024
#: map(chunksize=None): seconds of work per chunk, once items have been timed;
#: long enough that the ~0.1 ms a task costs the farm is noise, short enough
#: that chunks still balance (and guided self-scheduling shrinks them at the
#: end).  A sixteenth of the prefetch pipeline (`_scheduler.PIPELINE_SECONDS`).
#: 1 ms items, 2 workers: 5 -> 20 ms took 2,000 items from ~500 chunks to
#: ~120 and efficiency from 0.95-0.96 to 0.96-0.97 (4 of 4 pairs); a skewed
#: map's makespan did not move beyond noise (1.04-1.07 either way).
MAP_CHUNK_SECONDS = 0.02
#: map(chunksize=None): largest chunk, and most items held in flight at once
MAP_CHUNK_MAX = 16384
MAP_ITEMS_IN_FLIGHT = 1 << 16
#: map(chunksize=None): guided self-scheduling, a chunk is at most the
#: remaining items / (this * workers) when the input's length is known
MAP_GUIDED_FACTOR = 2
#: map(chunksize=None): guided self-scheduling shrinks chunks no further than
#: this much work (seconds): a chunk costs the farm ~0.1 ms whatever its size,
#: so chunks shorter than this cost more than they gain in balance at the
#: tail, where a task's round trip (1-2 ms) dominates anyway
MAP_CHUNK_MIN_SECONDS = 0.001
#: weight of the newest chunk in map's running mean of seconds per item
MAP_TIME_EWMA = 0.3

_world_farm: Farm | None = None
_world_lock = threading.Lock()
_world_options: dict[str, Any] = {}
_last_farm: Farm | None = None
_farm_hooks: list[Callable[[Farm], None]] = []


def on_new_farm(hook: Callable[[Farm], None]) -> None:
    """Call ``hook`` with every farm started from now on (the CLI's deadline and signals)."""
    _farm_hooks.append(hook)


def _started(farm_: Farm) -> Farm:
    global _last_farm
    _last_farm = farm_
    for hook in _farm_hooks:
        hook(farm_)
    return farm_


def last_farm() -> Farm | None:
    """The farm most recently started in this process (for the CLI's statistics)."""
    return _last_farm


def configure_world(**options: Any) -> None:
    """Options for the world farm, set by the CLI before the script runs."""
    _world_options.update(options)


def world_farm(**options: Any) -> Farm:
    """The farm over COMM_WORLD's ranks 1..N-1 (rank 0 only), created on first use."""
    global _world_farm
    with _world_lock:
        if _world_farm is None:
            merged = {**options, **_world_options}
            _world_farm = _started(Farm(_transport.world(), **merged))
            atexit.register(_close_world_at_exit)
        return _world_farm


def close_world_farm() -> Farm | None:
    """End the world farm: workers leave their loop.  Returns the closed farm.

    Workers stuck inside a task are left to `abort_if_stuck`, so the caller
    can save statistics first.
    """
    global _world_farm
    with _world_lock:
        farm_, _world_farm = _world_farm, None
    if farm_ is not None:
        farm_.close()
    return farm_


def abort_if_stuck(farm_: Farm | None) -> None:
    """End the whole MPI job when workers did not stop (a hung task, a stopped rank).

    The exit code says why: 75 (incomplete, resumable) after a drain, else 3.
    """
    if farm_ is None or not farm_.unanswered:
        return
    code = ExitCode.INCOMPLETE if farm_.drained else ExitCode.BROKEN
    sys.stderr.write(
        f"taskfarm: worker rank(s) {farm_.unanswered} did not stop; ending the job (exit {int(code)})\n"
    )
    farm_.transport.abort(int(code))


def _close_world_at_exit() -> None:
    abort_if_stuck(close_world_farm())


def open_journal(
    path: str | os.PathLike[str],
    *,
    resume: bool = False,
    retry_failed: bool = False,
    force_resume: bool = False,
) -> tuple[JournalWriter, ResumeIndex | None]:
    """Open a journal for writing; with ``resume``, index what it already holds.

    A journal that exists is never reused without ``resume`` (that would mix
    two runs), and ``resume`` without a journal is an error, not a fresh start.
    """
    if resume and not os.path.exists(path):
        raise JournalNotFoundError(os.fspath(path))
    if not resume and os.path.exists(path) and os.path.getsize(path) > 0:
        raise JournalError(
            f"journal {os.fspath(path)!r} exists: pass --resume (resume=True) to continue it, "
            "or remove it to start over"
        )
    # the lock first, then the index: no other farm can add to what was read
    writer = JournalWriter(path)
    try:
        index = ResumeIndex(read_journal(path), retry_failed=retry_failed, force=force_resume) if resume else None
    except BaseException:
        writer.close()
        raise
    return writer, index


def _persistent_for(farm_: Farm, inputs: list[FarmFuture]) -> ser.Persistent:
    # each input once: a future used twice, or met again when dumps retries with
    # dill, must not send its value twice nor count twice as a dependency
    seen: set[int] = set()

    def persistent(obj: Any) -> Any:
        if isinstance(obj, FarmFuture):
            if obj._farm is not farm_ and not obj.done():
                raise ValueError(
                    f"task {obj.task_id} belongs to another farm and is not done; "
                    "a future can be an input only within its own farm"
                )
            if id(obj) not in seen:
                seen.add(id(obj))
                inputs.append(obj)
            return ("dep", obj.task_id)
        return None

    return persistent


class FarmExecutor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` whose workers are MPI ranks.

    ``submit``, ``map``, ``shutdown`` and the futures behave as the standard
    library's; ``submit_task`` takes a `Task` with per-task options.  The
    keyword arguments set the default policy of every task (Celery's names).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        retry_backoff: float | bool = 0.0,
        retry_backoff_max: float | None = None,
        retry_jitter: bool = True,
        time_limit: float | None = None,
        max_crashes: int | None = None,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        journal: str | os.PathLike[str] | None = None,
        resume: bool = False,
        retry_failed: bool = False,
        force_resume: bool = False,
        pool: str | None = None,
        concurrency: int | None = None,
        isolation: str | None = None,
        speculative: bool = False,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        master_works: bool | None = None,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        # the pool is the farm's (docs/pools.md): None = as the farm already runs, or the default
        pool_spec = None
        if (pool, concurrency, max_tasks_per_child, max_memory_per_child) != (None, None, None, None):
            pool_spec = PoolSpec.make(pool, concurrency, max_tasks_per_child, max_memory_per_child)
        if isolation not in (None, "inline", "process"):
            raise ValueError(f"isolation must be 'process', 'inline' or None, not {isolation!r}")
        self._policy = TaskPolicy().merged(
            {
                "max_retries": max_retries,
                "retry_on": retry_on,
                "retry_backoff": retry_backoff,
                "retry_backoff_max": retry_backoff_max,
                "retry_jitter": retry_jitter,
                "time_limit": time_limit,
                "max_crashes": max_crashes,
                "isolation": isolation,
                "speculative": speculative,
            }
        )
        self._functions = ser.FunctionCache()
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        #: the futures shutdown waits for; also every future's done-callback,
        #: which forgets it once resolved
        self._pending = PendingSet()
        size = _transport.world_size()
        if size > 1:
            if _transport.world_rank() != 0:
                # this rank runs the user's script under a plain mpiexec: it serves
                # as a worker and leaves when the farm on rank 0 ends
                serve(_transport.world())
                sys.exit(0)
            options: dict[str, Any] = {"heartbeat_timeout": heartbeat_timeout, "max_workers": max_workers}
            if journal is not None and _world_farm is None and "journal" not in _world_options:
                options["journal"], options["resume"] = open_journal(
                    journal, resume=resume, retry_failed=retry_failed, force_resume=force_resume
                )
            self._farm = world_farm(**options)
            self._farm.configure(pool_spec, master_works)
            if journal is not None and (
                self._farm.journal is None
                or os.path.abspath(self._farm.journal.path) != os.path.abspath(journal)
            ):
                raise JournalError(
                    "this farm already runs without that journal; give it to the first executor "
                    "or to taskfarm run --journal"
                )
            self._owned = False
        else:
            nworkers = max_workers or os.cpu_count() or 1
            writer, index = (None, None)
            if journal is not None:
                writer, index = open_journal(
                    journal, resume=resume, retry_failed=retry_failed, force_resume=force_resume
                )
            transport = _transport.spawn(nworkers, ["-m", "taskfarm._spawned"])
            self._farm = _started(
                Farm(
                    transport,
                    heartbeat_timeout=heartbeat_timeout,
                    journal=writer,
                    resume=index,
                    pool=pool_spec or _world_options.get("pool") or PoolSpec(),
                    master_works=master_works if master_works is not None else _world_options.get("master_works"),
                )
            )
            self._owned = True
        self._executor_id = self._farm.new_executor_id()
        init = None
        if initializer is not None:
            digest, payload = self._functions.get(initializer)
            call = ser.dumps((tuple(initargs), {}), "argument")[0]
            init = Initializer(self._executor_id, FnRef(digest, payload), call)
        self._farm.add_executor(self._executor_id, init)

    # -- submitting --------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> FarmFuture:
        """Schedule ``fn(*args, **kwargs)``; futures among the arguments are inputs."""
        return self._submit(fn, args, kwargs, None)

    def submit_task(self, task: Task) -> FarmFuture:
        """Schedule a `Task`, with its per-task retry, time and schedule options."""
        return self._submit(task.fn, task.args, task.kwargs, task)

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Any,
        task: Task | None,
        *,
        journal: bool = True,
        bundle: bool = True,
    ) -> FarmFuture:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        if self._farm.broken is not None:
            raise BrokenFarmError(str(self._farm.broken))
        farm_ = self._farm
        future = FarmFuture(farm_.new_task_id(), label=getattr(fn, "__name__", "task"))
        future._farm = farm_
        inputs: list[FarmFuture] = []
        scalars = None  # the arguments as they are, when they need no pickle here (see Submission.args)
        try:
            fn_entry = self._functions.get(fn)
            if not kwargs and farm_.journal is None and type(args) is tuple and ser.SCALARS.issuperset(map(type, args)):
                scalars, call = args, NOT_PICKLED
            else:
                call_obj = (args, dict(kwargs))
                try:
                    call = ser.dumps(call_obj, "argument")
                except ser.FutureInArguments:
                    call = ser.dumps(call_obj, "argument", _persistent_for(farm_, inputs))
        except Exception as exc:  # noqa: BLE001 - concurrent.futures: the future fails, not submit
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
            return future
        key = None
        if farm_.journal is not None and journal:
            content = content_key(function_digest(fn), call[0], call[1])
            key = task.key if task is not None and task.key else content
            name = task.label if task is not None and task.label else future.label
            future.key, future.label = key, label_for(name, key, content)
            if farm_.resume is not None:
                recorded = farm_.resume.lookup(key, future.label)
                if recorded is not None:
                    return _from_journal(future, recorded)
        policy = self._policy
        priority = 0
        not_before = None
        expires = None
        if task is not None:
            policy = policy.merged(task.policy_overrides())
            priority = task.priority
            delay = 0.0
            if task.countdown:
                delay = task.countdown
            eta = wall_time_of(task.eta)
            if eta is not None:
                delay = max(delay, eta - time.time())
            if delay > 0:
                not_before = time.monotonic() + delay
            expires = wall_time_of(task.expires)
            if task.label and key is None:  # with a journal, label_for already used it
                future.label = task.label
        if not_before is not None or (inputs and any(not dep.done() for dep in inputs)):
            future._task_state = TaskState.SCHEDULED  # waiting for its ETA or its inputs
        # not add_done_callback: no other thread has this future yet, and this
        # needs no list of callbacks (see FarmFuture._on_done)
        future._on_done = self._pending
        try:
            # in the try: a KeyboardInterrupt between the two would leave a
            # future in ``_pending`` that nothing will resolve, and shutdown,
            # which waits for them all, would wait for good
            self._pending.add(future)
            farm_.submit(
                Submission(
                    future,
                    self._executor_id,
                    fn_entry,
                    call,
                    tuple(inputs),
                    policy,
                    priority,
                    not_before,
                    expires,
                    policy.time_limit,
                    key,
                    bundle,
                    scalars,
                )
            )
        except BaseException:
            # refused (draining, broken, ended): no one will ever resolve this
            # future, so shutdown(wait=True) must not wait for it
            self._pending(future)  # forgotten
            raise
        return future

    def every(
        self,
        interval: float,
        fn: Callable[..., Any] | Task,
        /,
        *args: Any,
        start: _dt.datetime | float | None = None,
        stop: _dt.datetime | float | None = None,
        on_result: Callable[[Any], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        **kwargs: Any,
    ) -> _periodic.PeriodicTask:
        """Run ``fn(*args, **kwargs)`` every ``interval`` seconds while the farm runs.

        The first run is at ``start`` (a datetime or Unix time; default now),
        none starts at or after ``stop``.  Never two runs at once: ticks missed
        while a run is going (or queued behind other work) are skipped, not
        piled up.  Results go to ``on_result(value)`` and to the handle's
        iterator; failures to ``on_error(exc)``.  ``fn`` may be a `Task` to set
        per-run options (priority, time_limit, retries).  Returns a
        `PeriodicTask` handle with ``cancel()``; ``shutdown`` cancels it too.
        See docs/celery.md for the exact rules.
        """
        if isinstance(fn, Task):
            if args or kwargs:
                raise TypeError("every(interval, Task): put the arguments into the Task")
            if fn.countdown or fn.eta is not None:
                raise ValueError("a periodic Task takes no countdown/eta: use every(..., start=...)")
            task = fn
        else:
            task = Task(fn, args, kwargs)
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            handle = _periodic.PeriodicTask(
                self, interval, task, start=start, stop=stop, on_result=on_result, on_error=on_error
            )
            return handle.start()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Like `concurrent.futures.Executor.map`, but lazy over its input.

        At most a bounded window of tasks is in flight, so an input of 10^7
        items never sits in memory; results come in input order.  With
        ``chunksize=None`` (the default) the farm picks chunk sizes itself:
        one item per task until the first items have been timed, then chunks
        of about `MAP_CHUNK_SECONDS` of work, shrinking towards the end of an
        input whose length is known (guided self-scheduling).  With a journal,
        the default is one item per task, so that task keys stay the same from
        run to run (resume).
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls: Iterator[Any] = zip(*iterables)
        if chunksize is None:
            if self._farm.journal is None:
                if len(iterables) == 1:  # chunks of the items themselves, not of 1-tuples
                    return self._map_auto(fn, iter(iterables[0]), _known_length(iterables), deadline, _run_items_timed)
                return self._map_auto(fn, calls, _known_length(iterables), deadline, _run_chunk_timed)
            chunksize = 1
        if chunksize > 1:
            calls = ((fn, chunk) for chunk in _batched(calls, chunksize))
            submit_one: Callable[[Any], FarmFuture] = lambda c: self._submit_chunk(_run_chunk, *c)  # noqa: E731
        else:
            submit_one = lambda c: self.submit(fn, *c)  # noqa: E731
        window = max(MAP_WINDOW_MIN, MAP_WINDOW_PER_WORKER * max(1, len(self._farm.transport.peers())))
        queue: list[FarmFuture] = [submit_one(c) for c in itertools.islice(calls, window)]
        return self._map_results(queue, calls, submit_one, deadline, chunksize > 1)

    def _submit_chunk(self, runner: Callable[..., Any], fn: Callable[..., Any], chunk: list[Any]) -> FarmFuture:
        """One task of map's that runs a chunk: sized for balance already, never bundled."""
        return self._submit(runner, (fn, chunk), {}, None, bundle=False)

    def _map_auto(
        self,
        fn: Callable[..., Any],
        calls: Iterator[Any],
        length: int | None,
        deadline: float | None,
        runner: Callable[[Callable[..., Any], list[Any]], tuple[list[Any], float]],
    ) -> Iterator[Any]:
        """map with chunk sizes from measured item times (see `map`); ``runner``
        runs one chunk of ``calls`` on a worker and times it."""
        import collections

        workers = max(1, len(self._farm.transport.peers()))
        window = max(MAP_WINDOW_MIN, MAP_WINDOW_PER_WORKER * workers)
        probes = 2 * workers  # one-item tasks in flight until the first chunk
        per_item: float | None = None  # seconds per item on a worker (running mean)
        samples: list[float] = []  # the probes' times, until there are ``probes`` of them
        remaining = length
        pending: collections.deque[tuple[FarmFuture, int]] = collections.deque()
        in_flight = 0  # items in pending
        exhausted = False

        def top_up() -> None:
            nonlocal in_flight, remaining, exhausted
            while not exhausted and len(pending) < window and in_flight < MAP_ITEMS_IN_FLIGHT:
                if per_item is None:
                    if len(pending) >= probes:
                        return  # probing: wait for the first timings
                    size = 1
                else:
                    size = guided_size(
                        per_item,
                        remaining,
                        workers,
                        target=MAP_CHUNK_SECONDS,
                        factor=MAP_GUIDED_FACTOR,
                        cap=MAP_CHUNK_MAX,
                        floor_seconds=MAP_CHUNK_MIN_SECONDS,
                    )
                    size = max(1, min(size, MAP_ITEMS_IN_FLIGHT - in_flight))
                chunk = list(itertools.islice(calls, size))
                if len(chunk) < size:
                    exhausted = True
                    if not chunk:
                        return
                pending.append((self._submit_chunk(runner, fn, chunk), len(chunk)))
                in_flight += len(chunk)
                if remaining is not None:
                    remaining = max(0, remaining - len(chunk))

        top_up()

        def results() -> Iterator[Any]:
            nonlocal per_item, in_flight
            try:
                while pending:
                    future, count = pending.popleft()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise concurrent.futures.TimeoutError()
                    values, seconds = future.result(left)
                    in_flight -= count
                    sample = seconds / count
                    if per_item is not None:
                        per_item += MAP_TIME_EWMA * (sample - per_item)
                    else:
                        # chunks are sized from the mean of a first wave of probes, not
                        # from the first alone: the chunks formed now hold most of an
                        # input of known length (one fast first item made every chunk
                        # of a skewed list 4x its target, 80 ms, and the tail uneven)
                        samples.append(sample)
                        if len(samples) >= probes:
                            per_item = sum(samples) / len(samples)
                    top_up()
                    yield from values
                    del future, values
            finally:
                for future, _ in pending:
                    future.cancel()

        return results()

    def _map_results(
        self,
        queue: list[FarmFuture],
        calls: Iterator[Any],
        submit_one: Callable[[Any], FarmFuture],
        deadline: float | None,
        chunked: bool,
    ) -> Iterator[Any]:
        import collections

        pending = collections.deque(queue)
        del queue
        try:
            while pending:
                future = pending.popleft()
                for call in itertools.islice(calls, 1):
                    pending.append(submit_one(call))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise concurrent.futures.TimeoutError()
                value = future.result(remaining)
                if chunked:
                    yield from value
                else:
                    yield value
                del future, value
        finally:
            for future in pending:
                future.cancel()

    # -- ending ------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; optionally cancel queued ones (newest first, so that the
        farm never starts a later task while cancelling earlier ones); optionally
        wait for the rest."""
        with self._shutdown_lock:
            already = self._shutdown
            self._shutdown = True
        _periodic.stop_all(self, wait)
        if cancel_futures:
            pending = self._pending.snapshot()
            # newest first: the service thread dispatches oldest first, so what
            # it sends meanwhile is always older than every task cancelled so
            # far, and no later task starts while earlier ones are being cancelled
            pending.sort(key=_task_id, reverse=True)
            for future in pending:
                future.cancel()
        if wait:
            self._wait_all()
            if self._owned and not already:
                self._farm.close()
        elif self._owned and not already:
            start_thread(threading.Thread(target=self._close_later, daemon=False))

    def _wait_all(self) -> None:
        """Until every future of this executor is resolved.  One at a time
        through its own wait, not `concurrent.futures.wait`: a main thread
        waits there in slices, so that a signal's handler runs meanwhile
        (`_future.MAIN_THREAD_WAIT_SLICE`), and the farm's short cut may
        take a lone task's result in this thread."""
        while True:
            pending = self._pending.snapshot()
            if not pending:
                return
            for future in pending:
                with contextlib.suppress(concurrent.futures.CancelledError):
                    future.exception()

    def _close_later(self) -> None:
        self._wait_all()
        self._farm.close()

    def statistics(self) -> FarmStatistics:
        """A snapshot of the farm's counts and per-rank figures."""
        return self._farm.statistics()

    @property
    def workers(self) -> int:
        """Number of worker ranks this executor's farm can use."""
        return len(self._farm.transport.peers())


def _task_id(future: FarmFuture) -> int:
    return future.task_id


def _from_journal(future: FarmFuture, recorded: Recorded) -> FarmFuture:
    """Resolve a future with the outcome an earlier run recorded."""
    future.set_running_or_notify_cancel()
    if recorded.ok:
        assert recorded.frame is not None
        future.set_result(_Encoded(recorded.frame))
        return future
    try:
        error = ser.loads(*recorded.frame) if recorded.frame is not None else None
    except Exception:  # noqa: BLE001 - the recorded exception's class may be gone
        error = None
    if not isinstance(error, BaseException):
        error = JournalError(f"task {future.key} failed in an earlier run: {recorded.error_text}")
    error.__cause__ = RemoteTraceback(recorded.error_text) if recorded.error_text else None
    future.set_exception(error)
    return future


def _batched(iterable: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """One task that runs ``fn`` over a chunk of map's input."""
    return [fn(*args) for args in chunk]


def _run_chunk_timed(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> tuple[list[Any], float]:
    """`_run_chunk`, and the seconds it took (map's automatic chunking)."""
    t0 = time.perf_counter()
    values = list(itertools.starmap(fn, chunk))
    return values, time.perf_counter() - t0


def _run_items_timed(fn: Callable[..., Any], items: list[Any]) -> tuple[list[Any], float]:
    """`_run_chunk_timed` for map over one iterable: ``fn(item)`` for each item.

    The chunk holds the items themselves, not 1-tuples of them: a tuple per
    item costs more than the no-op call itself to build, pickle and unpickle.
    """
    t0 = time.perf_counter()
    values = list(map(fn, items))
    return values, time.perf_counter() - t0


def _known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """Length of zip(*iterables) when every input has a len(), else None."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def farm(max_workers: int | None = None, **options: Any) -> Iterator[FarmExecutor | None]:
    """Run a block with a farm, as mpi4py's ``MPICommExecutor`` does.

    Under ``mpiexec -n N python script.py``: rank 0 gets a `FarmExecutor`;
    ranks 1..N-1 serve as workers inside ``farm()`` and get None once rank 0
    leaves the block (guard the body with ``if executor is not None``).
    Without mpiexec, ``max_workers`` worker processes are spawned.
    """
    if _transport.world_size() > 1:
        if _transport.world_rank() != 0:
            serve(_transport.world())
            yield None
            return
        executor = FarmExecutor(max_workers, **options)
        try:
            yield executor
        finally:
            executor.shutdown(wait=True)
            close_world_farm()
        return
    with FarmExecutor(max_workers, **options) as executor:
        yield executor


async def as_completed_async(
    fs: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None
) -> AsyncIterator[concurrent.futures.Future[Any]]:
    """Yield the futures as they finish, in asyncio code on rank 0::

        async for future in taskfarm.as_completed_async(futures):
            print(future.result())

    The asyncio twin of `concurrent.futures.as_completed`: futures already
    done come first; the loop is never blocked (completions arrive through
    ``call_soon_threadsafe``).  ``timeout`` (seconds, from the first step)
    raises `concurrent.futures.TimeoutError` while futures are unfinished.
    A single future is awaited with ``await asyncio.wrap_future(future)``.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    pending = set(fs)
    total = len(pending)
    finished: asyncio.Queue[concurrent.futures.Future[Any]] = asyncio.Queue()

    def on_done(future: concurrent.futures.Future[Any]) -> None:
        try:
            loop.call_soon_threadsafe(finished.put_nowait, future)
        except RuntimeError:  # the loop closed: nobody iterates any more
            pass

    for future in pending:
        future.add_done_callback(on_done)
    deadline = None if timeout is None else loop.time() + timeout
    for left in range(total, 0, -1):
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            future = await asyncio.wait_for(finished.get(), remaining)
        except asyncio.TimeoutError:
            raise concurrent.futures.TimeoutError(f"{left} (of {total}) futures unfinished") from None
        yield future
