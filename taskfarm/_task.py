"""The task record a user hands to the farm, its policy, and its states.

`Task` is what `FarmExecutor.submit_task` takes: the call plus per-task
options (retries, time limit, schedule, priority, journal key), kept apart from
the function's own keyword arguments so they can never collide.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
from collections.abc import Callable, Mapping
from typing import Any


class TaskState(str, enum.Enum):
    """Where a task is in its life; the names are Celery's."""

    #: submitted, not yet dispatched
    PENDING = "PENDING"
    #: waiting for its ETA/countdown or for its input futures
    SCHEDULED = "SCHEDULED"
    #: dispatched to a worker rank (possibly queued there behind another task)
    RUNNING = "RUNNING"
    #: failed, and waiting for its retry
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.FAILURE, TaskState.CANCELLED)


#: default number of retries after a failure (Celery's default is 3 for
#: explicit retries; a farm should not rerun failing science code silently)
DEFAULT_MAX_RETRIES = 0
#: first retry delay in seconds when retry_backoff is enabled with True
DEFAULT_RETRY_BACKOFF = 1.0
#: cap on the exponential retry delay (Celery's retry_backoff_max)
DEFAULT_RETRY_BACKOFF_MAX = 600.0
#: a task that has killed this many worker processes is quarantined
DEFAULT_MAX_CRASHES = 3


@dataclasses.dataclass(frozen=True)
class TaskPolicy:
    """How a task is retried and bounded; the executor's defaults fill the gaps."""

    max_retries: int = DEFAULT_MAX_RETRIES
    #: exception types that are retried; others fail at once.  Lost workers
    #: and time limits are always retryable.
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    #: first retry delay in seconds (0 = retry at once); doubles per attempt
    retry_backoff: float = 0.0
    retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX
    #: randomise each delay in [0, delay] ("full jitter") so retries spread out
    retry_jitter: bool = True
    #: seconds a single attempt may run; None = unbounded
    time_limit: float | None = None
    max_crashes: int = DEFAULT_MAX_CRASHES
    #: "process": run in a child process of the worker (a crash fails only the
    #: attempt); "inline": in the worker itself; None: as the farm's pool does
    isolation: str | None = None
    #: the task is idempotent: while ranks sit idle with nothing queued, a copy
    #: may run on one of them if this run straggles; the first result wins
    speculative: bool = False

    def merged(self, overrides: Mapping[str, Any]) -> TaskPolicy:
        """This policy with the non-None fields of ``overrides`` applied."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "retry_on" in changes and isinstance(changes["retry_on"], type):
            changes["retry_on"] = (changes["retry_on"],)
        if changes.get("retry_backoff") is True:
            changes["retry_backoff"] = DEFAULT_RETRY_BACKOFF
        elif changes.get("retry_backoff") is False:
            changes["retry_backoff"] = 0.0
        return dataclasses.replace(self, **changes) if changes else self


_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(TaskPolicy))


@dataclasses.dataclass
class Task:
    """One call to run on the farm, with per-task options.

    ``key`` names the task in the journal; by default it is derived from the
    function and arguments, so that rerunning the same script finds its
    finished tasks.  ``countdown``/``eta`` delay dispatch, ``expires`` fails
    the task with `TaskExpired` if it has not started by then, and higher
    ``priority`` runs first among ready tasks.  Any policy field left None
    takes the executor's default.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    key: str | None = None
    label: str | None = None
    max_retries: int | None = None
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None
    retry_backoff: float | bool | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    time_limit: float | None = None
    max_crashes: int | None = None
    isolation: str | None = None
    speculative: bool | None = None
    countdown: float | None = None
    eta: _dt.datetime | float | None = None
    expires: _dt.datetime | float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Task.fn must be callable, not {type(self.fn).__name__}")
        self.args = tuple(self.args)
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError("time_limit must be > 0")
        if self.isolation not in (None, "inline", "process"):
            raise ValueError(f"isolation must be 'process', 'inline' or None, not {self.isolation!r}")

    def policy_overrides(self) -> dict[str, Any]:
        """The policy fields this task sets (None = executor default)."""
        return {name: getattr(self, name) for name in _POLICY_FIELDS}


def wall_time_of(when: _dt.datetime | float | None) -> float | None:
    """An ETA/expiry as epoch seconds (naive datetimes are local time)."""
    if when is None:
        return None
    if isinstance(when, _dt.datetime):
        return when.timestamp()
    return float(when)
