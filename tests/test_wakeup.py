"""The doorbell a sleeping rank waits on (`taskfarm._transport.Wakeup`) and the
polling backoff beside it, without MPI: rings from another process wake a
sleeper at once and name the ringer, pokes from a thread are never lost, and
without a socket nothing can ring."""

from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

import pytest
from conftest import asleep_in_epoll, can_listen, wait_until

from taskfarm import _transport
from taskfarm._transport import DOORBELL_ENV, POKED, RING_RECHECKS, RUNG, Backoff, Rechecks, Wakeup

#: a wait that must end early is given this long; it returns in microseconds
LONG = 10.0


def _ring_from_child(address: tuple[str, int], me: int) -> None:
    ringer = Wakeup(me)
    target = ringer.resolve(address)
    assert target is not None
    ringer.ring(target)
    ringer.close()


def test_a_ring_from_another_process_wakes_the_sleeper_and_names_the_ringer() -> None:
    sleeper = Wakeup(0)
    assert sleeper.address is not None
    child = multiprocessing.get_context("spawn").Process(target=_ring_from_child, args=(sleeper.address, 7))
    child.start()
    try:
        started = time.monotonic()
        woken = sleeper.wait(LONG)
        assert woken == RUNG
        assert time.monotonic() - started < LONG / 2
        assert sleeper.ringers == {7}
    finally:
        child.join(LONG)
        sleeper.close()
    assert child.exitcode == 0


def test_a_ring_to_a_resolved_host_name_wakes_the_sleeper() -> None:
    sleeper, ringer = Wakeup(0), Wakeup(4)
    try:
        assert sleeper.address is not None
        target = ringer.resolve(("localhost", sleeper.address[1]))  # by name, as a peer on another node
        assert target is not None
        assert target.local is None  # rung over UDP
        ringer.ring(target)
        assert sleeper.wait(LONG) == RUNG
        assert sleeper.ringers == {4}
    finally:
        sleeper.close()
        ringer.close()


def test_a_poke_from_a_thread_wakes_the_sleeper() -> None:
    sleeper = Wakeup(0, network=False)
    poker = threading.Thread(target=sleeper.poke)
    try:
        poker.start()
        assert sleeper.wait(LONG) == POKED
    finally:
        poker.join()
        sleeper.close()


def test_a_poke_before_the_wait_is_not_lost_and_pokes_coalesce() -> None:
    sleeper = Wakeup(0, network=False)
    try:
        sleeper.poke()
        sleeper.poke()
        assert sleeper.wait(LONG) == POKED
        assert sleeper.wait(0.0) == 0  # both pokes were one wake-up
        sleeper.poke()  # after a wake-up, a poke writes again
        assert sleeper.wait(LONG) == POKED
    finally:
        sleeper.close()


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200, reason="needs 1,200 open files")
def test_a_process_with_many_files_open_still_sleeps_and_wakes() -> None:
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # select() stops at fd 1023
    try:
        sleeper, ringer = Wakeup(0), Wakeup(5)
        try:
            assert sleeper.wait(0.001) == 0
            target = ringer.resolve(sleeper.address)
            assert target is not None
            ringer.ring(target)
            assert sleeper.wait(LONG) == RUNG
            sleeper.poke()
            assert sleeper.wait(LONG) == POKED
        finally:
            sleeper.close()
            ringer.close()
    finally:
        for fd in held:
            os.close(fd)


def test_a_poke_racing_the_drain_does_not_silence_later_pokes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A poke that lands while `wait` drains the pipe must not leave later pokes unheard."""
    sleeper = Wakeup(0, network=False)
    real_read = os.read
    raced = []

    def read_after_a_poke(fd: int, n: int) -> bytes:
        if not raced:
            raced.append(True)
            sleeper.poke()  # another thread's poke, just before the drain
        return real_read(fd, n)

    try:
        sleeper.poke()
        monkeypatch.setattr(os, "read", read_after_a_poke)
        assert sleeper.wait(LONG) == POKED
        monkeypatch.setattr(os, "read", real_read)
        sleeper.wait(0.0)  # whatever that poke left behind
        sleeper.poke()  # a later poke: it must wake the next wait
        assert sleeper.wait(1.0) == POKED
    finally:
        sleeper.close()


def test_nothing_happening_is_a_timeout() -> None:
    sleeper = Wakeup(0)
    try:
        assert sleeper.wait(0.001) == 0
        assert sleeper.ringers == set()
    finally:
        sleeper.close()


def test_without_a_socket_nobody_can_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DOORBELL_ENV, "0")
    sleeper = Wakeup(0)
    other = Wakeup(1, network=True)
    try:
        assert sleeper.address is None
        assert other.resolve(sleeper.address) is None
        assert sleeper.resolve(other.address) is None  # and it rings nobody
    finally:
        sleeper.close()
        other.close()


def test_an_unknown_host_is_not_rung() -> None:
    sleeper = Wakeup(0)
    try:
        assert sleeper.resolve(("no-such-host.invalid", 9)) is None
    finally:
        sleeper.close()


def _ring_twice_and_take(ringer: Wakeup, sleeper: Wakeup) -> None:
    """``ringer`` rings ``sleeper`` twice; returns once ``sleeper`` took them."""
    target = ringer.resolve(sleeper.address)
    assert target is not None
    ringer.ring(target)
    ringer.ring(target)
    deadline = time.monotonic() + LONG
    while not sleeper.take_rings():  # loopback UDP: delivered by the time sendto returns
        assert time.monotonic() < deadline, "the rings never arrived"


def test_rings_taken_before_a_probe_do_not_wake_the_next_wait() -> None:
    sleeper, ringer = Wakeup(0), Wakeup(3)
    try:
        _ring_twice_and_take(ringer, sleeper)
        assert sleeper.ringers == {3}
        assert sleeper.take_rings() is False
        assert sleeper.wait(0.001) == 0
    finally:
        sleeper.close()
        ringer.close()


class _CountingSocket:
    """A doorbell's socket that counts its reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def test_a_ring_check_reads_only_the_rings_there_are() -> None:
    """An empty doorbell is asked, not read: the read that raises when
    nothing waits costs tens of microseconds cold, at each of an idle
    farm's ring checks."""
    sleeper, ringer = Wakeup(0), Wakeup(3)
    assert sleeper._local is not None  # where a ring from this host arrives
    counting = _CountingSocket(sleeper._local)
    sleeper._local = counting  # type: ignore[assignment]
    try:
        assert sleeper.take_rings() is False
        assert counting.reads == 0
        _ring_twice_and_take(ringer, sleeper)
        assert sleeper.take_rings() is False
        assert counting.reads == 2
    finally:
        sleeper.close()
        ringer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")
def test_a_peer_on_the_same_host_rings_the_local_socket_not_udp() -> None:
    sleeper, ringer = Wakeup(0), Wakeup(3)
    assert sleeper._sock is not None and sleeper._local is not None
    udp, local = _CountingSocket(sleeper._sock), _CountingSocket(sleeper._local)
    sleeper._sock, sleeper._local = udp, local  # type: ignore[assignment]
    try:
        target = ringer.resolve(sleeper.address)
        assert target is not None and target.local is not None
        _ring_twice_and_take(ringer, sleeper)
        assert (udp.reads, local.reads) == (0, 2)
        assert sleeper.ringers == {3}
    finally:
        sleeper.close()
        ringer.close()


def test_a_peer_without_a_local_socket_is_rung_over_udp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that could not bind its local socket still wakes: the ringer
    falls back to its UDP port, and stays there."""
    with monkeypatch.context() as m:  # the sleeper binds another name: the expected one is missing
        m.setattr(_transport, "_LOCAL_BELL", "\0taskfarm-test-elsewhere-{port}")
        sleeper = Wakeup(0)
    ringer = Wakeup(3)
    target = ringer.resolve(sleeper.address)
    assert target is not None
    try:
        for _ in range(2):
            ringer.ring(target)
            assert sleeper.wait(LONG) == RUNG
        assert sleeper.ringers == {3}
        assert ringer._unbound == ({target.local} if target.local else set())
    finally:
        sleeper.close()
        ringer.close()


def _sleeping(target: Any) -> tuple[threading.Thread, list[int], list[int]]:
    """``target`` run in a thread: the thread, its native id (once known) and what it returned."""
    ident: list[int] = []
    got: list[int] = []

    def run() -> None:
        ident.append(threading.get_native_id())
        got.append(target())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ident, got


@pytest.mark.skipif(not can_listen(), reason="needs epoll's exclusive wake-up (Linux)")
def test_a_ring_wakes_the_listener_and_not_the_sleeper() -> None:
    """While a thread listens, the master's ring is its alone: the rank's
    usual sleeper (the comm thread) sleeps on."""
    sleeper, ringer = Wakeup(0), Wakeup(3)
    target = ringer.resolve(sleeper.address)
    assert target is not None
    waiting, wait_id, waited = _sleeping(lambda: sleeper.wait(LONG))
    listening, listen_id, listened = _sleeping(lambda: sleeper.listen(LONG))
    try:
        wait_until(
            lambda: wait_id and listen_id and asleep_in_epoll(wait_id[0]) and asleep_in_epoll(listen_id[0]),
            "the two threads both asleep",
            LONG,
        )
        ringer.ring(target)
        listening.join(LONG)
        assert listened == [RUNG]
        assert sleeper.ringers == {3}
        assert waiting.is_alive() and asleep_in_epoll(wait_id[0])
        sleeper.poke()
        waiting.join(LONG)
        assert waited == [POKED]  # woken by the poke, not by the ring
        # with nobody listening, a ring wakes the sleeper
        waiting, wait_id, waited = _sleeping(lambda: sleeper.wait(LONG))
        wait_until(lambda: wait_id and asleep_in_epoll(wait_id[0]), "the sleeper asleep", LONG)
        ringer.ring(target)
        waiting.join(LONG)
        assert waited == [RUNG]
    finally:
        sleeper.poke()
        sleeper.poke_listener()
        waiting.join(LONG)
        listening.join(LONG)
        sleeper.close()
        ringer.close()


@pytest.mark.skipif(not can_listen(), reason="needs epoll's exclusive wake-up (Linux)")
def test_a_listener_is_poked_apart_from_the_sleeper() -> None:
    sleeper = Wakeup(0)
    try:
        sleeper.poke_listener()
        assert sleeper.listen(LONG) == POKED
        assert sleeper.listen(0.001) == 0  # one poke, one wake-up
        assert sleeper.wait(0.0) == 0  # the sleeper's pipe is its own
        sleeper.poke()
        assert sleeper.listen(0.001) == 0
    finally:
        sleeper.close()


def test_without_a_socket_nobody_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DOORBELL_ENV, "0")
    sleeper = Wakeup(0)
    try:
        assert not sleeper.can_listen()
        sleeper.poke_listener()  # harmless
    finally:
        sleeper.close()


def test_backoff_grows_to_its_cap_after_a_few_spins() -> None:
    backoff = Backoff(0.002)
    delays = [backoff.next() for _ in range(20)]
    assert delays[: Backoff.SPINS] == [0.0] * Backoff.SPINS  # a fresh backoff yields first
    assert delays[Backoff.SPINS] == Backoff.FIRST
    assert delays[-1] == 0.002
    assert all(b >= a for a, b in zip(delays[Backoff.SPINS :], delays[Backoff.SPINS + 1 :]))
    backoff.restart()
    assert backoff.next() == 0.0


def test_rechecks_follow_a_ring_that_found_nothing_until_spent_or_found() -> None:
    cap = 0.25
    rechecks = Rechecks(RING_RECHECKS)
    assert rechecks.next_delay(cap) == cap  # nothing rang: no recheck pending
    rechecks.rang_empty()
    assert [rechecks.next_delay(cap) for _ in range(4)] == [*RING_RECHECKS, cap, cap]
    rechecks.rang_empty()
    assert rechecks.next_delay(cap) == RING_RECHECKS[0]
    rechecks.rang_empty()  # another empty ring mid-sequence starts over
    assert rechecks.next_delay(cap) == RING_RECHECKS[0]
    rechecks.found()  # a probe found the message: no more rechecks
    assert rechecks.next_delay(cap) == cap


def test_a_recheck_only_peeked_at_stays_pending_until_its_sleep_runs_out() -> None:
    rechecks = Rechecks((0.001, 0.002, 0.003))
    assert rechecks.delay(None) is None
    rechecks.rang_empty()
    assert rechecks.delay(None) == rechecks.delay(None) == 0.001  # a poke's wake-up: the same again
    delays = []
    for _ in range(5):
        delays.append(rechecks.delay(None))
        rechecks.probed(got=False, rung=False)  # its sleep ran out, the probe found nothing
    assert delays == [0.001, 0.002, 0.003, None, None]
    rechecks.probed(got=False, rung=True)  # spent (however often it ran out): a ring still starts over
    assert rechecks.delay(1.0) == 0.001
    rechecks.probed(got=True, rung=True)
    assert rechecks.delay(1.0) == 1.0
