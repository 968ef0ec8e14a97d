"""Message kinds between rank 0 and the workers, and their frozen records.

The MPI tag of a message is its `Kind` and nothing else: task ids travel in
message bodies, so any number of tasks can be in flight without running out
of tags.  Bodies are NamedTuples (fast to pickle, immutable); large buffers
inside them (numpy data, serialized arguments) travel out-of-band.

A worker opens with `Hello`; the master checks `PROTOCOL_VERSION` and answers
with `Config`, or with `Stop` when the versions differ.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

#: bumped whenever a record below changes shape
PROTOCOL_VERSION = 11


class Kind(enum.IntEnum):
    """The MPI tag of each message; one record type per kind."""

    HELLO = 1  # worker -> master: Hello
    CONFIG = 2  # master -> worker: Config
    TASKS = 3  # master -> worker: TaskBatch
    RESULTS = 4  # worker -> master: ResultBatch
    HEARTBEAT = 5  # worker -> master: Heartbeat
    STEAL = 6  # master -> worker: Steal (give back queued, unstarted tasks)
    RELEASED = 7  # worker -> master: Released
    STOP = 8  # master -> worker: Stop
    BYE = 9  # worker -> master: Bye (its statistics), the last message of a worker
    LOG = 10  # worker -> master: LogRecords
    PARTS = 11  # worker -> master: ResultBatch of calls done in bundles still running
    REVOKE = 12  # master -> worker: Revoke (tasks decided elsewhere: drop or cut off)


class Hello(NamedTuple):
    version: int
    host: str
    pid: int
    #: task slots of this rank; 0 = as the master's Config says (``concurrency``)
    slots: int
    #: (host, UDP port) of the worker's doorbell, None without one (see _transport.Wakeup)
    doorbell: tuple[str, int] | None = None


class Config(NamedTuple):
    heartbeat_interval: float
    #: how the worker runs tasks: "solo", "threads" or "processes" (see _pools.PoolSpec)
    pool: str = "solo"
    concurrency: int = 1
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # bytes of resident memory
    #: (host, UDP port) of the master's doorbell, None without one
    doorbell: tuple[str, int] | None = None


class FnRef(NamedTuple):
    """A function shipped to a worker: sent in full once, then by digest only."""

    digest: bytes
    payload: bytes | None  # None when the worker already has it cached


class Part(NamedTuple):
    """One call inside a bundle: a task of its own to the user, not to the
    scheduler.  Its function is the bundle's (`TaskItem.fn`): plain fields
    only, so a message of many parts is pickled without a record per part."""

    task_id: int
    #: pickled ``(args, kwargs)``, or the positional arguments themselves when
    #: they are all scalars of plain types and there are no keyword arguments
    #: (`taskfarm._serialization.SCALARS`); bundled calls have no out-of-band buffers
    call: bytes | tuple[Any, ...]


class TaskItem(NamedTuple):
    task_id: int
    attempt: int
    fn: FnRef
    #: pickled ``(args, kwargs)``, its out-of-band buffers following in
    #: ``buffers``; or, as in a `Part`, the positional arguments themselves
    #: when they are all plain scalars (no pickle of their own either end)
    call: bytes | tuple[Any, ...]
    buffers: tuple[Any, ...]
    #: results of the task's input futures, by task id: (pickled, buffers)
    deps: tuple[tuple[int, bytes, tuple[Any, ...]], ...]
    time_limit: float | None
    #: "process" (a child process), "inline" (the worker's own thread) or None (the pool's way)
    isolation: str | None = None
    #: other tasks wait for this one's result: it goes back at once, not
    #: lingering for company (`taskfarm._worker.RESULT_LINGER`)
    urgent: bool = False
    #: a bundle: these calls of ``fn`` run one after another, and ``call`` is
    #: empty (see `taskfarm._master`, "bundles"); empty for a plain task
    parts: tuple[Part, ...] = ()


class Initializer(NamedTuple):
    """Run once per worker per executor before that executor's first task."""

    executor_id: int
    fn: FnRef
    call: bytes


class TaskBatch(NamedTuple):
    init: Initializer | None
    items: tuple[TaskItem, ...]
    #: the executor the items belong to (its initializer runs before them)
    executor_id: int = 0


class ResultItem(NamedTuple):
    task_id: int
    attempt: int
    ok: bool
    #: pickled return value, or pickled exception; buffers out-of-band
    payload: bytes
    buffers: tuple[Any, ...]
    #: the remote traceback text on failure, headed with rank, host, attempt
    traceback: str
    t_start: float  # epoch seconds on the worker
    t_end: float
    #: True when the process running the task died (WorkerLostError)
    crashed: bool
    #: a bundle's outcomes, one per part, in order (its own ``ok`` says it ran),
    #: but for the calls in ``values``
    parts: tuple[PartResult, ...] = ()
    #: a bundle's calls that returned a value of a plain type or a numpy scalar
    values: PartValues | None = None


class PartResult(NamedTuple):
    """The outcome of one call of a bundle, as `ResultItem` has it for a task."""

    task_id: int
    ok: bool
    payload: bytes
    buffers: tuple[Any, ...]
    traceback: str
    t_start: float
    t_end: float


class PartValues(NamedTuple):
    """A bundle's calls that returned a value of a plain type (None, bool, int,
    float, complex, str, bytes) or a numpy numeric scalar (see
    `taskfarm._serialization.value_types`), as columns, one entry per call.

    The values ride in the message itself, pickled once with it, where a
    `PartResult` carries a pickle of its own: for short calls that was a
    third of the worker's cost per call outside them, and the master has
    nothing left to decode.
    """

    task_ids: list[int]
    values: list[Any]
    t_starts: list[float]
    t_ends: list[float]


class ResultBatch(NamedTuple):
    items: tuple[ResultItem, ...]


class Heartbeat(NamedTuple):
    running: tuple[int, ...]


class Steal(NamedTuple):
    task_ids: tuple[int, ...]


class Released(NamedTuple):
    task_ids: tuple[int, ...]


class Revoke(NamedTuple):
    """Tasks whose outcome is decided elsewhere (a speculative copy that lost
    the race): queued ones go back as `Released`, running ones are cut off and
    answer with a result the master drops."""

    task_ids: tuple[int, ...]


class Stop(NamedTuple):
    reason: str


class Bye(NamedTuple):
    """A worker's own figures, sent as its last message."""

    tasks: int
    busy_time: float  # wall seconds spent inside tasks
    cpu_time: float  # process CPU seconds, tasks included
    task_cpu_time: float  # CPU seconds spent inside tasks
    wall_time: float  # seconds from start to Bye
    pool: str = "solo"
    #: wall seconds each slot spent inside tasks
    slot_busy: tuple[float, ...] = ()
    #: child processes started again (after a crash, a time limit or recycling)
    child_restarts: int = 0
    #: the master's doorbell rings reached this worker (it slept instead of polling)
    rung: bool = False


class LogRecords(NamedTuple):
    records: tuple[tuple[str, int, str, float], ...]  # logger, level, message, created
