"""A farm that closes must not wait for what will never come: a worker's
Hello that comes late is answered while work is on its way (a bare `Farm`),
and a submit cut short leaves no future for shutdown to wait on (an
executor over a stand-in farm); no MPI."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from conftest import CapturingFarm, RecordingTransport, bare_executor

from taskfarm._bundles import Bundler
from taskfarm._master import Farm
from taskfarm._pools import PoolSpec
from taskfarm._protocol import PROTOCOL_VERSION, Hello, Kind
from taskfarm._scheduler import Scheduler


def _closing_farm(submissions: list[Any]) -> tuple[Farm, RecordingTransport]:
    farm = object.__new__(Farm)
    farm.scheduler = Scheduler()
    farm._bundler = Bundler()
    farm._hosts = {}
    farm._listeners = []
    farm._ready = True
    farm._closing = True
    farm._submissions = collections.deque(submissions)
    farm.pool = PoolSpec()
    farm.heartbeat_timeout = 60.0
    transport = RecordingTransport()
    farm.transport = transport  # type: ignore[assignment]
    return farm, transport


def test_a_hello_while_closing_is_answered_when_a_submission_waits() -> None:
    """A script that submits and leaves its ``with`` block at once closes
    the farm before the service thread has taken the submission in.  A
    Hello read in that round was dropped ("nothing to do, Stop follows"),
    the submission was taken in right after, and the farm waited for a
    worker that waited for its Config: the job hung (3 of 10 runs here)."""
    farm, transport = _closing_farm([object()])
    farm._on_hello(1, Hello(PROTOCOL_VERSION, "node", 123, 1), 0.0)
    assert farm.scheduler.live_workers() == 1
    assert [(peer, kind) for peer, kind, _ in transport.sent] == [(1, Kind.CONFIG)]


def test_a_hello_while_closing_with_nothing_to_do_waits_for_stop() -> None:
    farm, transport = _closing_farm([])
    farm._on_hello(1, Hello(PROTOCOL_VERSION, "node", 123, 1), 0.0)
    assert farm.scheduler.live_workers() == 0
    assert transport.sent == []


class _InterruptedAdd(set[Any]):
    """A pending set whose add is cut short by a signal just after it added."""

    def add(self, item: Any) -> None:
        super().add(item)
        raise KeyboardInterrupt


def test_a_submit_cut_short_leaves_no_future_for_shutdown_to_wait_on() -> None:
    """shutdown(wait=True) waits for every future in the executor's pending
    set.  A KeyboardInterrupt that landed after a future went into it and
    before the submit's try block left it there, never sent: a Ctrl-C in a
    submit loop then hung the job as it left its ``with`` block (Open MPI,
    3 of 8 runs here; 0 of 20 with the fix, either MPI)."""
    farm = CapturingFarm()
    ex = bare_executor(farm, _InterruptedAdd())
    with pytest.raises(KeyboardInterrupt):
        ex.submit(divmod, 7, 2)
    assert not ex._pending.futures and not farm.subs
