"""taskfarm: an MPI task farm for Python.

Rank 0 hands tasks to worker ranks through a `concurrent.futures.Executor`;
tasks of failed or lost ranks are resubmitted, and a journal lets a job killed
by its walltime resume without redoing finished work.
"""

from __future__ import annotations

from ._canvas import GroupResult, Signature, chain, chord, group, signature
from ._errors import (
    BrokenFarmError,
    DependencyFailed,
    ExitCode,
    JournalError,
    MaxRetriesExceededError,
    RemoteTraceback,
    SerializationError,
    TaskExpired,
    TaskfarmError,
    TimeLimitExceeded,
    WorkerLostError,
)
from ._executor import FarmExecutor, as_completed_async, farm
from ._future import FarmFuture
from ._periodic import PeriodicTask
from ._statistics import FarmStatistics, RankStatistics
from ._task import Task, TaskState

__version__ = "0.1.0"

__all__ = [
    "BrokenFarmError",
    "DependencyFailed",
    "ExitCode",
    "FarmExecutor",
    "FarmFuture",
    "FarmStatistics",
    "GroupResult",
    "JournalError",
    "MaxRetriesExceededError",
    "PeriodicTask",
    "RankStatistics",
    "RemoteTraceback",
    "SerializationError",
    "Signature",
    "Task",
    "TaskExpired",
    "TaskState",
    "TaskfarmError",
    "TimeLimitExceeded",
    "WorkerLostError",
    "__version__",
    "as_completed_async",
    "chain",
    "chord",
    "farm",
    "group",
    "signature",
]
