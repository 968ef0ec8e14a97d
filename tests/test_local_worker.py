"""Rank 0's own worker (``master_works``), driven without MPI through the
in-process link (`taskfarm._loopback`): the master's poke that comes with each
message is all the news that worker gets, so it must look at once, not at
its next poll."""

from __future__ import annotations

import contextlib
import operator
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, TypeVar, cast

import pytest
from conftest import asleep_in_epoll, can_listen, wait_until

import taskfarm._serialization as ser
import taskfarm._worker as worker_module
from taskfarm._loopback import LOCAL_PEER, LocalEnd, Loopback, _copy
from taskfarm._protocol import Config, FnRef, Kind, Part, ResultBatch, Steal, Stop, TaskBatch, TaskItem
from taskfarm._transport import MASTER, Transport, Wakeup

#: how long the test waits for an answer that comes in microseconds; the
#: worker's own poll period is raised far beyond it, so only a worker that
#: reacts to the poke answers in time
ANSWER_WITHIN = 10.0


def _task(task_id: int, fn: Any, *args: Any, urgent: bool = False) -> TaskItem:
    digest, payload = ser.FunctionCache().get(fn)
    call, buffers = ser.dumps((args, {}), "argument")
    return TaskItem(task_id, 1, FnRef(digest, payload), call, tuple(buffers), (), None, None, urgent)


#: released by the test: the task behind the urgent one holds its slot until then
RELEASE = threading.Event()


def _held() -> str:
    assert RELEASE.wait(ANSWER_WITHIN * 3), "the test never released the task"
    return "released"


#: set by `_held_started` as it begins: the tasks before it are done
STARTED = threading.Event()


def _held_started() -> str:
    STARTED.set()
    return _held()


def _results(link: Loopback, answered: threading.Event, what: str) -> list[tuple[int, Any]]:
    """Wait for the next result message from the local worker."""
    while True:
        assert answered.wait(ANSWER_WITHIN), f"{what}: no answer from rank 0's worker"
        answered.clear()
        got = [m for m in list(link.to_master) if m[1] is Kind.RESULTS]
        link.to_master.clear()
        if got:
            batch = cast(ResultBatch, got[0][2])
            return [(item.task_id, ser.loads(item.payload, item.buffers)) for item in batch.items]


@contextlib.contextmanager
def _rank0_worker() -> Iterator[tuple[Loopback, threading.Event]]:
    """Rank 0's worker on its in-process link, configured; stopped (and
    checked gone) after.  The event is set whenever the worker sends."""
    answered = threading.Event()
    link = Loopback(cast(Transport, None), answered.set)
    thread = worker_module.serve_in_thread(link.local)
    try:
        link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
        yield link, answered
    finally:
        RELEASE.set()
        link.send(LOCAL_PEER, Kind.STOP, Stop("test over"))
        thread.join(ANSWER_WITHIN)
    assert not thread.is_alive()


def test_rank0_worker_runs_each_task_on_the_masters_poke(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "DOORBELL_POLL_CAP", 3600.0)
    monkeypatch.setattr(worker_module, "RING_RECHECKS", (3600.0,))
    with _rank0_worker() as (link, answered):
        results: list[tuple[int, Any]] = []
        for task_id in range(1, 4):  # one at a time: each waits for the worker's sleep to end
            link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(task_id, operator.add, task_id, 10),)))
            results += _results(link, answered, f"task {task_id}")
        assert results == [(1, 11), (2, 12), (3, 13)]


def _ones(nbytes: int) -> Any:
    import numpy as np

    return np.ones(nbytes, dtype=np.uint8)


@pytest.mark.parametrize("why", ["urgent", "big"])
def test_some_results_do_not_linger(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Results wait for company while tasks are queued behind them, except
    one that other tasks wait for (marked urgent), or one of a megabyte or
    more (batching saves nothing there): it goes back while the next task runs."""
    monkeypatch.setattr(worker_module, "RESULT_LINGER", 3600.0)  # a lingering result would never come
    RELEASE.clear()
    with _rank0_worker() as (link, answered):
        first = _task(1, operator.add, 1, 10, urgent=True) if why == "urgent" else _task(1, _ones, 1 << 20)
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (first, _task(2, _held))))
        ((task_id, value),) = _results(link, answered, "the first task")
        assert task_id == 1 and (value == 11 if why == "urgent" else value.nbytes == 1 << 20)
        RELEASE.set()
        assert _results(link, answered, "the held task") == [(2, "released")]


def test_results_go_once_half_the_queue_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """However long results may linger, they go back once half of the calls
    queued at the last refill (or the last send) are done: the master refills
    on them, so a rank never runs dry waiting for its results' linger."""
    monkeypatch.setattr(worker_module, "RESULT_LINGER", 3600.0)  # a lingering result would never come
    RELEASE.clear()
    with _rank0_worker() as (link, answered):
        tasks = (_task(1, operator.add, 1, 10), _task(2, operator.add, 2, 10), _task(3, _held))
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (*tasks, _task(4, operator.add, 4, 10))))
        # two of four queued calls done (the third holds its slot): half, they go
        assert _results(link, answered, "half the queue") == [(1, 11), (2, 12)]
        RELEASE.set()
        rest: list[tuple[int, Any]] = []
        while len(rest) < 2:
            assert answered.wait(ANSWER_WITHIN), f"the rest: no answer from rank 0's worker (got {rest})"
            answered.clear()
            while link.to_master:
                _, kind, record = link.to_master.popleft()
                if kind is Kind.RESULTS:
                    rest += [(item.task_id, ser.loads(item.payload, item.buffers)) for item in record.items]
        assert rest == [(3, "released"), (4, 14)]


def _one_done_one_held_three_queued(link: Loopback) -> None:
    """Five tasks to rank 0's worker; returns once the second (held until
    `RELEASE`) has started: the first is done and its result held for
    company, 3 calls queued behind the second, more than half of 5."""
    RELEASE.clear()
    STARTED.clear()
    first = (_task(1, operator.add, 1, 10), _task(2, _held_started))
    queued = tuple(_task(task_id, operator.add, task_id, 10) for task_id in (3, 4, 5))
    link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (*first, *queued)))
    assert STARTED.wait(ANSWER_WITHIN)


def test_a_lingering_result_goes_when_its_linger_is_over_while_a_long_task_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result that waits for company goes when its linger is over, even
    while the next task runs on and no more results come to take it along:
    nothing pokes the comm thread for it, whose sleep is capped at the
    linger while the rank holds work (the doorbell's safety cap is raised
    far beyond the test, so only that cap can wake it)."""
    linger = 0.3
    monkeypatch.setattr(worker_module, "RESULT_LINGER", linger)
    monkeypatch.setattr(worker_module, "DOORBELL_POLL_CAP", 3600.0)
    monkeypatch.setattr(worker_module, "RING_RECHECKS", (3600.0,))
    with _rank0_worker() as (link, answered):
        _one_done_one_held_three_queued(link)
        started = time.monotonic()
        assert _results(link, answered, "the lingering result") == [(1, 11)]
        waited = time.monotonic() - started
        assert not RELEASE.is_set()  # it came while task 2 still ran
        assert waited < linger + 2.0, f"the result waited {waited:.2f} s, its linger is {linger} s"
        RELEASE.set()


def test_results_held_for_company_go_once_a_steal_empties_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result waits for company while tasks are queued behind it; once a
    steal takes those tasks away it goes at once.  Held, it let the master
    think the rank busy with that task for the whole linger: no refill, the
    rank idle (a 160 ms stall in ~1 burst of 40)."""
    monkeypatch.setattr(worker_module, "RESULT_LINGER", 3600.0)  # a held result would never come
    with _rank0_worker() as (link, answered):
        _one_done_one_held_three_queued(link)
        link.send(LOCAL_PEER, Kind.STEAL, Steal((3, 4, 5)))
        assert _results(link, answered, "the held result") == [(1, 11)]
        RELEASE.set()
        assert _results(link, answered, "the held task") == [(2, "released")]


def test_a_bundle_runs_its_calls_in_order_each_with_its_own_outcome() -> None:
    """A bundle (several calls in one task of the scheduler's) comes back as one
    result with one outcome per call: a call that raises fails only its part,
    with its own traceback; a value of a plain type rides as it is (no pickle of
    its own), any other in a part; the function travels once, on the bundle."""
    digest, payload = ser.FunctionCache().get(operator.truediv)

    def part(task_id: int, *args: Any) -> Part:
        call, buffers = ser.dumps((args, {}), "argument")
        assert not buffers
        return Part(task_id, call)

    parts = (part(11, 1, 4), part(12, 1, 0), part(13, Fraction(9), 3), part(14, 6, 3))
    bundle = TaskItem(7, 2, FnRef(digest, payload), b"", (), (), None, None, False, parts)
    with _rank0_worker() as (link, answered):
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (bundle,)))
        while True:
            assert answered.wait(ANSWER_WITHIN), "no answer from rank 0's worker"
            answered.clear()
            got = [m[2] for m in list(link.to_master) if m[1] is Kind.RESULTS]
            if got:
                break
    (item,) = cast(ResultBatch, got[0]).items
    assert (item.task_id, item.attempt, item.ok) == (7, 2, True)
    values = item.values
    assert values is not None
    assert (values.task_ids, values.values) == ([11, 14], [0.25, 2.0])
    assert [p.task_id for p in item.parts] == [12, 13]
    assert [p.ok for p in item.parts] == [False, True]
    assert ser.loads(item.parts[1].payload, item.parts[1].buffers) == Fraction(3)
    error = ser.loads(item.parts[0].payload, item.parts[0].buffers)
    assert isinstance(error, ZeroDivisionError)
    assert item.parts[0].traceback.startswith("Traceback on rank 0") and "attempt 2" in item.parts[0].traceback
    assert "ZeroDivisionError" in item.parts[0].traceback
    # one clock reading ends a call and starts the next, in the order they ran
    times = [values.t_starts[0], values.t_ends[0], item.parts[0].t_end, item.parts[1].t_end, values.t_ends[1]]
    assert item.t_start <= times[0] and times == sorted(times) and times[-1] <= item.t_end
    assert values.t_starts[1] == item.parts[1].t_end


class _LateEnd(LocalEnd):
    """The local link as MPI may behave: each message rings once, and the probe
    right after a ring may miss its message (it shows a moment later)."""

    def __init__(self, link: Loopback) -> None:
        super().__init__(link)
        self._announced = 0  # messages whose ring was taken
        self._late = False  # the next probe misses (a ring was just taken)

    def take_rings(self) -> bool:
        waiting = len(self._link.to_worker)
        fresh = waiting > self._announced
        self._announced = waiting
        self._late = self._late or fresh
        return fresh

    def poll(self) -> tuple[int, Kind, Any] | None:
        if self._late:
            self._late = False
            return None
        message = super().poll()
        if message is not None:
            self._announced -= 1
        return message


#: the link of the running test, for `_send_next` (which runs as a task)
_LATE_LINK: list[Loopback] = []


def _send_next() -> str:
    """A task that sends the worker its next batch while finishing: the ring
    lands in the round that sends this task's result."""
    _LATE_LINK[0].send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(2, operator.add, 2, 20),)))
    return "sent"


def test_a_ring_whose_message_shows_late_is_rechecked_in_a_busy_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker must look again after a ring whose probe found nothing, even
    when that round was busy sending results; it used to sleep the doorbell's
    safety cap (250 ms) with a batch waiting."""
    monkeypatch.setattr(worker_module, "DOORBELL_POLL_CAP", 3600.0)  # a missed ring would never be seen
    # the comm thread sends every result, as when a slot finds it using the
    # transport: the round that sends task 1's result is the one rung
    monkeypatch.setattr(worker_module.Worker, "_send_outbox", lambda self: False)
    answered = threading.Event()
    link = Loopback(cast(Transport, None), answered.set)
    link.local = _LateEnd(link)
    _LATE_LINK[:] = [link]
    thread = worker_module.serve_in_thread(link.local)
    try:
        link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(1, _send_next),)))
        results: dict[int, Any] = {}
        while len(results) < 2:
            # cleared before the scan: a result sent after it sets the event again
            assert answered.wait(ANSWER_WITHIN), f"no answer from rank 0's worker after {results}"
            answered.clear()
            for _, kind, batch in list(link.to_master):
                if kind is Kind.RESULTS:
                    results.update((i.task_id, ser.loads(i.payload, i.buffers)) for i in batch.items)
        assert results == {1: "sent", 2: 22}
    finally:
        link.send(LOCAL_PEER, Kind.STOP, Stop("test over"))
        thread.join(ANSWER_WITHIN)
    assert not thread.is_alive()


def test_stop_cuts_off_a_task_whose_child_was_still_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop kills the child process of every running task (a drain's grace ran
    out); a task whose child was still starting when Stop came is cut off too,
    not run to its end (seen: a drain that took 60 s, a task's whole sleep)."""
    spawning, proceed, stopped = threading.Event(), threading.Event(), threading.Event()
    children: list[Any] = []
    real_child, real_handle = worker_module.Child, worker_module.Worker._handle

    def slow_child(*args: Any) -> Any:
        spawning.set()
        assert proceed.wait(ANSWER_WITHIN)
        children.append(real_child(*args))
        return children[-1]

    def handle(self: worker_module.Worker, peer: int, kind: Kind, record: Any) -> None:
        real_handle(self, peer, kind, record)
        if kind is Kind.STOP:
            stopped.set()

    monkeypatch.setattr(worker_module, "Child", slow_child)
    monkeypatch.setattr(worker_module.Worker, "_handle", handle)
    link = Loopback(cast(Transport, None), lambda: None)
    thread = worker_module.serve_in_thread(link.local)
    try:
        link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
        item = _task(1, time.sleep, 3600)._replace(isolation="process")
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (item,)))
        assert spawning.wait(ANSWER_WITHIN), "the task's child never started"
        link.send(LOCAL_PEER, Kind.STOP, Stop("the drain's grace ran out"))
        assert stopped.wait(ANSWER_WITHIN)
        proceed.set()  # the child comes up after Stop was handled
        thread.join(ANSWER_WITHIN)
        assert not thread.is_alive(), "the task ran on after Stop"
    finally:
        proceed.set()
        for child in children:
            child.kill()


class _NamingEnd(LocalEnd):
    """The local link, noting the thread that sent each result message."""

    def __init__(self, link: Loopback) -> None:
        super().__init__(link)
        self.senders: list[str] = []

    def send(self, peer: int, kind: Kind, record: object) -> None:
        if kind is Kind.RESULTS:
            self.senders.append(threading.current_thread().name)
        super().send(peer, kind, record)


_End = TypeVar("_End", bound=LocalEnd)


def _one_slot_worker(
    end_type: type[_End],
) -> tuple[Loopback, threading.Event, _End, worker_module.Worker, threading.Thread]:
    """A one-slot worker on a link whose worker end is an ``end_type``: the
    link, the event set whenever the worker sends, the end, the worker, and
    its thread (named "the-slot"), not started yet."""
    answered = threading.Event()
    link = Loopback(cast(Transport, None), answered.set)
    end = end_type(link)
    link.local = end
    worker = worker_module.Worker(end, slots=1, forward_logs=False)
    return link, answered, end, worker, threading.Thread(target=worker.run, name="the-slot", daemon=True)


@contextlib.contextmanager
def _named_worker() -> Iterator[tuple[Loopback, threading.Event, _NamingEnd, worker_module.Worker]]:
    """`_rank0_worker` on a link that names who sent each result, with the worker itself."""
    link, answered, end, worker, thread = _one_slot_worker(_NamingEnd)
    thread.start()
    try:
        link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
        yield link, answered, end, worker
    finally:
        RELEASE.set()
        link.send(LOCAL_PEER, Kind.STOP, Stop("test over"))
        thread.join(ANSWER_WITHIN)
    assert not thread.is_alive()


def test_a_polling_worker_polls_less_while_its_slots_all_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the master's rings do not arrive the comm thread polls on a
    backoff: up to `BUSY_POLL_CAP` while every slot runs a task (nothing a
    slot needs comes any sooner), and under `IDLE_POLL_CAP` once the slot
    runs out of tasks, which pokes it out of its longer sleep at once."""
    RELEASE.clear()
    STARTED.clear()
    #: the comm thread's sleeps: [timeout, what woke it (0: the timeout)]
    sleeps: list[list[Any]] = []
    monkeypatch.setattr(LocalEnd, "rings_from", lambda self, peer: False)  # as when UDP is blocked
    with _rank0_worker() as (link, answered):
        end = link.local
        real_wait = end.wait

        def wait(timeout: float) -> int:
            sleep = [timeout, None]
            sleeps.append(sleep)
            sleep[1] = real_wait(timeout)
            return sleep[1]

        monkeypatch.setattr(end, "wait", wait)
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(1, _held_started),)))
        assert STARTED.wait(ANSWER_WITHIN)
        wait_until(lambda: any(t >= worker_module.BUSY_POLL_CAP for t, _ in sleeps), "the busy cap")
        # the first sleep over the idle cap: the task runs, the master's poke that sent it is past
        first_busy = next(i for i, (t, _) in enumerate(sleeps) if t > worker_module.IDLE_POLL_CAP)
        RELEASE.set()
        assert _results(link, answered, "the held task") == [(1, "released")]
        after = len(sleeps)
        wait_until(lambda: len(sleeps) >= after + 10 and sleeps[after + 9][1] is not None, "ten sleeps after")
        assert max(t for t, _ in sleeps[:after]) == worker_module.BUSY_POLL_CAP
        assert max(t for t, _ in sleeps[after + 1 :]) <= worker_module.IDLE_POLL_CAP, sleeps[after:]
        # nothing came from the master meanwhile: only the slot that ran dry can have poked
        assert any(woke for _, woke in sleeps[first_busy : after + 10]), sleeps[first_busy:]
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(2, operator.add, 2, 10),)))
        assert _results(link, answered, "a task after the sleeps") == [(2, 12)]


def test_a_slot_sends_its_own_results_while_the_comm_thread_sleeps() -> None:
    """A result that goes at once is sent by the slot that made it: handing
    it to the comm thread cost an idle farm's round trip two thread
    wake-ups (~220 us of ~1.75 ms)."""
    with _named_worker() as (link, answered, end, _):
        for task_id in (1, 2):
            link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(task_id, operator.add, task_id, 10),)))
            assert _results(link, answered, f"task {task_id}") == [(task_id, task_id + 10)]
        assert end.senders == ["the-slot", "the-slot"]


def test_a_slot_leaves_its_results_to_the_comm_thread_while_that_uses_the_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot never waits for the transport: while the comm thread holds it,
    the slot pokes that thread, which sends the results once it can."""
    tried: list[bool] = []
    slot_tried = threading.Event()
    send_outbox = worker_module.Worker._send_outbox

    def noted(self: worker_module.Worker) -> bool:
        sent = send_outbox(self)
        tried.append(sent)
        slot_tried.set()
        return sent

    monkeypatch.setattr(worker_module.Worker, "_send_outbox", noted)
    monkeypatch.setattr(worker_module, "DOORBELL_POLL_CAP", 3600.0)  # only the slot's poke wakes the comm thread
    monkeypatch.setattr(worker_module, "RING_RECHECKS", (3600.0,))
    RELEASE.clear()
    STARTED.clear()
    with _named_worker() as (link, answered, end, worker):
        link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(1, _held_started),)))
        assert STARTED.wait(ANSWER_WITHIN)
        with worker._mpi_lock:  # the comm thread's round, as the slot finishes
            RELEASE.set()
            assert slot_tried.wait(ANSWER_WITHIN), "the slot never tried to send"
        assert _results(link, answered, "the result left to the comm thread") == [(1, "released")]
        assert tried == [False]
        assert end.senders == ["taskfarm-comm"]


class _BrokenEnd(LocalEnd):
    """The local link, whose result sends fail as MPI errors do; with
    ``for_good``, every send after the first failure fails too."""

    def __init__(self, link: Loopback, *, for_good: bool) -> None:
        super().__init__(link)
        self.for_good = for_good
        self.broke = False

    def send(self, peer: int, kind: Kind, record: object) -> None:
        if kind is Kind.RESULTS or (self.for_good and self.broke):
            self.broke = True
            raise RuntimeError("MPI_ERR_OTHER: the link broke")
        super().send(peer, kind, record)


@pytest.mark.parametrize("for_good", [False, True], ids=["bye-gets-through", "link-broken"])
def test_a_slot_whose_send_fails_stops_the_rank(for_good: bool) -> None:
    """An error in a slot's own send ends the rank, comm thread and all, as
    one in the comm thread does: a worker that waited for a Stop that cannot
    come would hang the job.  It says Bye if it still can (the master then
    resubmits what it held); where even that send fails, `run` raises."""
    link = Loopback(cast(Transport, None))
    link.local = _BrokenEnd(link, for_good=for_good)
    worker = worker_module.Worker(link.local, slots=1, forward_logs=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    thread = threading.Thread(target=run, name="the-slot", daemon=True)
    thread.start()
    link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
    link.send(LOCAL_PEER, Kind.TASKS, TaskBatch(None, (_task(1, operator.add, 1, 10),)))
    thread.join(ANSWER_WITHIN)
    if thread.is_alive():  # a failed test must not leave the worker behind
        link.send(LOCAL_PEER, Kind.STOP, Stop("test over"))
        thread.join(ANSWER_WITHIN)
        pytest.fail("the rank kept running after its result could not be sent")
    byes = [record for _, kind, record in link.to_master if kind is Kind.BYE]
    if for_good:
        assert [str(e) for e in errors] == ["MPI_ERR_OTHER: the link broke"] and not byes
    else:
        assert not errors and len(byes) == 1


class _RungEnd(LocalEnd):
    """The local link with a doorbell of its own, like a worker rank's: the
    test rings it after each message, as the master does."""

    def __init__(self, link: Loopback) -> None:
        super().__init__(link)
        self.wakeup.close()
        self.wakeup = Wakeup(LOCAL_PEER, network=True)


def _until_asleep(*threads: threading.Thread) -> None:
    # a thread just started has no native id yet (threading.enumerate lists it
    # before it runs): it is not asleep either
    wait_until(
        lambda: all(t.native_id is not None and asleep_in_epoll(t.native_id) for t in threads),
        "the worker's threads asleep",
        ANSWER_WITHIN,
    )


@contextlib.contextmanager
def _rung_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Loopback, threading.Event, Callable[[Kind, object], None], list[str], threading.Thread]]:
    """A one-slot worker rung like a worker rank; yields the link, the answer
    event, a send that rings, the threads that took each task batch, and
    the worker's thread.  Its slot and comm thread are asleep when a message
    is sent."""
    monkeypatch.setattr(worker_module, "DOORBELL_POLL_CAP", 3600.0)  # no timed round takes a message
    taken_by: list[str] = []
    real_handle = worker_module.Worker._handle

    def handle(self: worker_module.Worker, peer: int, kind: Kind, record: Any) -> None:
        if kind is Kind.TASKS:
            taken_by.append(threading.current_thread().name)
        real_handle(self, peer, kind, record)

    monkeypatch.setattr(worker_module.Worker, "_handle", handle)
    link, answered, end, _, thread = _one_slot_worker(_RungEnd)
    ringer = Wakeup(MASTER)
    bell = ringer.resolve(end.wakeup.address)
    assert bell is not None
    thread.start()

    def send(kind: Kind, record: object) -> None:
        _until_asleep(thread)  # listening: Config was handled, so the comm thread runs
        comm = [t for t in threading.enumerate() if t.name == "taskfarm-comm"]
        assert comm, "the worker has no comm thread"
        _until_asleep(thread, *comm)
        link.to_worker.append((MASTER, kind, _copy(record)))
        ringer.ring(bell)

    try:
        link.send(LOCAL_PEER, Kind.CONFIG, Config(60.0))
        yield link, answered, send, taken_by, thread
    finally:
        link.send(LOCAL_PEER, Kind.STOP, Stop("test over"))
        thread.join(ANSWER_WITHIN)
        ringer.close()
        end.close()
    assert not thread.is_alive()


@pytest.mark.skipif(not can_listen(), reason="needs epoll's exclusive wake-up (Linux)")
def test_an_idle_slot_takes_its_task_itself_when_rung(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle slot sleeps on the master's rings itself and takes the task
    they announce: handed over by the comm thread, an idle farm's round trip
    paid one more thread wake-up."""
    with _rung_worker(monkeypatch) as (link, answered, send, taken_by, _):
        for task_id in (1, 2):
            send(Kind.TASKS, TaskBatch(None, (_task(task_id, operator.add, task_id, 10),)))
            assert _results(link, answered, f"task {task_id}") == [(task_id, task_id + 10)]
        assert taken_by == ["the-slot", "the-slot"]


@pytest.mark.skipif(not can_listen(), reason="needs epoll's exclusive wake-up (Linux)")
def test_stop_taken_by_a_listening_slot_ends_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop that a listening slot takes ends the comm thread too: the rank
    says Bye and its loop returns."""
    with _rung_worker(monkeypatch) as (link, _, send, _, thread):
        send(Kind.STOP, Stop("done"))
        thread.join(ANSWER_WITHIN)
        assert not thread.is_alive(), "the rank kept running after Stop"
        assert [kind for _, kind, _ in link.to_master][-1] is Kind.BYE
