"""taskfarm: an MPI task farm for Python.

Rank 0 hands tasks to worker ranks through a `concurrent.futures.Executor`;
tasks of failed or lost ranks are resubmitted, and a journal lets a job killed
by its walltime resume without redoing finished work.
"""

from __future__ import annotations

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
from ._executor import FarmExecutor, farm
from ._future import FarmFuture
from ._master import FarmStatistics, RankStatistics
from ._task import Task, TaskState

__version__ = "0.1.0"

__all__ = [
    "BrokenFarmError",
    "DependencyFailed",
    "ExitCode",
    "FarmExecutor",
    "FarmFuture",
    "FarmStatistics",
    "JournalError",
    "MaxRetriesExceededError",
    "RankStatistics",
    "RemoteTraceback",
    "SerializationError",
    "Task",
    "TaskExpired",
    "TaskState",
    "TaskfarmError",
    "TimeLimitExceeded",
    "WorkerLostError",
    "__version__",
    "farm",
]
