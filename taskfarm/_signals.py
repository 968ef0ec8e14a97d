"""Which thread takes the signals Python handles in the main thread: only that one.

The kernel hands a process-directed signal (the launcher forwarding Slurm's
SIGTERM, a Ctrl-C) to any thread of the process that does not block it, and
Python runs the handler only when the main thread next runs Python code.  A
main thread blocked in a future's ``result()`` is woken by a signal delivered
to it, but not by one delivered to the service thread or to a thread MPI
started: the drain then began only when the task it waited for finished (60 s
late in a test, about one run in ten).  So every thread taskfarm starts, and
every thread MPI starts while it initialises, blocks these signals, and the
kernel delivers them to the main thread.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, without stubs
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: Ctrl-C, and the signals a run drains on (`_cli.DRAIN_SIGNALS`): Slurm's
#: SIGTERM at the time limit, and SIGUSR1 (``sbatch --signal``)
MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})


def start_thread(thread: threading.Thread) -> threading.Thread:
    """Start one of taskfarm's threads (a `threading.Thread` or `Timer` made
    but not started) blocking `MAIN_THREAD_SIGNALS` from its first
    instruction: it inherits the block, held in the starting thread around
    the start.  A thread that blocked them itself, first thing, could take
    one in between.  Returns ``thread``."""
    with blocked_while_starting_threads():
        thread.start()
    return thread


#: the C function under `signal.pthread_sigmask`, which also turns the mask it
#: returns into a set of `signal.Signals`, in Python: run cold on an idle
#: farm's round trip, a pair of calls took ~65 us here, ~33 this way
_sigmask: Any = getattr(_signal, "pthread_sigmask", None)
_HELD = sorted(int(s) for s in MAIN_THREAD_SIGNALS)


def hold_main_thread_signals() -> object:
    """Block `MAIN_THREAD_SIGNALS` in the calling thread until
    `release_main_thread_signals` (given what this returns): a section that
    must not be cut by a handler's exception runs between the two, and a
    signal that arrives meanwhile is handled at its end.  Two calls, not a
    context manager: the master's short cuts run this per round trip, where
    each Python call counts (`taskfarm._shortcuts`)."""
    if _sigmask is None:
        return None
    return _sigmask(signal.SIG_BLOCK, _HELD)


#: what a caller passes to `release_main_thread_signals` when the hold may
#: have happened but its result was never stored: a handler's exception
#: (KeyboardInterrupt) raised as `hold_main_thread_signals` returned, for a
#: signal that came just before the block.  Written ``held = NOT_STORED``
#: before a ``try`` whose first line is ``held = hold_main_thread_signals()``,
#: the ``finally`` unblocks the signals then, as the main thread has them
NOT_STORED = object()


def release_main_thread_signals(held: object) -> None:
    """Undo `hold_main_thread_signals` (see `NOT_STORED`)."""
    if held is NOT_STORED:
        if _sigmask is not None and threading.current_thread() is threading.main_thread():
            _sigmask(signal.SIG_UNBLOCK, _HELD)
    elif held is not None:
        _sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def blocked_while_starting_threads() -> Iterator[None]:
    """Block `MAIN_THREAD_SIGNALS` in the calling thread for the ``with`` body:
    threads that C code starts meanwhile (MPI's initialisation) inherit the
    block.  A signal that arrives meanwhile is delivered at the end."""
    held = NOT_STORED
    try:
        held = hold_main_thread_signals()
        yield
    finally:
        release_main_thread_signals(held)
