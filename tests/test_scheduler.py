"""Unit tests of taskfarm._scheduler, driven with a fake clock (plain floats), no MPI.

One class per scheduling rule; at the end, a property-style test plays many
random orders of successes, failures, crashes, rank losses, late (zombie)
results and steals against a model of the master and its workers.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import time

import pytest

from taskfarm._scheduler import (
    DURATION_EWMA,
    MAX_PREFETCH,
    PIPELINE_SECONDS,
    PREFETCH_BYTES,
    Actions,
    Decision,
    Scheduler,
)
from taskfarm._task import TaskPolicy, TaskState

POLICY = TaskPolicy()
#: a task duration long enough to keep prefetch at 1
LONG = 1.0
#: ids of the tasks `observe` runs, clear of the ids tests use
_OBSERVED = itertools.count(10**9)


# -- helpers ------------------------------------------------------------------
def farm(ranks: int = 1, slots: int = 1, now: float = 0.0, **kwargs: object) -> Scheduler:
    """A scheduler with ranks 0..ranks-1 of ``slots`` slots each."""
    s = Scheduler(**kwargs)  # type: ignore[arg-type]
    for rank in range(ranks):
        assert s.add_worker(rank, slots, now)
    return s


def submit(
    s: Scheduler, *task_ids: int, now: float = 0.0, policy: TaskPolicy = POLICY, **kwargs: object
) -> None:
    for task_id in task_ids:
        s.submit(task_id, now, policy=policy, **kwargs)  # type: ignore[arg-type]


def sent(actions: Actions) -> list[int]:
    """Every task id dispatched by one poll, in dispatch order per rank."""
    return [t for ids in actions.dispatch.values() for t in ids]


def only_rank(actions: Actions) -> int:
    assert len(actions.dispatch) == 1, actions.dispatch
    return next(iter(actions.dispatch))


def observe(s: Scheduler, duration: float, times: int = 1, *, now: float = 0.0) -> None:
    """Run ``times`` tasks to success on a scheduler with nothing else queued,
    each reporting ``duration``: feeds the running mean behind prefetch."""
    for _ in range(times):
        task_id = next(_OBSERVED)
        submit(s, task_id, now=now)
        actions = s.poll(now)
        rank = only_rank(actions)
        assert s.finished(task_id, rank, now, ok=True, duration=duration) is Decision.ACCEPT


def succeed(s: Scheduler, task_id: int, rank: int, now: float = 0.0) -> Decision:
    """A success taking LONG seconds: it leaves prefetch at 1."""
    return s.finished(task_id, rank, now, ok=True, duration=LONG)


def fail(s: Scheduler, task_id: int, rank: int, now: float = 0.0, **kwargs: object) -> Decision:
    return s.finished(task_id, rank, now, ok=False, **kwargs)  # type: ignore[arg-type]


# -- workers ------------------------------------------------------------------
class TestWorkers:
    def test_max_workers_refuses_beyond_it(self) -> None:
        s = Scheduler(max_workers=2)
        assert s.add_worker(0, 1, 0.0)
        assert s.add_worker(1, 1, 0.0)
        assert not s.add_worker(2, 1, 0.0)
        assert s.live_workers() == 2
        submit(s, 1, 2, 3, 4, 5)
        assert 2 not in s.poll(0.0).dispatch  # the refused rank never gets work

    def test_lost_rank_frees_its_place(self) -> None:
        s = Scheduler(max_workers=1)
        assert s.add_worker(0, 1, 0.0)
        s.rank_lost(0, 1.0)
        assert s.is_lost(0) and s.live_workers() == 0
        assert s.add_worker(1, 1, 1.0)

    def test_live_count_follows_losses_and_rejoins(self) -> None:
        s = farm(ranks=3)
        s.rank_lost(1, 1.0)
        s.rank_lost(1, 1.0)  # twice: counted once
        assert s.live_workers() == 2 and s.live_ranks() == [0, 2]
        assert s.add_worker(1, 2, 2.0)  # the lost rank back
        assert s.add_worker(2, 2, 2.0)  # a live rank's second Hello: still one rank
        assert s.live_workers() == 3
        submit(s, *range(6))
        dispatch = s.poll(2.0).dispatch
        assert set(dispatch) == {0, 1, 2} and sum(map(len, dispatch.values())) == 6

    def test_unlimited_by_default(self) -> None:
        s = farm(ranks=50)
        assert s.live_workers() == 50

    def test_zero_slots_counts_as_one(self) -> None:
        s = farm(slots=0)
        submit(s, 1, 2, 3)
        assert sent(s.poll(0.0)) == [1, 2]  # 1 slot * (1 + prefetch 1)


# -- dispatch -----------------------------------------------------------------
class TestDispatch:
    def test_least_loaded_rank_first(self) -> None:
        s = farm(ranks=2, slots=2)
        submit(s, 1)
        first = only_rank(s.poll(0.0))
        submit(s, 2)
        # the other rank is idle: it gets the next task, not the one with work
        assert s.poll(0.0).dispatch == {1 - first: [2]}

    def test_least_loaded_counts_free_capacity(self) -> None:
        s = farm(ranks=2, slots=1)  # capacity 2 each
        submit(s, 1, 2, 3)
        actions = s.poll(0.0)
        assert sorted(len(v) for v in actions.dispatch.values()) == [1, 2]
        busy = next(r for r, v in actions.dispatch.items() if len(v) == 2)
        succeed(s, actions.dispatch[busy][0], busy, 0.0)
        succeed(s, actions.dispatch[busy][1], busy, 0.0)
        submit(s, 4)
        assert s.poll(0.0).dispatch == {busy: [4]}  # now the emptier one

    def test_one_batch_per_rank(self) -> None:
        s = farm(ranks=3, slots=1)
        submit(s, *range(1, 7))
        actions = s.poll(0.0)
        assert sorted(actions.dispatch) == [0, 1, 2]
        assert all(len(ids) == 2 for ids in actions.dispatch.values())
        assert sorted(sent(actions)) == [1, 2, 3, 4, 5, 6]
        for ids in actions.dispatch.values():
            assert ids == sorted(ids)  # each batch in queue order
        assert not s.poll(0.0)  # nothing more until something frees

    def test_capacity_is_slots_times_one_plus_prefetch(self) -> None:
        s = farm(slots=3)
        assert s.prefetch == 1
        submit(s, *range(1, 21))
        assert len(sent(s.poll(0.0))) == 3 * (1 + 1)
        assert s.has_ready()
        assert s.statistics().running == 6 and s.statistics().pending == 14

    def test_capacity_follows_prefetch(self) -> None:
        s = farm(slots=2)
        observe(s, 0.0)  # instant tasks: deepest pipeline
        assert s.prefetch == MAX_PREFETCH
        submit(s, *range(1, 1001))
        assert len(sent(s.poll(0.0))) == 2 * (1 + MAX_PREFETCH)

    def test_refill_only_below_low_water(self) -> None:
        s = farm(slots=4)  # capacity 8, refilled once 4 are free
        submit(s, *range(1, 21))
        batch = s.poll(0.0).dispatch[0]
        assert batch == list(range(1, 9))
        for task_id in batch[:3]:
            succeed(s, task_id, 0, 1.0)
            assert not s.poll(1.0).dispatch, "refilled before half the pipeline was free"
        succeed(s, batch[3], 0, 1.0)
        assert s.poll(1.0).dispatch == {0: [9, 10, 11, 12]}  # one batch of 4

    def test_refill_low_water_with_deep_prefetch(self) -> None:
        s = farm(slots=1)
        observe(s, PIPELINE_SECONDS / 4)  # prefetch 4: capacity 5, refilled at 2 free
        assert s.prefetch == 4
        submit(s, *range(1, 11))
        batch = s.poll(0.0).dispatch[0]
        assert len(batch) == 5
        s.finished(batch[0], 0, 0.0, ok=True, duration=PIPELINE_SECONDS / 4)
        assert not s.poll(0.0).dispatch
        s.finished(batch[1], 0, 0.0, ok=True, duration=PIPELINE_SECONDS / 4)
        assert s.poll(0.0).dispatch == {0: [6, 7]}

    def test_idle_rank_always_gets_work(self) -> None:
        s = farm(ranks=1, slots=4)
        submit(s, *range(1, 8))
        assert len(sent(s.poll(0.0))) == 7  # below capacity 8
        assert s.add_worker(1, 4, 0.0)
        submit(s, 8)
        assert s.poll(0.0).dispatch == {1: [8]}

    def test_a_rank_is_idle_until_it_holds_a_task_and_again_once_it_holds_none(self) -> None:
        """What a submit asks (`Farm.submit`) before it sends a task from its own thread."""
        s = farm(ranks=2)
        assert s.has_idle_rank()
        submit(s, 1, 2)
        s.poll(0.0)
        assert not s.has_idle_rank()  # one task each
        s.finished(1, 0, 0.0, ok=True, duration=LONG)
        assert s.has_idle_rank()
        s.rank_lost(0, 0.0)
        assert not s.has_idle_rank()  # a lost rank is not idle

    def test_single_ready_task_goes_to_a_partly_busy_rank_below_low_water(self) -> None:
        # a rank whose free part is at least half its pipeline takes one task
        s = farm(slots=4)
        submit(s, 1, 2, 3, 4)
        s.poll(0.0)
        submit(s, 5)
        assert s.poll(0.0).dispatch == {0: [5]}

    def test_the_rank_named_next_is_the_one_the_next_task_goes_to(self) -> None:
        """What `Farm._ring_ahead` rings: wrong, the task's rank would sleep through its send."""
        s = farm(ranks=3)
        running: dict[int, int] = {}
        for task_id in range(1, 13):
            ahead = s.next_rank()
            submit(s, task_id)
            assert s.poll(0.0).dispatch == {ahead: [task_id]}
            running[task_id] = ahead
            if task_id % 3 == 0:  # every rank busy: they finish in another order than they started
                for done in sorted(running, key=lambda t: (t * 7) % 5):
                    assert succeed(s, done, running.pop(done)) is Decision.ACCEPT
        submit(s, *range(100, 200))
        s.poll(0.0)
        assert s.next_rank() is None  # no room: nothing to ring

    def test_no_ranks_no_dispatch(self) -> None:
        s = Scheduler()
        submit(s, 1)
        assert not s.poll(0.0)
        assert s.state(1) is TaskState.PENDING
        s.add_worker(0, 1, 1.0)
        assert s.poll(1.0).dispatch == {0: [1]}
        assert s.state(1) is TaskState.RUNNING and s.attempt(1) == 1


class TestPrefetch:
    def test_starts_at_one(self) -> None:
        assert Scheduler().prefetch == 1

    def test_tiny_tasks_go_deep(self) -> None:
        s = farm()
        observe(s, 1e-6)
        assert s.prefetch == MAX_PREFETCH

    def test_depth_matches_pipeline_seconds(self) -> None:
        s = farm()
        observe(s, PIPELINE_SECONDS / 8)
        assert s.prefetch == 8

    def test_long_tasks_go_to_one(self) -> None:
        s = farm()
        observe(s, 0.0)
        assert s.prefetch == MAX_PREFETCH
        observe(s, 10.0)
        assert s.prefetch == 1

    def test_failures_do_not_feed_the_mean(self) -> None:
        s = farm()
        submit(s, 1)
        s.poll(0.0)
        fail(s, 1, 0, duration=0.0)
        assert s.prefetch == 1

    def test_hysteresis_down(self) -> None:
        s = farm()
        observe(s, PIPELINE_SECONDS / 8)
        assert s.prefetch == 8
        observe(s, PIPELINE_SECONDS / 5, times=300)  # wants 5: not half of 8
        assert s.prefetch == 8
        observe(s, PIPELINE_SECONDS / 3.5, times=300)  # wants 4: half
        assert s.prefetch == 4

    def test_hysteresis_up(self) -> None:
        s = farm()
        observe(s, PIPELINE_SECONDS / 8)
        observe(s, PIPELINE_SECONDS / 15, times=300)  # wants 15: not twice 8
        assert s.prefetch == 8
        observe(s, PIPELINE_SECONDS / 20, times=300)
        assert s.prefetch == 16  # set when the wanted depth first reached twice 8

    def test_running_mean_is_an_ewma(self) -> None:
        s = farm()
        observe(s, PIPELINE_SECONDS / 2)  # mean = 1 ms -> wants 2
        assert s.prefetch == 2
        # one long task moves the mean by DURATION_EWMA of the difference only
        observe(s, 50 * PIPELINE_SECONDS)
        mean = PIPELINE_SECONDS / 2 + DURATION_EWMA * (50 * PIPELINE_SECONDS - PIPELINE_SECONDS / 2)
        assert s.prefetch == max(1, math.ceil(PIPELINE_SECONDS / mean)) == 1

    def test_rebucketing_keeps_dispatch_consistent(self) -> None:
        s = farm(ranks=2, slots=1)
        submit(s, 1, 2)
        actions = s.poll(0.0)
        rank_of = {t: r for r, ids in actions.dispatch.items() for t in ids}
        s.finished(1, rank_of[1], 0.0, ok=True, duration=0.0)  # prefetch -> MAX_PREFETCH
        assert s.prefetch == MAX_PREFETCH
        submit(s, *range(3, 3 + 4 * MAX_PREFETCH))
        got = s.poll(0.0).dispatch
        # each rank filled to MAX_PREFETCH + 1; the one still holding task 2 gets one less
        assert sorted(len(v) for v in got.values()) == [MAX_PREFETCH, MAX_PREFETCH + 1]


# -- priorities ---------------------------------------------------------------
    def test_ranks_with_nothing_queued_are_marked_starting(self) -> None:
        """The master sends such a rank its first task on its own before the
        rest of a large dispatch: it is the next the rank starts."""
        s = farm(ranks=2, slots=1)  # prefetch 1: each rank holds two
        submit(s, 1, 2, 3, 4)
        actions = s.poll(0.0)
        assert actions.dispatch == {0: [1, 3], 1: [2, 4]} and actions.starting == {0, 1}
        succeed(s, 1, 0, 1.0)  # rank 0 runs task 3 with nothing behind it; rank 1 has 4 queued
        submit(s, 5, 6, now=1.0)
        actions = s.poll(1.0)
        assert actions.dispatch == {0: [5]} and actions.starting == {0}
        succeed(s, 3, 0, 2.0)
        succeed(s, 5, 0, 2.0)
        assert s.poll(2.0).starting == {0}  # idle: task 6 goes there
        assert not s.poll(2.0).starting  # nothing dispatched, nothing starting


class TestPriority:
    def test_higher_first(self) -> None:
        s = Scheduler()
        for task_id, prio in [(1, 0), (2, 5), (3, 1), (4, 5), (5, 0), (6, 9), (7, -3)]:
            submit(s, task_id, priority=prio)
        s.add_worker(0, 10, 0.0)
        assert s.poll(0.0).dispatch == {0: [6, 2, 4, 3, 1, 5, 7]}

    def test_fifo_among_equal(self) -> None:
        s = farm(slots=1)
        order = random.Random(3).sample(range(100), 30)
        for i, task_id in enumerate(order):
            submit(s, task_id, now=float(i))
        got = []
        now = 100.0
        while len(got) < len(order):
            for task_id in sent(s.poll(now)):
                got.append(task_id)
                s.finished(task_id, 0, now, ok=True, duration=1.0)
        assert got == order

    def test_high_priority_jumps_queued_work_not_dispatched_work(self) -> None:
        s = farm(slots=1)
        submit(s, 1, 2, 3, 4)
        assert sent(s.poll(0.0)) == [1, 2]
        submit(s, 99, priority=10)
        s.finished(1, 0, 1.0, ok=True, duration=1.0)
        assert sent(s.poll(1.0)) == [99]


# -- countdown / ETA ----------------------------------------------------------
class TestNotBefore:
    def test_not_dispatched_before(self) -> None:
        s = farm()
        submit(s, 1, now=0.0, not_before=5.0)
        assert s.state(1) is TaskState.SCHEDULED
        assert not s.has_ready()
        assert not s.poll(4.999).dispatch
        assert s.state(1) is TaskState.SCHEDULED

    def test_dispatched_at_and_after(self) -> None:
        s = farm()
        submit(s, 1, not_before=5.0)
        submit(s, 2, not_before=6.0)
        assert sent(s.poll(5.0)) == [1]
        assert sent(s.poll(100.0)) == [2]

    def test_next_wakeup_is_the_earliest(self) -> None:
        s = farm()
        assert s.next_wakeup() is None
        submit(s, 1, not_before=7.0)
        submit(s, 2, not_before=3.0)
        submit(s, 3, not_before=9.0)
        assert s.next_wakeup() == 3.0
        s.poll(3.0)
        assert s.next_wakeup() == 7.0

    def test_next_wakeup_skips_cancelled(self) -> None:
        s = farm()
        submit(s, 1, not_before=3.0)
        submit(s, 2, not_before=8.0)
        assert s.cancel(1)
        assert s.next_wakeup() == 8.0
        assert s.cancel(2)
        assert s.next_wakeup() is None

    def test_past_not_before_is_ready_at_once(self) -> None:
        s = farm()
        submit(s, 1, now=10.0, not_before=2.0)
        assert s.state(1) is TaskState.PENDING
        assert sent(s.poll(10.0)) == [1]

    def test_timed_task_keeps_its_priority(self) -> None:
        s = farm(slots=1)
        submit(s, 1, 2, 3)  # fill the rank (capacity 2) and queue one
        s.poll(0.0)
        submit(s, 4, not_before=5.0, priority=3)
        s.finished(1, 0, 6.0, ok=True, duration=1.0)
        assert sent(s.poll(6.0)) == [4]


# -- expires ------------------------------------------------------------------
class TestExpires:
    def test_not_started_by_expiry_expires(self) -> None:
        s = Scheduler()
        submit(s, 1, expires=3.0)
        submit(s, 2)
        s.add_worker(0, 1, 4.0)
        actions = s.poll(4.0)
        assert actions.expired == [1]
        assert sent(actions) == [2]
        assert s.state(1) is None
        assert s.statistics().failed == 1

    def test_started_in_time_does_not_expire(self) -> None:
        s = farm()
        submit(s, 1, expires=3.0)
        assert sent(s.poll(2.0)) == [1]
        assert not s.poll(10.0).expired
        assert succeed(s, 1, 0, 10.0) is Decision.ACCEPT

    def test_expiry_is_inclusive_of_its_instant(self) -> None:
        s = farm()
        submit(s, 1, expires=3.0)
        assert sent(s.poll(3.0)) == [1]

    def test_countdown_past_expiry_expires(self) -> None:
        s = farm()
        submit(s, 1, not_before=5.0, expires=3.0)
        actions = s.poll(5.0)
        assert actions.expired == [1] and not actions.dispatch

    def test_expired_tasks_fail_their_dependents(self) -> None:
        s = Scheduler()
        submit(s, 1, expires=1.0)
        submit(s, 2, inputs=[1])
        s.add_worker(0, 1, 2.0)
        assert s.poll(2.0).expired == [1]
        assert s.fail_dependents(1) == [(2, 1)]


# -- retries ------------------------------------------------------------------
class TestRetries:
    def test_retried_n_times_then_exhausted(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=3))
        decisions = []
        for i in range(4):
            assert sent(s.poll(float(i))) == [1]
            assert s.attempt(1) == i + 1
            decisions.append(fail(s, 1, 0, float(i), retryable=True))
            if i < 3:
                assert s.failures(1) == i + 1
                assert s.state(1) is TaskState.RETRY
        assert decisions == [Decision.RETRY] * 3 + [Decision.EXHAUSTED]
        assert s.state(1) is None and not s.has_work()
        st = s.statistics()
        assert st.retried == 3 and st.failed == 1

    def test_not_retryable_fails_at_once(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=5))
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=False) is Decision.FAIL
        assert s.state(1) is None
        assert s.statistics().retried == 0

    def test_max_retries_zero_fails(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=0))
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=True) is Decision.FAIL

    def test_backoff_is_exponential_and_capped(self) -> None:
        policy = TaskPolicy(max_retries=10, retry_backoff=1.0, retry_backoff_max=5.0, retry_jitter=False)
        s = farm()
        submit(s, 1, policy=policy)
        now = 0.0
        delays = []
        for _ in range(6):
            assert sent(s.poll(now)) == [1]
            assert fail(s, 1, 0, now, retryable=True) is Decision.RETRY
            wake = s.next_wakeup()
            assert wake is not None
            delays.append(wake - now)
            assert not s.poll(wake - 1e-6).dispatch
            assert s.state(1) is TaskState.RETRY
            now = wake
        assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]

    def test_no_backoff_retries_at_once(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        s.poll(0.0)
        assert fail(s, 1, 0, 2.0, retryable=True) is Decision.RETRY
        assert s.next_wakeup() == 2.0
        assert sent(s.poll(2.0)) == [1]

    @pytest.mark.parametrize("seed", range(5))
    def test_jitter_within_zero_and_delay(self, seed: int) -> None:
        policy = TaskPolicy(max_retries=20, retry_backoff=1.0, retry_backoff_max=8.0, retry_jitter=True)
        s = farm(rng=random.Random(seed))
        twin = random.Random(seed)
        submit(s, 1, policy=policy)
        now = 0.0
        delays = []
        for failures in range(1, 12):
            s.poll(now)
            fail(s, 1, 0, now, retryable=True)
            wake = s.next_wakeup()
            assert wake is not None
            nominal = min(8.0, 2.0 ** (failures - 1))
            assert 0.0 <= wake - now <= nominal
            assert wake - now == pytest.approx(twin.uniform(0, nominal))  # full jitter
            delays.append((wake - now) / nominal)
            now = wake
        assert len(set(delays)) > 1 and min(delays) < 0.9  # really randomised

    def test_retry_avoids_the_failing_rank(self) -> None:
        s = farm(ranks=2, slots=1)
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        submit(s, 2)
        actions = s.poll(0.0)
        rank_of = {t: r for r, ids in actions.dispatch.items() for t in ids}
        bad = rank_of[1]
        assert rank_of[2] != bad
        fail(s, 1, bad, retryable=True)
        # the failing rank is now idle, the other holds task 2: least-loaded
        # would pick the failing rank, the retry goes to the other one
        assert s.poll(0.0).dispatch == {rank_of[2]: [1]}

    def test_retry_runs_on_the_only_rank(self) -> None:
        s = farm(ranks=1)
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        s.poll(0.0)
        fail(s, 1, 0, retryable=True)
        assert s.poll(0.0).dispatch == {0: [1]}

    def test_retry_uses_failing_rank_when_the_others_are_full(self) -> None:
        s = farm(ranks=2, slots=1)
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        submit(s, 2, 3, 4)
        actions = s.poll(0.0)
        rank_of = {t: r for r, ids in actions.dispatch.items() for t in ids}
        bad = rank_of[1]
        fail(s, 1, bad, retryable=True)
        assert s.poll(0.0).dispatch == {bad: [1]}

    def test_cancel_during_backoff(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=1, retry_backoff=10.0, retry_jitter=False))
        s.poll(0.0)
        fail(s, 1, 0, retryable=True)
        assert s.cancel(1)
        assert not s.poll(20.0) and s.next_wakeup() is None


# -- crashes ------------------------------------------------------------------
class TestCrashes:
    def test_crash_counts_towards_max_crashes_not_retries(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=0, max_crashes=3))
        decisions = []
        for i in range(3):
            assert sent(s.poll(float(i))) == [1]
            decisions.append(fail(s, 1, 0, float(i), crashed=True, retryable=True))
            assert s.failures(1) == 0
        assert decisions == [Decision.RETRY, Decision.RETRY, Decision.QUARANTINE]
        st = s.statistics()
        assert st.retried == 0 and st.resubmitted == 2 and st.failed == 1

    def test_crash_then_real_failures_keep_their_own_budget(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=1, max_crashes=2))
        s.poll(0.0)
        assert fail(s, 1, 0, crashed=True) is Decision.RETRY
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=True) is Decision.RETRY
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=True) is Decision.EXHAUSTED

    def test_crash_is_retried_without_backoff(self) -> None:
        s = farm()
        policy = TaskPolicy(max_retries=0, retry_backoff=100.0, retry_jitter=False)
        submit(s, 1, policy=policy)
        s.poll(0.0)
        fail(s, 1, 0, 1.0, crashed=True)
        assert s.state(1) is TaskState.PENDING
        assert sent(s.poll(1.0)) == [1]

    def test_max_crashes_one_quarantines_at_once(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_crashes=1))
        s.poll(0.0)
        assert fail(s, 1, 0, crashed=True) is Decision.QUARANTINE
        assert s.state(1) is None


class TestDrainCutOff:
    def test_counts_false_does_not_use_a_retry(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=0, max_crashes=1))
        for _ in range(5):
            assert sent(s.poll(0.0)) == [1]
            assert fail(s, 1, 0, retryable=False, counts=False) is Decision.RETRY
            assert s.failures(1) == 0
        s.poll(0.0)
        assert succeed(s, 1, 0, 0.0) is Decision.ACCEPT
        assert s.statistics().retried == 0

    def test_counts_false_then_a_real_failure_fails(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        s.poll(0.0)
        fail(s, 1, 0, retryable=True, counts=False)
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=True) is Decision.RETRY
        s.poll(0.0)
        assert fail(s, 1, 0, retryable=True) is Decision.EXHAUSTED


# -- rank loss ----------------------------------------------------------------
class TestRankLoss:
    def test_requeues_all_its_tasks(self) -> None:
        s = farm(ranks=1, slots=2)
        submit(s, 1, 2, 3, 4, 5)
        assert sent(s.poll(0.0)) == [1, 2, 3, 4]
        assert sorted(s.rank_lost(0, 1.0)) == [1, 2, 3, 4]
        assert s.quarantined([1, 2, 3, 4]) == []
        assert all(s.state(t) is TaskState.PENDING for t in (1, 2, 3, 4))
        st = s.statistics()
        assert st.lost_ranks == (0,) and st.resubmitted == 4
        assert not st.ranks[0].alive
        assert s.add_worker(1, 2, 1.0)
        assert sent(s.poll(1.0)) == [1, 2, 3, 4]  # oldest first again

    def test_running_ones_count_a_crash_queued_ones_do_not(self) -> None:
        s = farm(ranks=1, slots=2)
        submit(s, 1, 2, 3, 4, policy=TaskPolicy(max_crashes=1))
        s.poll(0.0)
        requeued = s.rank_lost(0, 1.0)
        assert s.quarantined(requeued) == [1, 2]  # the two running ones
        assert s.state(1) is None and s.state(2) is None
        assert s.state(3) is TaskState.PENDING and s.state(4) is TaskState.PENDING
        st = s.statistics()
        assert st.failed == 2 and st.resubmitted == 2

    def test_crashes_accumulate_over_losses(self) -> None:
        s = Scheduler()
        submit(s, 1, policy=TaskPolicy(max_crashes=2))
        s.add_worker(0, 1, 0.0)
        s.poll(0.0)
        assert s.quarantined(s.rank_lost(0, 1.0)) == []
        s.add_worker(1, 1, 1.0)
        assert sent(s.poll(1.0)) == [1]
        assert s.quarantined(s.rank_lost(1, 2.0)) == [1]

    def test_lost_twice_is_a_no_op(self) -> None:
        s = farm()
        submit(s, 1)
        s.poll(0.0)
        assert s.rank_lost(0, 1.0) == [1]
        assert s.rank_lost(0, 2.0) == []
        assert s.rank_lost(42, 2.0) == []
        assert s.statistics().lost_ranks == (0,)

    def test_requeued_tasks_go_to_the_survivors(self) -> None:
        s = farm(ranks=2, slots=1)
        submit(s, 1, 2)
        actions = s.poll(0.0)
        rank_of = {t: r for r, ids in actions.dispatch.items() for t in ids}
        dead = rank_of[1]
        lost = s.rank_lost(dead, 1.0)
        got = s.poll(1.0).dispatch
        assert set(got) == {1 - dead} and sorted(got[1 - dead]) == sorted(lost)

    def test_lost_rank_gets_no_more_work(self) -> None:
        s = farm(ranks=2)
        s.rank_lost(0, 0.0)
        submit(s, 1, 2, 3, 4)
        assert set(s.poll(0.0).dispatch) == {1}


class TestZombies:
    """Late results from a rank declared lost: the first success wins, once."""

    def lose_task_1(self) -> tuple[Scheduler, int, int]:
        """Task 1 ran on a rank that was then declared lost."""
        s = farm(ranks=1)
        submit(s, 1)
        s.poll(0.0)
        assert s.rank_lost(0, 1.0) == [1]
        return s, 0, 1

    def test_zombie_result_accepted_and_the_copy_discarded(self) -> None:
        s, dead, task = self.lose_task_1()
        s.add_worker(1, 1, 1.0)
        assert s.poll(1.0).dispatch == {1: [task]}
        assert succeed(s, task, dead, 2.0) is Decision.ACCEPT
        assert succeed(s, task, 1, 3.0) is Decision.DISCARD
        st = s.statistics()
        assert st.done == 1 and st.zombies == 1 and st.duplicates == 1
        # the copy's slot is free again
        submit(s, 2)
        assert s.poll(3.0).dispatch == {1: [2]}

    def test_zombie_result_after_the_task_refinished_is_discarded(self) -> None:
        s, dead, task = self.lose_task_1()
        s.add_worker(1, 1, 1.0)
        s.poll(1.0)
        assert succeed(s, task, 1, 2.0) is Decision.ACCEPT
        assert succeed(s, task, dead, 3.0) is Decision.DISCARD
        st = s.statistics()
        assert st.done == 1 and st.zombies == 1 and st.duplicates == 1

    def test_zombie_result_before_redispatch_is_accepted(self) -> None:
        s, dead, task = self.lose_task_1()
        assert s.state(task) is TaskState.PENDING
        assert succeed(s, task, dead, 2.0) is Decision.ACCEPT
        assert s.state(task) is None and not s.has_work()
        s.add_worker(1, 1, 2.0)
        assert not s.poll(2.0).dispatch  # never run again

    def test_zombie_failure_is_discarded(self) -> None:
        s, dead, task = self.lose_task_1()
        assert fail(s, task, dead, 2.0, retryable=True) is Decision.DISCARD
        s.add_worker(1, 1, 2.0)
        s.poll(2.0)
        assert fail(s, task, dead, 2.0, retryable=True) is Decision.DISCARD
        assert s.state(task) is TaskState.RUNNING
        assert succeed(s, task, 1, 3.0) is Decision.ACCEPT
        st = s.statistics()
        assert st.zombies == 2 and st.duplicates == 0

    def test_zombie_of_a_task_it_queued_but_never_ran(self) -> None:
        s = farm(ranks=1, slots=1)
        submit(s, 1, 2)
        s.poll(0.0)
        s.rank_lost(0, 1.0)
        s.add_worker(1, 1, 1.0)
        s.poll(1.0)
        assert succeed(s, 2, 0, 2.0) is Decision.ACCEPT
        assert succeed(s, 1, 0, 2.0) is Decision.ACCEPT
        assert succeed(s, 1, 1, 3.0) is Decision.DISCARD
        assert succeed(s, 2, 1, 3.0) is Decision.DISCARD


class TestHeartbeat:
    def test_silent_rank_with_tasks_is_lost(self) -> None:
        s = farm(heartbeat_timeout=10.0)
        submit(s, 1)
        s.poll(0.0)
        s.heard_from(0, 5.0)
        # a lower bound until a poll has looked at the clocks again (rule 2
        # does not walk every rank after each message)
        assert s.next_wakeup() == 10.0
        assert not s.poll(10.0).lost_ranks
        assert s.next_wakeup() == 15.0
        assert not s.poll(15.0).lost_ranks
        assert s.poll(15.001).lost_ranks == [0]
        # reported until the master declares it lost
        assert s.poll(16.0).lost_ranks == [0]
        s.rank_lost(0, 16.0)
        assert not s.poll(100.0).lost_ranks

    def test_clocks_are_read_only_once_one_may_have_run_out(self) -> None:
        s = farm(ranks=2, heartbeat_timeout=10.0)
        submit(s, 1, 2)
        s.poll(0.0)  # both ranks hold a task, their clocks start at 0
        # a clock set back behind the scheduler's back: only a poll that reads
        # every rank's clock would see it, and none does before 10 s
        s._ranks[1].last_heard = -100.0
        assert not s.poll(9.9).lost_ranks
        assert s.poll(10.0).lost_ranks == [1]

    def test_idle_rank_is_never_lost(self) -> None:
        s = farm(ranks=2, heartbeat_timeout=10.0)
        submit(s, 1)
        rank = only_rank(s.poll(0.0))
        s.heard_from(rank, 1000.0)
        assert not s.poll(1000.0).lost_ranks
        succeed(s, 1, rank, 1000.0)
        assert not s.poll(1e6).lost_ranks
        assert s.next_wakeup() is None

    def test_dispatch_to_long_idle_rank_restarts_its_clock(self) -> None:
        s = farm(heartbeat_timeout=10.0)
        submit(s, 1, now=100.0)
        assert sent(s.poll(100.0)) == [1]
        assert s.next_wakeup() == 110.0
        assert not s.poll(109.0).lost_ranks
        assert s.poll(110.5).lost_ranks == [0]

    def test_no_timeout_no_loss(self) -> None:
        s = farm()
        submit(s, 1)
        s.poll(0.0)
        assert not s.poll(1e9).lost_ranks
        assert s.next_wakeup() is None

    def test_rank_reported_lost_gets_no_work_in_that_poll(self) -> None:
        s = farm(ranks=1, slots=2, heartbeat_timeout=10.0)
        submit(s, 1, policy=TaskPolicy(max_crashes=1))
        s.poll(0.0)
        submit(s, 2, now=20.0, policy=TaskPolicy(max_crashes=1))
        actions = s.poll(20.0)
        assert actions.lost_ranks == [0]
        assert 0 not in actions.dispatch and not actions.steal
        # as the master does next: only task 1, which ran there, is a crash
        requeued = s.rank_lost(0, 20.0)
        assert requeued == [1]
        assert s.quarantined(requeued) == [1]
        assert s.state(2) is TaskState.PENDING and s.attempt(2) == 0


# -- stealing -----------------------------------------------------------------
class TestStealing:
    def skewed(self) -> Scheduler:
        """Rank 0 (1 slot) runs task 1 with task 2 queued; rank 1 is idle."""
        s = farm(ranks=1, slots=1)
        submit(s, 1, 2)
        assert sent(s.poll(0.0)) == [1, 2]
        assert s.add_worker(1, 1, 0.0)
        return s

    def test_idle_rank_steals_queued_work(self) -> None:
        s = self.skewed()
        actions = s.poll(0.0)
        assert actions.steal == {0: [2]} and not actions.dispatch
        s.released(0, [2], 1.0)
        assert s.state(2) is TaskState.PENDING
        assert s.poll(1.0).dispatch == {1: [2]}
        assert s.attempt(2) == 1  # the steal did not use an attempt
        assert s.statistics().stolen == 1
        assert succeed(s, 2, 1, 2.0) is Decision.ACCEPT
        assert succeed(s, 1, 0, 2.0) is Decision.ACCEPT

    def test_a_finished_steal_leaves_room_for_the_next(self) -> None:
        s = self.skewed()
        assert s.poll(0.0).steal == {0: [2]}
        s.released(0, [2], 1.0)
        assert s.poll(1.0).dispatch == {1: [2]}
        submit(s, 3, 4, now=1.0)
        assert s.poll(1.0).dispatch == {0: [3], 1: [4]}  # each rank a task queued again
        assert succeed(s, 2, 1, 2.0) is Decision.ACCEPT
        assert succeed(s, 4, 1, 2.0) is Decision.ACCEPT
        # rank 1 idle, 3 queued on rank 0: the first steal, over, does not count against this one
        assert s.poll(2.0).steal == {0: [3]}

    def test_no_steal_while_ready_work_exists(self) -> None:
        s = farm(ranks=1, slots=1)
        submit(s, 1, 2, 3)
        s.poll(0.0)
        s.add_worker(1, 1, 0.0)
        actions = s.poll(0.0)
        assert actions.dispatch == {1: [3]} and not actions.steal

    def test_never_steals_running_tasks(self) -> None:
        s = farm(ranks=1, slots=2)
        submit(s, 1, 2)
        s.poll(0.0)
        s.add_worker(1, 1, 0.0)
        assert not s.poll(0.0).steal

    def test_no_steal_without_idle_rank(self) -> None:
        s = farm(ranks=2, slots=1)
        submit(s, 1, 2, 3, 4)
        s.poll(0.0)
        assert not s.poll(0.0).steal

    def test_started_task_not_released_is_not_duplicated(self) -> None:
        s = self.skewed()
        assert s.poll(0.0).steal == {0: [2]}
        succeed(s, 1, 0, 0.5)  # task 2 starts on rank 0 meanwhile
        s.released(0, [], 1.0)  # so the worker gives nothing back
        for now in (1.0, 2.0, 3.0):
            actions = s.poll(now)
            assert not actions.dispatch and not actions.steal
        assert s.state(2) is TaskState.RUNNING and s.attempt(2) == 1
        assert succeed(s, 2, 0, 4.0) is Decision.ACCEPT
        assert s.statistics().stolen == 0

    def test_one_task_stolen_per_idle_rank(self) -> None:
        s = farm(ranks=1, slots=2)  # capacity 4: two running, two queued
        submit(s, 1, 2, 3, 4)
        s.poll(0.0)
        s.add_worker(1, 1, 0.0)
        assert s.poll(0.0).steal == {0: [4]}
        # the steal is under way: a second poll must not take more
        assert not s.poll(0.0).steal
        s.released(0, [4], 1.0)
        assert s.poll(1.0).dispatch == {1: [4]}

    def test_an_idle_rank_steals_half_of_a_long_queue(self) -> None:
        s = farm(ranks=1, slots=4)  # capacity 8: four running, four queued
        submit(s, *range(1, 9))
        assert sent(s.poll(0.0)) == list(range(1, 9))
        s.add_worker(1, 2, 0.0)
        assert s.poll(0.0).steal == {0: [7, 8]}  # the newest half, in one message
        assert not s.poll(0.0).steal  # under way: it serves the idle rank already
        s.released(0, [7, 8], 1.0)
        assert s.poll(1.0).dispatch == {1: [7, 8]}
        assert s.statistics().stolen == 2

    def test_two_idle_ranks_share_a_long_queue(self) -> None:
        s = farm(ranks=1, slots=4)
        submit(s, *range(1, 9))
        s.poll(0.0)
        s.add_worker(1, 2, 0.0)
        s.add_worker(2, 2, 0.0)
        assert s.poll(0.0).steal == {0: [6, 7, 8]}  # two thirds of four, rounded up
        assert not s.poll(0.0).steal
        s.released(0, [6, 7, 8], 1.0)
        got = s.poll(1.0).dispatch
        assert sorted(got) == [1, 2] and sorted(sent(Actions(dispatch=got))) == [6, 7, 8]

    def test_two_idle_ranks_steal_two(self) -> None:
        s = farm(ranks=1, slots=2)
        submit(s, 1, 2, 3, 4)
        s.poll(0.0)
        s.add_worker(1, 1, 0.0)
        s.add_worker(2, 1, 0.0)
        assert s.poll(0.0).steal == {0: [3, 4]}
        s.released(0, [3, 4], 1.0)
        got = s.poll(1.0).dispatch
        assert got in ({1: [3], 2: [4]}, {2: [3], 1: [4]})

    def test_release_from_lost_rank_is_ignored(self) -> None:
        s = self.skewed()
        s.poll(0.0)
        assert sorted(s.rank_lost(0, 0.5)) == [1, 2]
        s.released(0, [2], 1.0)  # arrives late
        assert s.statistics().stolen == 0
        assert s.poll(1.0).dispatch == {1: [1, 2]}  # rank 1 (capacity 2) runs both

    def test_release_twice_counts_once(self) -> None:
        s = self.skewed()
        s.poll(0.0)
        s.released(0, [2], 1.0)
        s.released(0, [2], 1.0)
        assert s.statistics().stolen == 1
        assert s.poll(1.0).dispatch == {1: [2]}


# -- speculation --------------------------------------------------------------
SPECULATIVE = TaskPolicy(speculative=True)


class TestSpeculation:
    def straggling(self, policy: TaskPolicy = SPECULATIVE) -> tuple[Scheduler, int, int]:
        """Two ranks; tasks of 0.1 s seen; task 1 runs on one rank (returned
        first), the other rank (second) is idle."""
        s = farm(ranks=2, slots=1)
        observe(s, 0.1, times=3)
        submit(s, 1, policy=policy)
        runs = only_rank(s.poll(0.0))
        return s, runs, 1 - runs

    def test_a_straggler_gets_a_copy_on_an_idle_rank_and_the_first_success_wins(self) -> None:
        s, runs, idle = self.straggling()
        assert not s.poll(0.2).dispatch  # 0.2 s: not yet 3x the mean
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert not s.poll(0.6).dispatch  # one copy, not one per poll
        assert s.attempt(1) == 1  # the copy is the same attempt
        assert s.statistics().speculated == 1
        assert succeed(s, 1, idle, 0.7) is Decision.ACCEPT  # the copy wins
        assert s.revoking and s.take_revokes() == {runs: [1]}  # the straggler is cut off
        assert not s.revoking and s.take_revokes() == {}
        assert succeed(s, 1, runs, 5.0) is Decision.DISCARD  # the straggler, late
        stats = s.statistics()
        assert (stats.done, stats.duplicates) == (3 + 1, 1)  # 3 observed tasks, then task 1

    def test_the_original_winning_revokes_the_copy(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert succeed(s, 1, runs, 0.6) is Decision.ACCEPT
        assert s.take_revokes() == {idle: [1]}

    def test_a_revoked_copy_cut_off_is_dropped_uncounted_and_frees_its_rank(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert succeed(s, 1, idle, 0.7) is Decision.ACCEPT
        s.take_revokes()
        assert s.statistics().duplicates == 1  # counted once, when revoked
        # its answer, the cut-off's failure (a killed child: a crash), changes nothing
        assert fail(s, 1, runs, 0.8, crashed=True) is Decision.DISCARD
        stats = s.statistics()
        assert (stats.done, stats.failed, stats.duplicates, stats.resubmitted) == (4, 0, 1, 0)
        submit(s, 2, now=1.0)
        assert only_rank(s.poll(1.0)) in {runs, idle}  # both ranks free again
        submit(s, 3, now=1.0)
        assert s.poll(1.0).dispatch

    def test_a_revoked_copy_given_back_unstarted_is_not_requeued(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert succeed(s, 1, runs, 0.6) is Decision.ACCEPT
        assert s.take_revokes() == {idle: [1]}
        s.released(idle, [1], 0.7)
        assert not s.poll(0.8).dispatch and not s.has_work()
        assert s.statistics().duplicates == 1

    def test_a_failed_copy_revokes_nothing(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert fail(s, 1, idle, 0.6, retryable=False) is Decision.DISCARD
        assert succeed(s, 1, runs, 1.0) is Decision.ACCEPT
        assert not s.revoking

    def test_a_task_without_a_copy_revokes_nothing(self) -> None:
        s, runs, _ = self.straggling()
        assert succeed(s, 1, runs, 0.2) is Decision.ACCEPT
        assert not s.revoking

    def test_the_master_is_told_when_to_look_again(self) -> None:
        s, _, _ = self.straggling()
        assert s.next_wakeup() == pytest.approx(3 * 0.1)  # SPECULATE_FACTOR x the mean, from dispatch
        s2, _, _ = self.straggling(POLICY)
        assert s2.next_wakeup() is None

    def test_without_the_policy_no_copy(self) -> None:
        s, _, _ = self.straggling(POLICY)
        assert not s.poll(100.0).dispatch

    def test_a_copy_that_fails_leaves_the_decision_to_the_other(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert fail(s, 1, idle, 0.6, retryable=False) is Decision.DISCARD
        assert s.state(1) is TaskState.RUNNING
        assert succeed(s, 1, runs, 1.0) is Decision.ACCEPT

    def test_losing_the_original_rank_keeps_the_copy_running(self) -> None:
        s, runs, idle = self.straggling()
        assert s.poll(0.5).dispatch == {idle: [1]}
        assert s.rank_lost(runs, 0.6) == []  # nothing requeued: the copy still runs
        assert not s.poll(0.7).dispatch
        assert succeed(s, 1, idle, 0.8) is Decision.ACCEPT

    def test_ready_work_goes_first(self) -> None:
        s, _, idle = self.straggling()
        submit(s, 2, now=0.5)
        assert s.poll(0.5).dispatch == {idle: [2]}

    def test_the_slowest_straggler_first(self) -> None:
        s = farm(ranks=3, slots=1)
        observe(s, 0.1, times=3)
        submit(s, 1, policy=SPECULATIVE)
        first = only_rank(s.poll(0.0))
        submit(s, 2, policy=SPECULATIVE, now=0.3)
        second = only_rank(s.poll(0.3))
        (idle,) = {0, 1, 2} - {first, second}
        # one idle rank: task 1, running longer, gets the copy
        assert s.poll(0.9).dispatch == {idle: [1]}


# -- dependencies -------------------------------------------------------------
class TestDependencies:
    def test_waits_for_all_inputs(self) -> None:
        s = farm(slots=4)
        submit(s, 1, 2)
        submit(s, 3, inputs=[1, 2])
        assert s.state(3) is TaskState.SCHEDULED
        assert sent(s.poll(0.0)) == [1, 2]
        succeed(s, 1, 0, 1.0)
        assert not s.poll(1.0).dispatch and s.state(3) is TaskState.SCHEDULED
        succeed(s, 2, 0, 2.0)
        assert sent(s.poll(2.0)) == [3]

    def test_an_input_is_awaited_until_its_dependents_have_it(self) -> None:
        s = farm(slots=4)
        submit(s, 1, 2)
        submit(s, 3, inputs=[1])
        # the master marks 1 urgent when it sends it: its result goes back at once
        assert s.awaited(1) and not s.awaited(2) and not s.awaited(3)
        s.poll(0.0)
        succeed(s, 1, 0, 1.0)
        assert not s.awaited(1)

    def test_input_failing_then_retried_still_counts(self) -> None:
        s = farm(slots=4)
        submit(s, 1, policy=TaskPolicy(max_retries=1))
        submit(s, 2, inputs=[1])
        s.poll(0.0)
        fail(s, 1, 0, retryable=True)
        assert s.state(2) is TaskState.SCHEDULED and s.fail_dependents(1) == []
        assert sent(s.poll(0.0)) == [1]
        succeed(s, 1, 0, 1.0)
        assert sent(s.poll(1.0)) == [2]

    def test_finished_inputs_are_ignored(self) -> None:
        s = farm()
        submit(s, 2, inputs=[1])  # 1 is unknown: finished, the master's business
        assert s.state(2) is TaskState.PENDING
        assert sent(s.poll(0.0)) == [2]

    def test_dependent_keeps_its_countdown(self) -> None:
        s = farm()
        submit(s, 1)
        submit(s, 2, inputs=[1], not_before=50.0)
        s.poll(0.0)
        succeed(s, 1, 0, 1.0)
        assert not s.poll(1.0).dispatch
        assert s.next_wakeup() == 50.0
        assert sent(s.poll(50.0)) == [2]

    def test_fail_dependents_is_transitive(self) -> None:
        s = farm()
        submit(s, 1)
        submit(s, 2, inputs=[1])
        submit(s, 3, inputs=[2])
        submit(s, 4, inputs=[1, 3])
        submit(s, 5)  # unrelated
        s.poll(0.0)
        assert fail(s, 1, 0) is Decision.FAIL
        pairs = s.fail_dependents(1)
        assert sorted(pairs) == [(2, 1), (3, 2), (4, 1)]
        assert all(s.state(t) is None for t in (2, 3, 4))
        assert s.state(5) is not None
        assert s.fail_dependents(1) == []  # once
        assert s.statistics().failed == 4

    def test_cancelled_input_fails_dependents(self) -> None:
        s = Scheduler()
        submit(s, 1)
        submit(s, 2, inputs=[1])
        submit(s, 3, inputs=[2])
        assert s.cancel(1)
        assert sorted(s.fail_dependents(1)) == [(2, 1), (3, 2)]
        st = s.statistics()
        assert st.cancelled == 1 and st.failed == 2 and not s.has_work()

    def test_diamond_dependency_counted_once(self) -> None:
        s = farm(slots=4)
        submit(s, 1)
        submit(s, 2, inputs=[1])
        submit(s, 3, inputs=[1])
        submit(s, 4, inputs=[2, 3])
        s.poll(0.0)
        succeed(s, 1, 0, 1.0)
        assert sorted(sent(s.poll(1.0))) == [2, 3]
        succeed(s, 2, 0, 2.0)
        assert not s.poll(2.0).dispatch
        succeed(s, 3, 0, 3.0)
        assert sent(s.poll(3.0)) == [4]

    def test_long_chain_resolves_fast(self) -> None:
        n = 10_000
        start = time.perf_counter()
        s = farm()
        submit(s, 0)
        for task_id in range(1, n):
            submit(s, task_id, inputs=[task_id - 1])
        done = 0
        now = 0.0
        while s.has_work():
            now += 1.0
            for task_id in sent(s.poll(now)):
                assert task_id == done
                assert succeed(s, task_id, 0, now) is Decision.ACCEPT
                done += 1
        assert done == n
        assert time.perf_counter() - start < 1.0

    def test_long_chain_fails_without_recursion(self) -> None:
        n = 10_000
        s = farm()
        submit(s, 0)
        for task_id in range(1, n):
            submit(s, task_id, inputs=[task_id - 1])
        s.poll(0.0)
        start = time.perf_counter()
        fail(s, 0, 0)
        pairs = s.fail_dependents(0)
        assert time.perf_counter() - start < 1.0
        assert sorted(pairs) == [(i, i - 1) for i in range(1, n)]
        assert not s.has_work()


# -- cancel / withdraw --------------------------------------------------------
class TestCancel:
    def test_pending(self) -> None:
        s = Scheduler()
        submit(s, 1)
        assert s.cancel(1)
        s.add_worker(0, 1, 0.0)
        assert not s.poll(0.0).dispatch
        assert s.state(1) is None and not s.has_work()

    def test_scheduled(self) -> None:
        s = farm()
        submit(s, 1, not_before=5.0)
        assert s.cancel(1)
        assert not s.poll(10.0).dispatch

    def test_retry(self) -> None:
        s = farm()
        submit(s, 1, policy=TaskPolicy(max_retries=2, retry_backoff=1.0, retry_jitter=False))
        s.poll(0.0)
        fail(s, 1, 0, retryable=True)
        assert s.state(1) is TaskState.RETRY
        assert s.cancel(1)
        assert not s.poll(10.0).dispatch

    def test_running_cannot_be_cancelled(self) -> None:
        s = farm()
        submit(s, 1)
        s.poll(0.0)
        assert not s.cancel(1)
        assert s.state(1) is TaskState.RUNNING
        assert succeed(s, 1, 0, 1.0) is Decision.ACCEPT

    def test_done_or_unknown_cannot_be_cancelled(self) -> None:
        s = farm()
        submit(s, 1)
        s.poll(0.0)
        succeed(s, 1, 0, 1.0)
        assert not s.cancel(1)
        assert not s.cancel(77)
        assert s.statistics().cancelled == 0

    def test_withdraw_undoes_a_dispatch(self) -> None:
        s = farm(slots=1)
        submit(s, 1, 2, 3)
        assert sent(s.poll(0.0)) == [1, 2]
        s.withdraw(2, 0)
        assert s.state(2) is None
        assert s.statistics().cancelled == 1
        succeed(s, 1, 0, 1.0)
        # both slots of the pipeline are free again: capacity restored
        assert sent(s.poll(1.0)) == [3]
        submit(s, 4)
        assert sent(s.poll(1.0)) == [4]
        assert succeed(s, 2, 0, 2.0) is Decision.DISCARD


# -- statistics ---------------------------------------------------------------
class TestStatistics:
    def test_counts(self) -> None:
        s = farm(ranks=1, slots=1)
        retry = TaskPolicy(max_retries=1)
        submit(s, 1, 2, policy=retry)  # 1: retried then done; 2: stolen then done
        submit(s, 3, not_before=100.0)  # cancelled
        submit(s, 4)  # lost with its rank, then fails
        assert sent(s.poll(0.0)) == [1, 2]
        s.add_worker(1, 1, 0.0)
        assert s.poll(0.0).dispatch == {1: [4]}
        fail(s, 1, 0, retryable=True)  # retried
        assert s.rank_lost(1, 1.0) == [4]  # resubmitted
        actions = s.poll(1.0)
        assert sent(actions) == [1] and not actions.steal
        s.add_worker(2, 1, 1.0)
        actions = s.poll(1.0)
        assert actions.dispatch == {2: [4]} and not actions.steal
        assert fail(s, 4, 2, 1.0) is Decision.FAIL
        assert s.poll(1.0).steal == {0: [1]}
        s.released(0, [1], 2.0)  # stolen
        assert s.poll(2.0).dispatch == {2: [1]}
        assert s.cancel(3)
        st = s.statistics()
        assert (st.submitted, st.done, st.failed, st.cancelled) == (4, 0, 1, 1)
        assert (st.retried, st.resubmitted, st.stolen) == (1, 1, 1)
        assert (st.running, st.pending) == (2, 0)
        s.finished(2, 0, 3.0, ok=True, duration=2.0)
        s.finished(1, 2, 3.0, ok=True, duration=0.5)
        st = s.statistics()
        assert (st.done, st.running, st.pending) == (2, 0, 0)
        assert st.lost_ranks == (1,)
        assert st.ranks[0].tasks == 1 and st.ranks[0].failed == 1 and st.ranks[0].busy_time == 2.0
        assert st.ranks[2].tasks == 1 and st.ranks[2].failed == 1 and st.ranks[2].alive
        assert not st.ranks[1].alive
        assert not s.has_work()


# -- random event orders ------------------------------------------------------
class _Sim:
    """The master and its workers, played with random events against the scheduler."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.s = Scheduler(heartbeat_timeout=5.0, rng=random.Random(seed))
        self.now = 0.0
        self.slots: dict[int, int] = {}
        self.queues: dict[int, list[int]] = {}  # live worker -> tasks received, in order
        self.zombies: dict[int, list[int]] = {}  # lost rank -> tasks it may still report
        self.steals: dict[int, list[list[int]]] = {}
        self.submitted: list[int] = []
        self.outcome: dict[int, str] = {}
        self.accepts: collections.Counter[int] = collections.Counter()
        self.next_rank = 0

    # the master's side
    def add_rank(self) -> None:
        rank = self.next_rank
        self.next_rank += 1
        assert self.s.add_worker(rank, self.rng.randint(1, 3), self.now)
        self.slots[rank] = self.s.statistics().ranks[rank].slots
        self.queues[rank] = []
        self.steals[rank] = []

    def decided(self, task_id: int, how: str) -> None:
        assert task_id not in self.outcome, f"task {task_id} decided twice: {self.outcome[task_id]}, {how}"
        self.outcome[task_id] = how
        if how != "accept":
            for dependent, _ in self.s.fail_dependents(task_id):
                assert dependent not in self.outcome
                self.outcome[dependent] = "dependency"

    def lose(self, rank: int) -> None:
        requeued = self.s.rank_lost(rank, self.now)
        for task_id in self.s.quarantined(requeued):
            self.decided(task_id, "quarantined")
        self.zombies[rank] = self.queues.pop(rank)
        self.steals.pop(rank)

    def poll(self) -> None:
        actions = self.s.poll(self.now)
        for rank in actions.lost_ranks:
            self.lose(rank)
        for task_id in actions.expired:
            self.decided(task_id, "expired")
        for rank, ids in actions.steal.items():
            assert rank in self.queues, "steal from a rank not alive"
            self.steals[rank].append(ids)
        for rank, ids in actions.dispatch.items():
            assert rank in self.queues, "dispatch to a rank not alive"
            assert all(self.s.state(t) is TaskState.RUNNING for t in ids)
            self.queues[rank].extend(ids)

    def result(self, rank: int, task_id: int, kind: str) -> None:
        self.s.heard_from(rank, self.now)
        zombie = rank in self.zombies
        decision = self.s.finished(
            task_id,
            rank,
            self.now,
            ok=kind == "ok",
            duration=self.rng.random() * 1e-3,
            retryable=kind == "retryable",
            crashed=kind == "crash",
        )
        if zombie and kind != "ok":
            assert decision is Decision.DISCARD
        if decision is Decision.ACCEPT:
            self.accepts[task_id] += 1
            assert self.accepts[task_id] == 1, f"task {task_id} accepted twice"
            self.decided(task_id, "accept")
        elif decision in (Decision.FAIL, Decision.EXHAUSTED, Decision.QUARANTINE):
            self.decided(task_id, decision.value)

    # the workers' side
    def work(self, rank: int, kind: str) -> None:
        queue = self.queues[rank]
        task_id = queue.pop(self.rng.randrange(min(len(queue), self.slots[rank])))
        self.result(rank, task_id, kind)

    def answer_steal(self, rank: int) -> None:
        wanted = set(self.steals[rank].pop(0))
        queue = self.queues[rank]
        running, queued = queue[: self.slots[rank]], queue[self.slots[rank] :]
        given = [t for t in queued if t in wanted]
        self.queues[rank] = running + [t for t in queued if t not in wanted]
        self.s.heard_from(rank, self.now)
        self.s.released(rank, given, self.now)

    # the play
    #: how often each event comes up; one that cannot happen now is skipped
    EVENTS = {
        "submit": 20,
        "poll": 20,
        "work": 25,
        "answer_steal": 7,
        "lose": 2,
        "zombie": 8,
        "cancel": 2,
        "add_rank": 4,
        "heartbeat": 12,
    }

    def step(self) -> None:
        rng = self.rng
        self.now += rng.random() * 0.8
        live = list(self.queues)
        event = rng.choices(list(self.EVENTS), weights=list(self.EVENTS.values()))[0]
        if event == "submit" and len(self.submitted) < 120:
            task_id = len(self.submitted)
            present = [t for t in self.submitted[-20:] if self.s.state(t) is not None]
            inputs = rng.sample(present, min(len(present), rng.choice((0, 0, 0, 1, 2))))
            self.s.submit(
                task_id,
                self.now,
                policy=TaskPolicy(
                    max_retries=rng.randint(0, 2), max_crashes=rng.randint(1, 3), speculative=rng.random() < 0.3
                ),
                priority=rng.choice((0, 0, 1, 5)),
                not_before=self.now + rng.random() if rng.random() < 0.2 else None,
                expires=self.now + 3 * rng.random() if rng.random() < 0.1 else None,
                inputs=inputs,
            )
            self.submitted.append(task_id)
        elif event == "poll":
            self.poll()
        elif event == "work" and (busy := [r for r in live if self.queues[r]]):
            kind = rng.choice(("ok", "ok", "ok", "retryable", "retryable", "fatal", "crash"))
            self.work(rng.choice(busy), kind)
        elif event == "answer_steal" and (asked := [r for r in live if self.steals[r]]):
            self.answer_steal(rng.choice(asked))
        elif event == "lose" and live:
            self.lose(rng.choice(live))
        elif event == "zombie" and (late := [r for r, q in self.zombies.items() if q]):
            rank = rng.choice(late)
            task_id = self.zombies[rank].pop(rng.randrange(len(self.zombies[rank])))
            self.result(rank, task_id, rng.choice(("ok", "ok", "retryable", "crash")))
        elif event == "cancel" and self.submitted:
            task_id = rng.choice(self.submitted)
            if self.s.cancel(task_id):
                self.decided(task_id, "cancelled")
        elif event == "add_rank" and len(live) < 6:
            self.add_rank()
        elif event == "heartbeat" and live:
            self.s.heard_from(rng.choice(live), self.now)

    def finish(self) -> None:
        """No more losses: survivors (and any zombies) report everything."""
        if not self.queues:
            self.add_rank()
        for _ in range(10_000):
            if not self.s.has_work():
                break
            wake = self.s.next_wakeup()
            self.now = max(self.now + 0.01, wake if wake is not None else 0.0)
            for rank in self.queues:
                self.s.heard_from(rank, self.now)
            self.poll()
            for rank in list(self.queues):
                while self.steals[rank]:
                    self.answer_steal(rank)
                while self.queues[rank]:
                    self.work(rank, "ok")
            for rank, queue in self.zombies.items():
                while queue:
                    self.result(rank, queue.pop(), "ok")
        else:
            pytest.fail("the scheduler never finished its work")


class TestWeights:
    """An entry may stand for a bundle of the user's calls: counts and capacity are in calls."""

    def test_counts_are_in_calls(self) -> None:
        s = farm()
        submit(s, 1, weight=5)
        st = s.statistics()
        assert st.submitted == 5 and st.pending == 5 and st.running == 0
        assert sent(s.poll(0.0)) == [1]
        assert s.statistics().running == 5
        assert s.finished(1, 0, 0.1, ok=True, duration=0.05, failed_parts=2) is Decision.ACCEPT
        st = s.statistics()
        assert (st.done, st.failed, st.running, st.pending) == (3, 2, 0, 0)
        assert (st.ranks[0].tasks, st.ranks[0].failed) == (3, 2)

    def test_capacity_counts_calls(self) -> None:
        s = farm(ranks=2)  # prefetch 1: each rank holds 2 calls
        submit(s, 1, weight=2)
        submit(s, 2, weight=2)
        submit(s, 3)
        assert s.rooms() == [2, 2]
        actions = s.poll(0.0)
        assert sorted(sent(actions)) == [1, 2]  # each rank full with one bundle
        assert s.rooms() == [] and s.ready_weight() == 1
        rank_of_1 = next(r for r, ids in actions.dispatch.items() if 1 in ids)
        assert succeed(s, 1, rank_of_1) is Decision.ACCEPT
        assert s.rooms() == [2]
        assert s.poll(1.0).dispatch == {rank_of_1: [3]}

    def test_ready_weight_stops_counting_at_its_limit(self) -> None:
        s = farm()
        for task_id in range(1, 101):
            submit(s, task_id, weight=2)
        assert s.ready_weight() == 200
        assert 10 <= s.ready_weight(limit=10) < 12

    def test_rooms_are_what_a_refill_would_send(self) -> None:
        s = farm(ranks=2)
        observe(s, PIPELINE_SECONDS / 8)  # prefetch 8: each rank holds 9 calls
        submit(s, 1, weight=6)
        assert s.poll(0.0).dispatch and s.rooms() == [9]  # 3 free of 9: no refill before half is free
        submit(s, 2, weight=9)
        assert sent(s.poll(0.0)) == [2]
        assert s.rooms() == []

    def test_prefetch_follows_the_time_per_call(self) -> None:
        one, bundled = farm(), farm()
        observe(one, 0.001)
        submit(bundled, 1, weight=10)
        bundled.poll(0.0)
        assert bundled.finished(1, 0, 0.0, ok=True, duration=0.01) is Decision.ACCEPT
        assert bundled.prefetch == one.prefetch > 1

    def test_a_bundle_moves_the_mean_as_its_calls_would(self) -> None:
        one_by_one, bundled = farm(), farm()
        observe(one_by_one, 1.0)
        observe(one_by_one, 0.001, times=20)
        observe(bundled, 1.0)
        submit(bundled, 1, weight=20)
        bundled.poll(0.0)
        bundled.finished(1, 0, 0.0, ok=True, duration=0.02)
        assert bundled._mean_duration == pytest.approx(one_by_one._mean_duration)

    def test_stolen_and_resubmitted_count_calls(self) -> None:
        s = farm()
        submit(s, 1)
        submit(s, 2, weight=3)
        assert sent(s.poll(0.0)) == [1, 2]  # one refill may overfill the rank
        assert s.rooms() == []
        assert s.add_worker(1, 1, 0.0)
        assert s.poll(0.0).steal == {0: [2]}  # rank 1 sits idle: the queued bundle comes back
        s.released(0, [2], 0.1)
        assert s.statistics().stolen == 3
        assert s.poll(0.1).dispatch == {1: [2]}
        assert s.rank_lost(1, 1.0) == [2]
        assert s.statistics().resubmitted == 3

    def test_dissolve_removes_a_requeued_bundle_for_its_calls_to_go_alone(self) -> None:
        s = farm()
        submit(s, 1, weight=4)
        s.poll(0.0)
        assert s.rank_lost(0, 1.0) == [1]
        assert s.dissolve(1) == 4
        assert s.state(1) is None and not s.has_work()
        st = s.statistics()
        assert st.submitted == 0 and st.pending == 0 and st.resubmitted == 4
        assert s.add_worker(1, 1, 1.0)
        assert not s.poll(1.0).dispatch  # its stale queue item is skipped
        submit(s, 11, 12, 13, 14, now=1.0)  # the master submits its calls again
        assert s.statistics().submitted == 4

    def test_a_bundle_others_depend_on_is_not_dissolved(self) -> None:
        s = farm()
        submit(s, 1, weight=4)
        submit(s, 2, inputs=[1])
        s.poll(0.0)
        s.rank_lost(0, 1.0)
        assert s.dissolve(1) == 0 and s.state(1) is TaskState.PENDING
        assert s.dissolve(99) == 0

    def test_cancelled_parts_and_calls_never_handed_over(self) -> None:
        s = farm()
        submit(s, 1, weight=5)
        s.drop_parts(1, 2)
        s.cancelled_outside()
        st = s.statistics()
        assert (st.submitted, st.cancelled, st.pending) == (6, 3, 3)
        assert sent(s.poll(0.0)) == [1]
        assert succeed(s, 1, 0) is Decision.ACCEPT
        st = s.statistics()
        assert st.done + st.failed + st.cancelled == st.submitted == 6


class TestPrefetchBytes:
    """Large arguments are prefetched only up to PREFETCH_BYTES per rank; idle slots always get work."""

    def test_large_tasks_stop_the_prefetch_at_the_bound(self) -> None:
        s = farm(ranks=1)
        observe(s, 0.0)  # instant tasks: the deepest pipeline
        half = PREFETCH_BYTES // 2
        submit(s, *range(1, 11), nbytes=half)
        assert sent(s.poll(0.0)) == [1, 2]  # the second reaches the bound: no third
        assert s.rooms() == []
        assert s.finished(1, 0, 0.0, ok=True, duration=0.0) is Decision.ACCEPT
        assert sent(s.poll(0.0)) == [3]  # under the bound again: one more
        submit(s, 11, 12)  # small ones behind the large: still held back by the bound
        assert sent(s.poll(0.0)) == []

    def test_small_tasks_fill_the_whole_pipeline(self) -> None:
        s = farm(ranks=1)
        observe(s, 0.0)
        submit(s, *range(1, 1001), nbytes=1000)
        assert len(sent(s.poll(0.0))) == 1 + MAX_PREFETCH

    def test_a_task_larger_than_the_bound_still_reaches_an_idle_slot(self) -> None:
        s = farm(ranks=1, slots=3)
        submit(s, *range(1, 6), nbytes=2 * PREFETCH_BYTES)
        assert sent(s.poll(0.0)) == [1, 2, 3]  # one per slot, none queued behind them
        assert s.finished(2, 0, 0.0, ok=True, duration=LONG) is Decision.ACCEPT
        assert sent(s.poll(0.0)) == [4]  # its slot is idle: refilled at once

    def test_requeued_large_tasks_go_out_under_the_bound_again(self) -> None:
        s = farm(ranks=1)
        observe(s, 0.0)
        submit(s, 1, 2, 3, nbytes=PREFETCH_BYTES // 2)
        assert sent(s.poll(0.0)) == [1, 2]
        assert sorted(s.rank_lost(0, 0.0)) == [1, 2]
        assert s.add_worker(1, 1, 0.0)
        assert sent(s.poll(0.0)) == [1, 2]  # the new rank's bound, not the lost one's

    def test_an_input_travels_with_its_task_and_counts_against_the_bound(self) -> None:
        s = farm(ranks=1)
        observe(s, 0.0)
        submit(s, 1)
        assert sent(s.poll(0.0)) == [1]
        submit(s, 2, 3, 4, inputs=[1])  # each takes task 1's result as an argument
        assert s.finished(1, 0, 0.0, ok=True, duration=0.0, nbytes=PREFETCH_BYTES // 2) is Decision.ACCEPT
        assert sent(s.poll(0.0)) == [2, 3]  # the second reaches the bound, as with large arguments


class TestRandomEventOrders:
    @pytest.mark.parametrize("seed", range(60))
    def test_each_task_decided_exactly_once(self, seed: int) -> None:
        sim = _Sim(seed)
        for _ in range(2):
            sim.add_rank()
        for _ in range(600):
            sim.step()
        sim.finish()
        assert all(n == 1 for n in sim.accepts.values())
        assert sorted(sim.outcome) == sim.submitted, "a task was never decided"
        assert all(sim.s.state(t) is None for t in sim.submitted)
        st = sim.s.statistics()
        hows = collections.Counter(sim.outcome.values())
        assert st.submitted == len(sim.submitted)
        assert st.done == hows["accept"]
        assert st.cancelled == hows["cancelled"]
        assert st.done + st.failed + st.cancelled == st.submitted
        assert st.running == 0 and st.pending == 0
