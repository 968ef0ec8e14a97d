"""Rank 0 as a worker too (``master_works``): an in-process link between the
master's service thread and a worker living in the master's own process.

`Loopback` wraps the master's MPI `Transport`: to the master it looks like the
same transport with one more peer, number 0 (the master's own rank in both
world and spawn numbering), so the scheduler counts that peer as a rank with
one slot like any other.  Messages to and from peer 0 go through two deques
instead of MPI, and are pickled on the way exactly as MPI would carry them,
so a task on rank 0 never shares objects with the user's program (an argument
it mutates is its own copy) and anything that cannot cross MPI fails the same
way here.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from typing import Any

from ._protocol import Kind
from ._transport import MASTER, Transport, Wakeup

#: the worker number of rank 0's own worker
LOCAL_PEER = 0


def _copy(record: object) -> Any:
    """The record as the other side of an MPI link would get it."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(record, 5, buffer_callback=buffers.append)
    return pickle.loads(body, buffers=[bytearray(b.raw()) for b in buffers])


class LocalEnd(Transport):
    """The local worker's side: the transport API over two deques."""

    def __init__(self, link: Loopback) -> None:  # no MPI communicator of its own
        self._link = link
        self.rank = LOCAL_PEER
        self.intercomm = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wakeup = Wakeup(LOCAL_PEER, network=False)  # the master pokes it (`Loopback.send`)
        self._rings = {}

    def peers(self) -> list[int]:
        return [MASTER]

    def rings_from(self, peer: int) -> bool:
        return True  # every message from the master comes with a poke

    def take_rings(self) -> bool:
        """A waiting message counts as a ring: the master's poke that came
        with it is the worker's only news of it (it probes only when rung)."""
        return bool(self._link.to_worker)

    def send(self, peer: int, kind: Kind, record: object) -> None:
        self._link.to_master.append((LOCAL_PEER, kind, _copy(record)))
        self._link.wake_master()

    def poll(self) -> tuple[int, Kind, Any] | None:
        try:
            return self._link.to_worker.popleft()
        except IndexError:
            return None

    def progress(self, push: bool = True) -> bool:
        return False

    def flush(self, timeout: float) -> bool:
        return True

    def take_lost(self) -> list[int]:
        return []

    def forget(self, peer: int) -> None:
        pass

    def unforget(self, peer: int) -> None:
        pass

    def failed(self, peer: int) -> bool:
        return False

    def abort(self, code: int) -> None:
        self._link.real.abort(code)

    def close(self) -> None:
        self.wakeup.close()


class Loopback(Transport):
    """The master's transport plus peer 0, a worker in this process."""

    def __init__(self, real: Transport, wake_master: Callable[[], None] = lambda: None) -> None:
        self.real = real
        self.wake_master = wake_master
        self.to_master: collections.deque[tuple[int, Kind, Any]] = collections.deque()
        self.to_worker: collections.deque[tuple[int, Kind, Any]] = collections.deque()
        self.local = LocalEnd(self)
        self._local_forgotten = False

    # attributes of the MPI transport (comm, rank, intercomm, bytes_*, ...)
    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def peers(self) -> list[int]:
        return [LOCAL_PEER, *self.real.peers()]

    def send(self, peer: int, kind: Kind, record: object) -> None:
        if peer != LOCAL_PEER:
            self.real.send(peer, kind, record)
        elif not self._local_forgotten or kind is Kind.STOP:
            self.to_worker.append((MASTER, kind, _copy(record)))
            self.local.poke()

    def rings_from(self, peer: int) -> bool:
        return peer == LOCAL_PEER or self.real.rings_from(peer)

    def wait(self, timeout: float) -> int:
        return self.real.wait(timeout)

    def poke(self) -> None:
        self.real.poke()

    def take_rings(self) -> bool:
        return self.real.take_rings()

    def poll(self) -> tuple[int, Kind, Any] | None:
        try:
            return self.to_master.popleft()
        except IndexError:
            return self.real.poll()

    def progress(self, push: bool = True) -> bool:
        return self.real.progress(push)

    def flush(self, timeout: float) -> bool:
        return self.real.flush(timeout)

    def take_lost(self) -> list[int]:
        return self.real.take_lost()

    def forget(self, peer: int) -> None:
        if peer == LOCAL_PEER:
            self._local_forgotten = True
        else:
            self.real.forget(peer)

    def unforget(self, peer: int) -> None:
        if peer == LOCAL_PEER:
            self._local_forgotten = False
        else:
            self.real.unforget(peer)

    def failed(self, peer: int) -> bool:
        return peer != LOCAL_PEER and self.real.failed(peer)

    def abort(self, code: int) -> None:
        self.real.abort(code)

    def close(self) -> None:
        self.real.close()
