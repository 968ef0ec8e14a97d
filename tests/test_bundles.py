"""How the master forms and sends bundles (taskfarm._master, "Bundles"), and a
cancel that races a dispatch, driven without MPI: a bare `Farm` with a real
scheduler, a transport that only records what it is asked to send, and no
service thread.  The end-to-end behaviour (outcomes, cancels, inputs, lost
ranks) is tested under mpiexec in test_executor.py and test_faults.py."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from typing import Any

from conftest import CapturingFarm, RecordingTransport, bare_executor

from taskfarm import _serialization as ser
from taskfarm._bundles import (
    BUNDLE_CALL_BYTES,
    BUNDLE_GUIDED_FACTOR,
    BUNDLE_MAX,
    BUNDLE_SECONDS,
    HELD,
    TIMED_FUNCTIONS_MAX,
    UNTIMED_DEPTH,
    Bundler,
)
from taskfarm._executor import FarmExecutor
from taskfarm._farm_state import Submission
from taskfarm._future import FarmFuture
from taskfarm._master import Farm
from taskfarm._outcomes import Outcomes
from taskfarm._pools import PoolSpec, execute
from taskfarm._protocol import Kind, PartResult, PartValues, ResultBatch, ResultItem, TaskBatch
from taskfarm._scheduler import PIPELINE_SECONDS, Scheduler
from taskfarm._task import TaskPolicy

#: seconds per call the tests pretend to have measured
CALL = 0.001
#: the function every test call runs: (digest, payload)
FN = (b"fn", b"")


def _bare_farm(ranks: int, capacity: int, call_time: float | None = CALL) -> Farm:
    """A Farm with only what `_feed` touches: ranks of one slot holding ``capacity`` calls."""
    farm = object.__new__(Farm)
    scheduler = Scheduler()
    for rank in range(1, ranks + 1):
        scheduler.add_worker(rank, 1, 0.0)
    task = 10**9
    while scheduler.prefetch != capacity - 1:  # feed the mean until prefetch fits
        task += 1
        scheduler.submit(task, 0.0, policy=TaskPolicy())
        (rank,) = scheduler.poll(0.0).dispatch
        scheduler.finished(task, rank, 0.0, ok=True, duration=PIPELINE_SECONDS / (capacity - 1))
    farm.scheduler = scheduler
    farm._tasks = {}
    farm._bundler = Bundler()
    if call_time is not None:
        farm._bundler.call_time[FN[0]] = call_time
    farm._id_lock = threading.Lock()
    farm._task_ids = itertools.count(1)
    farm.journal = None
    farm._listeners = []
    farm._outcomes = Outcomes(None, farm._listeners, farm._emit)
    farm._fn_sent = collections.defaultdict(set)
    farm._executors = {}
    farm._init_sent = collections.defaultdict(set)
    farm.transport = RecordingTransport()  # type: ignore[assignment]
    farm._last_result = 0.0
    farm._timed_trip = None  # no idle round trip timed (`Farm._ring_ahead`)
    return farm


def _submission(
    task_id: int, executor_id: int = 1, fn: tuple[bytes, bytes] = FN, call: bytes = b"call"
) -> Submission:
    future = FarmFuture(task_id)
    return Submission(future, executor_id, fn, (call, ()), (), TaskPolicy(), 0, None, None, None, None)


def _hold(
    farm: Farm, n: int, call: bytes = b"call", fields: Callable[[int], dict[str, Any]] = lambda i: {}
) -> list[FarmFuture]:
    """``n`` calls held for bundling; ``fields(i)`` sets the i-th one's other fields."""
    futures = []
    for i in range(n):
        sub = _submission(farm.new_task_id(), call=call)._replace(**fields(i))
        farm._tasks[sub.future.task_id] = sub
        farm._bundler.hold(sub)
        futures.append(sub.future)
    return futures


def _sizes(farm: Farm) -> list[int]:
    return sorted(len(parts) for parts in farm._bundler.bundles.values())


def test_bundles_fill_each_rank_without_overfilling_one() -> None:
    farm = _bare_farm(ranks=2, capacity=9)
    assert int(BUNDLE_SECONDS / CALL) > 9  # the measured time alone would make bigger bundles
    _hold(farm, 100)
    before = farm.scheduler.statistics().submitted
    farm._feed(0.0)
    assert _sizes(farm) == [9, 9]  # one per rank, each its room
    assert farm._bundler.live == 82 and farm._bundler.bundled == 18
    dispatch = farm.scheduler.poll(0.0).dispatch
    assert sorted(dispatch) == [1, 2]  # both ranks get work, not one rank two bundles
    assert farm.scheduler.statistics().submitted - before == 18


def test_untimed_calls_go_one_by_one_and_only_a_few_deep() -> None:
    farm = _bare_farm(ranks=2, capacity=12, call_time=None)
    futures = _hold(farm, 50)
    before = farm.scheduler.statistics().submitted
    depth = 2 * UNTIMED_DEPTH  # 2 ranks of one slot
    farm._feed(0.0)
    # UNTIMED_DEPTH per slot, though each rank has room for 12: the rest wait for a timing
    assert farm._bundler.bundles == {} and farm._bundler.bundled == 0
    assert [f._bundle for f in futures[: depth + 1]] == [0] * depth + [HELD]
    assert farm.scheduler.statistics().submitted - before == depth
    farm._feed(0.0)  # they still wait in the scheduler for those slots: no more
    dispatch = farm.scheduler.poll(0.0).dispatch
    assert sorted(dispatch) == [1, 2]
    farm._feed(0.0)  # both slots full that deep: none more of unknown length
    assert futures[depth]._bundle == HELD
    farm._bundler.observe(FN[0], CALL)  # the first result came back
    farm._feed(0.0)
    assert farm._bundler.bundled > 0


def test_a_flush_does_not_wait_for_a_timing() -> None:
    farm = _bare_farm(ranks=1, capacity=3, call_time=None)
    futures = _hold(farm, 5)
    farm._feed(0.0, flush=True)  # a dependent needs their task ids now
    assert HELD not in [f._bundle for f in futures]


def test_guided_bundles_shrink_as_the_held_calls_run_out() -> None:
    farm = _bare_farm(ranks=2, capacity=65)
    _hold(farm, 30)
    farm._feed(0.0)
    # at most held / (2 x slots) each: 30 -> 8, 22 -> 6, 16 -> 4, ...
    assert max(_sizes(farm)) == 8 and farm._bundler.live == 0
    assert sum(_sizes(farm)) + (30 - farm._bundler.bundled) == 30


def test_a_stolen_bundle_is_held_again_and_bundled_anew_for_the_thief() -> None:
    farm = _bare_farm(ranks=1, capacity=40)
    before = farm.scheduler.statistics().submitted
    _hold(farm, 80)
    farm._feed(0.0)
    assert _sizes(farm) == [20, 20] and farm.scheduler.poll(0.0).dispatch == {1: list(farm._bundler.bundles)}
    farm.scheduler.add_worker(2, 1, 0.0)  # idle: it steals rank 1's queued bundle
    (bundle,) = farm.scheduler.poll(0.0).steal[1]
    stolen = [sub.future for sub in farm._bundler.bundles[bundle]]
    farm._on_released(1, [bundle], 0.0)
    # held again ahead of the 40 still held, in order; the bundle is gone
    assert bundle not in farm._bundler.bundles and farm.scheduler.state(bundle) is None
    assert [sub.future for sub in list(farm._bundler.held)[:20]] == stolen
    assert farm._bundler.live == 60 and all(f._bundle == HELD for f in stolen)
    farm._feed(0.0)
    dispatch = farm.scheduler.poll(0.0).dispatch
    # bundled anew for 60 held calls (guided: 60 / (2 x 2 slots)), not 20 again
    (first,) = (calls for calls in farm._bundler.bundles.values() if calls[0].future is stolen[0])
    assert [sub.future for sub in first] == stolen[:15]
    assert any(first is farm._bundler.bundles[task] for task in dispatch[2])  # to the thief
    stats = farm.scheduler.statistics()
    assert stats.submitted - before == 80 and stats.stolen == 20  # each call counted once
    assert farm._bundler.bundled == sum(map(len, farm._bundler.bundles.values()))  # once too


def test_calls_with_large_arguments_go_alone() -> None:
    farm = _bare_farm(ranks=1, capacity=3)
    farm.pool = PoolSpec()
    assert farm._bundleable(_submission(1, call=b"x" * BUNDLE_CALL_BYTES))
    assert not farm._bundleable(_submission(2, call=b"x" * (BUNDLE_CALL_BYTES + 1)))


def test_a_bundle_weighs_its_calls_arguments_in_the_scheduler() -> None:
    farm = _bare_farm(ranks=1, capacity=9)
    _hold(farm, 9, call=b"x" * 1000)
    farm._feed(0.0)
    bundles = farm._bundler.bundles
    assert len(bundles) >= 2  # guided: 5, then 4
    for bundle_id, parts in bundles.items():  # what bounds prefetching
        assert farm.scheduler._entries[bundle_id].nbytes == len(parts) * 1000


def test_a_task_of_its_own_weighs_its_arguments_and_buffers_in_the_scheduler() -> None:
    farm = _bare_farm(ranks=1, capacity=3)
    farm.pool = PoolSpec()
    farm._broken = None
    future = FarmFuture(farm.new_task_id())
    buffer = bytearray(100_000)  # out of band: never bundled
    farm._admit(Submission(future, 1, FN, (b"call", (buffer,)), (), TaskPolicy(), 0, None, None, None, None), 0.0)
    assert farm.scheduler._entries[future.task_id].nbytes == 4 + 100_000


def test_a_call_alone_on_the_farm_goes_as_a_task_and_company_is_held() -> None:
    """A plain call with nothing else unfinished is not held for company: the
    bundler's pass only cost an idle farm's round trip (~40 us, cold).  A
    second call submitted while the first is unfinished is held as before."""
    farm = _bare_farm(ranks=1, capacity=3)
    farm.pool = PoolSpec()
    farm._broken = None
    alone, company = (_submission(farm.new_task_id()) for _ in range(2))
    farm._admit(alone, 0.0)
    assert alone.future.task_id in farm.scheduler._entries  # a task of its own, ready
    assert alone.future._bundle == 0
    farm._admit(company, 0.0)
    assert company.future.task_id not in farm.scheduler._entries
    assert company.future._bundle == HELD


def test_a_flush_bundles_every_held_call_and_skips_cancelled_ones() -> None:
    farm = _bare_farm(ranks=1, capacity=3)
    futures = _hold(farm, 40)
    cancelled = futures[5]
    del farm._tasks[cancelled.task_id]  # what `_cancelled_outside` does
    farm._bundler.live -= 1
    before = farm.scheduler.statistics().submitted
    farm._feed(0.0, flush=True)
    assert farm._bundler.live == 0 and not farm._bundler.held
    assert cancelled._bundle == HELD
    assert all(f._bundle >= 0 for f in futures if f is not cancelled)  # every call has its task now
    assert farm._bundler.bundled == sum(_sizes(farm)) > 20  # beyond the rank's room
    assert farm.scheduler.statistics().submitted - before == 39


def test_a_task_cancelled_as_it_is_dispatched_is_notified_and_not_sent() -> None:
    """The user's cancel lands between the scheduler's choice and the send; its
    note to the service thread comes after and finds nothing: the dispatch
    itself must tell wait() (it hung on such a future before)."""
    farm = _bare_farm(ranks=1, capacity=3)
    (future,) = _hold(farm, 1)
    farm._feed(0.0)  # no call timed yet: a task of its own
    assert future._bundle == 0
    (rank, task_ids), = farm.scheduler.poll(0.0).dispatch.items()
    assert future.cancel()
    farm._send_tasks(rank, task_ids)
    assert farm.transport.sent == []  # type: ignore[attr-defined]
    done, _ = concurrent.futures.wait([future], timeout=0)
    assert done == {future}
    assert future.task_id not in farm._tasks
    st = farm.scheduler.statistics()
    assert (st.cancelled, st.running, st.pending) == (1, 0, 0)


def test_a_call_cancelled_as_its_bundle_is_sent_leaves_the_bundle() -> None:
    farm = _bare_farm(ranks=1, capacity=4)
    futures = _hold(farm, 8)[:4]  # the first four fill the rank: one bundle
    before = farm.scheduler.statistics()
    farm._feed(0.0)
    (bundle_id,) = farm._bundler.bundles
    (rank, task_ids), = farm.scheduler.poll(0.0).dispatch.items()
    assert task_ids == [bundle_id]
    assert futures[1].cancel()
    farm._send_tasks(rank, task_ids)
    ((peer, kind, batch),) = farm.transport.sent  # type: ignore[attr-defined]
    assert (peer, kind) == (rank, Kind.TASKS) and isinstance(batch, TaskBatch)
    (item,) = batch.items
    assert item.task_id == bundle_id
    assert [part.task_id for part in item.parts] == [f.task_id for f in futures if f is not futures[1]]
    assert item.fn == (FN[0], FN[1])  # the bundle's one function, in full: new to the rank
    assert concurrent.futures.wait([futures[1]], timeout=0).done == {futures[1]}
    assert all(f.running() for f in futures if f is not futures[1])
    st = farm.scheduler.statistics()
    assert st.submitted - before.submitted == 4 and st.cancelled == 1 and st.running == 3


# -- the Bundler alone ----------------------------------------------------------
def test_size_is_the_target_time_of_calls_capped_and_guided() -> None:
    bundler: Bundler[Submission] = Bundler()
    assert bundler.size(FN[0], slots=2) == 1  # nothing timed yet
    bundler.observe(FN[0], 0.001)
    bundler.live = 10_000
    assert bundler.size(FN[0], slots=2) == int(BUNDLE_SECONDS / 0.001)
    bundler.call_time[FN[0]] = 0.0  # calls too short to time
    assert bundler.size(FN[0], slots=2) == BUNDLE_MAX
    bundler.live = 40
    assert bundler.size(FN[0], slots=2) == 40 // (BUNDLE_GUIDED_FACTOR * 2)
    bundler.live = 1
    assert bundler.size(FN[0], slots=2) == 1


def test_call_times_are_per_function() -> None:
    """Long calls submitted after short ones of another function are not
    bundled by the short ones' time: they go one by one until timed."""
    bundler: Bundler[Submission] = Bundler()
    bundler.observe(b"short", 0.0001)
    for i in range(100):
        bundler.hold(_submission(i, fn=(b"long", b"")))
    assert len(bundler.take(room=50, slots=1, alive=lambda sub: True)) == 1  # never timed: alone
    bundler.observe(b"long", 0.01)
    assert len(bundler.take(room=50, slots=1, alive=lambda sub: True)) == int(BUNDLE_SECONDS / 0.01)


def test_observe_is_a_running_mean_and_forgets_the_oldest_function() -> None:
    bundler: Bundler[Submission] = Bundler()
    bundler.observe(FN[0], 0.01)
    assert bundler.call_time[FN[0]] == 0.01
    bundler.observe(FN[0], 0.0)
    assert 0.0 < bundler.call_time[FN[0]] < 0.01
    for i in range(TIMED_FUNCTIONS_MAX):
        bundler.observe(str(i).encode(), 0.001)
    assert len(bundler.call_time) == TIMED_FUNCTIONS_MAX and FN[0] not in bundler.call_time


def test_take_keeps_one_executor_and_one_function_per_bundle_and_drops_dead_calls() -> None:
    bundler: Bundler[Submission] = Bundler()
    bundler.observe(FN[0], 0.0001)
    other = (b"other", b"")
    subs = [_submission(i, executor_id=1 if i < 4 else 2) for i in range(6)]
    subs += [_submission(6, executor_id=2, fn=other)]
    for sub in subs:
        bundler.hold(sub)
    dead = {subs[0].future.task_id, subs[1].future.task_id}
    alive = lambda sub: sub.future.task_id not in dead  # noqa: E731
    taken = bundler.take(10, 1, alive)
    assert [sub.future.task_id for sub in taken] == [2, 3]  # the rest belong to executor 2
    assert bundler.live == 5 and [sub.future.task_id for sub in bundler.held] == [4, 5, 6]
    assert [sub.future.task_id for sub in bundler.take(10, 1, alive)] == [4, 5]  # 6 runs another function
    bundler.made(99, taken)
    assert bundler.bundled == 2 and all(sub.future._bundle == 99 for sub in taken)
    assert subs[6].future._bundle == HELD
    bundler.clear()
    assert (bundler.live, len(bundler.held), bundler.bundles) == (0, 0, {})


def test_every_idle_rank_gets_its_first_bundle_before_any_gets_the_rest() -> None:
    """A burst on idle ranks: building one rank's whole pipeline (hundreds of
    calls) took milliseconds while the next rank waited with nothing to run."""
    farm = _bare_farm(ranks=2, capacity=81)
    _hold(farm, 400)
    farm._next_dispatch = 0.0
    assert farm._dispatch()
    sent = [(peer, len(record.items)) for peer, kind, record in farm.transport.sent]  # type: ignore[attr-defined]
    assert all(kind is Kind.TASKS for _, kind, _ in farm.transport.sent)  # type: ignore[attr-defined]
    assert {peer for peer, _ in sent[:2]} == {1, 2} and [n for _, n in sent[:2]] == [1, 1]
    assert len(sent) == 4 and all(n > 1 for _, n in sent[2:])  # then the rest, one message each
    # each bundle names its one function: in full the first time a rank gets it, then by digest
    fns = [[item.fn for item in record.items] for _, _, record in farm.transport.sent]  # type: ignore[attr-defined]
    assert fns[0] == fns[1] == [(FN[0], FN[1])]
    assert all(fn == (FN[0], None) for later in fns[2:] for fn in later)


def test_inputs_count_against_the_dependents_prefetch_bound() -> None:
    """A task's inputs travel with it: their bytes count against PREFETCH_BYTES
    like its own arguments, whether its input was done at submit or not."""
    farm = _bare_farm(ranks=1, capacity=9)
    farm._broken = None
    solo = dict(bundle=False)
    producer = _submission(farm.new_task_id())._replace(**solo)
    farm._admit(producer, 0.0)
    (rank,) = farm.scheduler.poll(0.0).dispatch
    farm._send_tasks(rank, [producer.future.task_id])
    waiting = _submission(farm.new_task_id())._replace(inputs=(producer.future,), **solo)
    farm._admit(waiting, 0.0)
    big = bytearray(3 << 20)
    item = ResultItem(producer.future.task_id, 0, True, b"header", (big,), "", 0.0, 0.001, False)
    farm._on_results(rank, ResultBatch((item,)), 0.0)
    farm._commit()
    assert producer.future.encoded_result() is not None
    own = len(b"call")
    assert farm.scheduler._entries[waiting.future.task_id].nbytes == own + len(b"header") + len(big)
    late = _submission(farm.new_task_id())._replace(inputs=(producer.future,), **solo)
    farm._admit(late, 0.0)  # its input is done already
    assert farm.scheduler._entries[late.future.task_id].nbytes == own + len(b"header") + len(big)


class _Journal:
    """A journal that keeps the results it is asked to record, and syncs nothing."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def succeeded(self, key: str, *, result: tuple[bytes, tuple[Any, ...]], **_: Any) -> None:
        self.results[key] = ser.loads(*result)

    def sync(self) -> None:
        pass


def test_plain_values_resolve_their_calls_with_journal_and_events() -> None:
    """A bundle's result with plain values as columns and another value in a
    part: every call resolves to its own value, the journal records each as a
    pickle of its own, and each gets its event with its own times."""
    farm = _bare_farm(ranks=1, capacity=4)
    journal, events = _Journal(), []
    farm._listeners.append(lambda event, fields: events.append((event, fields)))
    farm._outcomes = Outcomes(journal, farm._listeners, farm._emit)  # type: ignore[arg-type]
    futures = _hold(farm, 8, fields=lambda i: {"key": f"k{i}"})
    farm._feed(0.0)
    ((bundle_id, calls),) = farm._bundler.bundles.items()  # the first four fill the rank
    futures = futures[:4]
    assert [sub.future for sub in calls] == futures
    (rank,) = farm.scheduler.poll(0.0).dispatch
    farm._send_tasks(rank, [bundle_id])
    ids = [f.task_id for f in futures]
    other = ser.dumps([1, 2], "result")
    parts = (PartResult(ids[2], True, other[0], other[1], "", 3.0, 4.0),)
    values = PartValues([ids[0], ids[1], ids[3]], [0.5, None, "s"], [1.0, 2.0, 4.0], [2.0, 3.0, 5.0])
    item = ResultItem(bundle_id, 0, True, b"", (), "", 1.0, 5.0, False, parts, values)
    farm._on_results(rank, ResultBatch((item,)), 0.0)
    farm._commit()
    assert [f.result(0) for f in futures] == [0.5, None, [1, 2], "s"]
    assert journal.results == {"k0": 0.5, "k1": None, "k2": [1, 2], "k3": "s"}
    done = {fields["task"]: (fields["start"], fields["end"]) for event, fields in events if event == "succeeded"}
    assert done == {ids[0]: (1.0, 2.0), ids[1]: (2.0, 3.0), ids[2]: (3.0, 4.0), ids[3]: (4.0, 5.0)}
    assert not any(f.task_id in farm._tasks for f in futures) and not farm._bundler.bundles
    assert farm.scheduler.statistics().running == 0


def test_scalar_arguments_ride_as_they_are_in_bundles_and_alone() -> None:
    """A submission whose arguments are scalars carries them unpickled: a
    bundle's part holds them as they are, and so does a task of its own."""
    farm = _bare_farm(ranks=1, capacity=4)
    _hold(farm, 8, call=b"", fields=lambda i: {"args": (i, 0.5, None)})
    farm._feed(0.0)
    ((bundle_id, calls),) = farm._bundler.bundles.items()
    (rank,) = farm.scheduler.poll(0.0).dispatch
    farm._send_tasks(rank, [bundle_id])
    ((_, _, batch),) = farm.transport.sent  # type: ignore[attr-defined]
    (item,) = batch.items
    assert [part.call for part in item.parts] == [sub.args for sub in calls]
    farm._broken = None
    alone = _submission(farm.new_task_id(), call=b"")._replace(args=(7, True), bundle=False)
    farm._admit(alone, 0.0)
    farm.scheduler.poll(0.0)
    farm._send_tasks(rank, [alone.future.task_id])
    (item,) = farm.transport.sent[-1][2].items  # type: ignore[attr-defined]
    assert item.task_id == alone.future.task_id and not item.parts
    assert item.call == (7, True) and item.buffers == ()


def _capturing_executor(journal: Any = None) -> tuple[FarmExecutor, CapturingFarm]:
    capture = CapturingFarm()
    capture.journal = journal
    ex: FarmExecutor = bare_executor(capture)
    return ex, capture


def test_a_task_of_its_own_takes_scalar_arguments_as_they_are() -> None:
    """A call of its own (not bundled) sends scalar arguments unpickled, as a
    bundle's parts do, and the worker runs it from them; anything else goes
    pickled, as before."""
    ex, capture = _capturing_executor()
    ex.submit(divmod, 7, 2)
    ex.submit(divmod, "7", 2)
    calls = [sub.wire_call() for sub in capture.subs]
    assert calls[0] == ((7, 2), ())
    assert isinstance(calls[1][0], bytes)
    ran = [execute(lambda: divmod, call, buffers, (), None, "head\n") for call, buffers in calls]
    assert ran[0].ok and ser.loads(ran[0].payload, ran[0].buffers) == (3, 1)
    assert not ran[1].ok and "TypeError" in ran[1].traceback  # divmod("7", 2), unpickled as sent


def test_submit_leaves_only_scalar_positional_arguments_unpickled() -> None:
    """Scalars without keywords skip the pickle on submit; anything else (a
    string, a list, a keyword, an int subclass), or any call with a journal
    (keyed by its pickle), is pickled at once, as before."""
    ex, capture = _capturing_executor()
    ex.submit(divmod, 7, 2)
    ex.submit(divmod, 7.5, None, True, 1j)
    unpickled = [sub.args for sub in capture.subs]
    assert unpickled == [(7, 2), (7.5, None, True, 1j)] and all(sub.call == (b"", ()) for sub in capture.subs)
    capture.subs.clear()
    for args, kwargs in [(("7",), {}), (([7],), {}), ((7,), {"b": 2}), ((Kind.TASKS, 2), {})]:
        ex.submit(divmod, *args, **kwargs)
    assert [sub.args for sub in capture.subs] == [None] * 4
    assert [ser.loads(*sub.call) for sub in capture.subs] == [
        (("7",), {}),
        (([7],), {}),
        ((7,), {"b": 2}),
        ((Kind.TASKS, 2), {}),
    ]
    ex, capture = _capturing_executor(journal=object())  # only its presence matters to submit
    ex.submit(divmod, 7, 2)
    (sub,) = capture.subs
    assert sub.args is None and ser.loads(*sub.call) == ((7, 2), {}) and sub.key is not None


def test_calls_a_running_bundle_sent_ahead_resolve_once_and_count_at_its_end() -> None:
    """`Kind.PARTS`: calls of a bundle still running resolve when they come,
    the bundle's own result brings the rest, its failed calls count in the
    statistics when it ends; calls no longer of that bundle (dissolved, their
    rank lost) are left alone."""
    farm = _bare_farm(ranks=1, capacity=4)
    before = farm.scheduler.statistics()
    futures = _hold(farm, 8)[:4]
    farm._feed(0.0)
    ((bundle_id, _),) = farm._bundler.bundles.items()
    (rank,) = farm.scheduler.poll(0.0).dispatch
    farm._send_tasks(rank, [bundle_id])
    ids = [f.task_id for f in futures]
    error = ser.dumps(ValueError("two"), "result")
    ahead = ResultItem(
        bundle_id, 0, True, b"", (), "", 0.0, 0.0, False,
        (PartResult(ids[1], False, error[0], error[1], "tb", 2.0, 3.0),),
        PartValues([ids[0]], [10], [1.0], [2.0]),
    )  # fmt: skip
    farm._on_parts(rank, ResultBatch((ahead,)))
    farm._commit()
    assert futures[0].result(0) == 10 and isinstance(futures[1].exception(0), ValueError)
    assert not futures[2].done() and bundle_id in farm._bundler.bundles  # the bundle still runs
    farm._on_parts(rank, ResultBatch((ahead,)))  # the same again: resolved already, left alone
    values = PartValues([ids[2], ids[3]], [12, 13], [3.0, 4.0], [4.0, 5.0])
    rest = ResultItem(bundle_id, 0, True, b"", (), "", 1.0, 5.0, False, (), values)
    farm._on_results(rank, ResultBatch((rest,)), 0.0)
    farm._commit()
    assert [f.result(0) for f in futures[2:]] == [12, 13] and not farm._bundler.bundles
    stats = farm.scheduler.statistics()
    assert (stats.done - before.done, stats.failed - before.failed, stats.running) == (3, 1, 0)
    dissolved = _hold(farm, 1)[0]
    dissolved._bundle = 0  # a task of its own now: a late part naming it is not its bundle's
    values = PartValues([dissolved.task_id], [1], [0.0], [1.0])
    late = ResultItem(bundle_id, 0, True, b"", (), "", 0.0, 0.0, False, (), values)
    farm._on_parts(rank, ResultBatch((late,)))
    farm._commit()
    assert not dissolved.done()
