"""The exception tree and the process exit codes.

Every error the farm raises on its own account derives from `TaskfarmError`.
Exceptions raised by user tasks are delivered unchanged, with a
`RemoteTraceback` (rank, host, attempt and the worker's traceback text) as
their ``__cause__``.
"""

from __future__ import annotations

import concurrent.futures
import enum
import pickle


class ExitCode(enum.IntEnum):
    """Process exit codes of ``python -m taskfarm``; batch scripts test these."""

    OK = 0
    #: the script raised, or at least one task failed for good
    FAILED = 1
    #: bad command line or bad input file, detected before anything ran
    USAGE = 2
    #: the farm lost every worker, or a worker could not start
    BROKEN = 3
    #: stopped early (signal or deadline); the journal holds what finished and
    #: a rerun with ``--resume`` completes the rest (75 is EX_TEMPFAIL)
    INCOMPLETE = 75


class TaskfarmError(Exception):
    """Root of every error raised by taskfarm itself."""


class SerializationError(TaskfarmError, pickle.PicklingError):
    """An object could not be serialized by pickle or dill.

    ``where`` says what was being serialized: ``"function"``, ``"argument"``,
    ``"result"`` or ``"exception"``; ``type_name`` names the offending type.
    """

    def __init__(self, message: str, *, where: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.type_name = type_name

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_serialization_error, (str(self), self.where, self.type_name))


def _rebuild_serialization_error(message: str, where: str, type_name: str) -> SerializationError:
    return SerializationError(message, where=where, type_name=type_name)


class BrokenFarmError(TaskfarmError, concurrent.futures.BrokenExecutor):
    """The farm cannot run tasks any more (every worker lost, or start-up failed)."""


class FarmStopped(BrokenFarmError):
    """The farm stopped early (SIGTERM/SIGUSR1/SIGINT or its deadline).

    What finished is in the journal; rerunning with ``--resume`` does the rest.
    """


class WorkerLostError(TaskfarmError):
    """The process running a task died (crash, ``os._exit``, OOM kill, lost rank)."""


class TimeLimitExceeded(TaskfarmError):
    """A task ran longer than its ``time_limit`` and was stopped."""


class MaxRetriesExceededError(TaskfarmError):
    """A task failed more often than its ``max_retries`` allows.

    The last error is chained as ``__cause__``.
    """


class TaskExpired(TaskfarmError):
    """A task's ``expires`` time passed before it could start."""


class DependencyFailed(TaskfarmError):
    """An input of a task (a future passed as an argument) failed or was cancelled."""


class JournalError(TaskfarmError):
    """The journal cannot be used: missing, locked, corrupt, or from other tasks."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker, headed with where it ran.

    Attached as ``__cause__`` of the exception that ``Future.result()`` raises,
    so the usual traceback printout shows the remote frames too.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text
