"""Signals Python handles in the main thread reach only that thread
(`taskfarm._signals`), without MPI: a thread taskfarm starts inherits their
block from its first instruction, and so do threads C code starts inside
`blocked_while_starting_threads`.
A drain signal the kernel handed to another thread left a main thread blocked
in ``result()`` until its task finished (see test_signals for a whole farm)."""

from __future__ import annotations

import signal
import threading

from taskfarm._cli import DRAIN_SIGNALS
from taskfarm._signals import (
    MAIN_THREAD_SIGNALS,
    NOT_STORED,
    blocked_while_starting_threads,
    hold_main_thread_signals,
    release_main_thread_signals,
    start_thread,
)


def _mask() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}


def _mask_of_a_thread(ours: bool) -> set[int]:
    """The mask of a new thread at its first instruction: started by
    `start_thread` if ``ours``, else as any thread is."""
    seen: list[set[int]] = []
    thread = threading.Thread(target=lambda: seen.append(_mask()))
    if ours:
        start_thread(thread)
    else:
        thread.start()
    thread.join()
    return seen[0]


def test_the_drain_signals_are_left_to_the_main_thread() -> None:
    assert set(DRAIN_SIGNALS) <= MAIN_THREAD_SIGNALS


def test_a_thread_of_taskfarm_blocks_them_from_its_first_instruction() -> None:
    wanted = {int(s) for s in MAIN_THREAD_SIGNALS}
    assert not wanted & _mask_of_a_thread(ours=False)  # a thread as the test starts it
    assert wanted <= _mask_of_a_thread(ours=True)
    assert not wanted & _mask()  # the main thread's own mask is back


def test_threads_started_while_blocked_inherit_the_block() -> None:
    wanted = {int(s) for s in MAIN_THREAD_SIGNALS}
    before = _mask()
    with blocked_while_starting_threads():
        inherited = _mask_of_a_thread(ours=False)
    assert wanted <= inherited
    assert _mask() == before  # the main thread's own mask is back


def test_a_hold_whose_result_was_never_stored_is_undone() -> None:
    """A handler's exception raised as the hold returned (a signal that came
    just before the block) leaves no mask to restore: the main thread gets
    its signals unblocked, as it had them."""
    wanted = {int(s) for s in MAIN_THREAD_SIGNALS}
    before = _mask()
    hold_main_thread_signals()  # its result dropped, as such an exception drops it
    assert wanted <= _mask()
    release_main_thread_signals(NOT_STORED)
    assert _mask() == before
