"""Appending to a journal: the one writer, its buffering, durability and lock.

The file format, the reader and the rules for damage are in `taskfarm._journal`.

Durability and cost
-------------------
Records are appended to an in-process buffer and reach the kernel when the
buffer holds `FLUSH_BYTES`, when a record carries more than
`INLINE_PARTS_MAX` bytes of frame parts (those go straight to ``os.writev``
without a copy), and at every `JournalWriter.sync`.  ``sync()`` is the group
commit point: the master appends a service-loop round's records, calls
``sync()`` once, and only then resolves the futures.  With ``fsync=True``
``sync()`` calls ``fdatasync`` (it writes the data and the new file size;
``fsync`` where that is missing), one disk flush per round that wrote
anything, typically 0.1-10 ms on local or parallel file systems.  With
``fsync=False`` ``sync()`` only hands the bytes to the kernel: they survive
the death of the process but not of the node.  Records appended but not yet
synced may be lost; by the contract above their futures were not resolved.

Locking
-------
`JournalWriter` takes ``fcntl.flock`` on a sidecar ``PATH.lock`` and writes
"host pid" into it.  The kernel drops the lock when the process dies, even
by SIGKILL, so a killed run never blocks its resume.  flock on a shared file
system needs support from it (NFSv4 has it; Lustre needs ``-o flock``).  A
writer is disowned in a child made by ``fork()``: only the process that
opened it may append, otherwise the child would write its parent's buffered
records a second time.  The writer's methods may be called from several
threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import socket
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Mapping, Sequence
from types import TracebackType

from ._errors import JournalError
from ._journal import (
    _CANCEL,
    _DISPATCH,
    _FAIL,
    _FILE_BODY,
    _HEAD12,
    _HEAD_SIZE,
    _SUBMIT,
    _SUCCESS,
    _TABLE,
    _TEXT_ERRORS,
    _U32,
    _V1,
    _VERIFY,
    F_ALIAS,
    F_COUNTS,
    F_FINAL,
    F_HAS_FRAME,
    F_WIDE,
    FILE_MAGIC,
    FORMAT_VERSION,
    MAX_LABEL_CHARS,
    RECORD_MAGIC,
    T_CANCEL,
    T_DISPATCH,
    T_FAIL,
    T_FILE,
    T_RUN_END,
    T_RUN_START,
    T_SUBMIT,
    T_SUCCESS,
    U16_MAX,
    U32_MAX,
    BufferLike,
    Frame,
    JournalLockedError,
    _replay,
)

__all__ = ["FLUSH_BYTES", "INLINE_PARTS_MAX", "JournalWriter"]

#: Frame parts up to this many bytes in total are copied into the write
#: buffer (cheaper than a syscall); larger ones go to os.writev uncopied.
INLINE_PARTS_MAX = 64 * 1024
#: The write buffer is handed to the kernel once it holds this many bytes.
FLUSH_BYTES = 1024 * 1024
#: Fallback when the system does not report IOV_MAX (Linux's value).
DEFAULT_IOV_MAX = 1024
#: Sidecar lock file name suffix.
LOCK_SUFFIX = ".lock"
#: Mode for new files (before the umask), as open() uses.
FILE_MODE = 0o666
#: Bytes of the lock file read to name the holder.
HOLDER_READ_BYTES = 256
#: errno values meaning "this file system cannot flock".
_NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})




def _iov_max() -> int:
    """Most buffers one os.writev call takes on this system."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        return DEFAULT_IOV_MAX
    return value if value > 0 else DEFAULT_IOV_MAX


_IOV_MAX = _iov_max()


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8", _TEXT_ERRORS)


def _byte_view(part: BufferLike) -> bytes | memoryview:
    """A flat unsigned-byte view of one frame part, without copying it.

    ``PickleBuffer.raw()`` flattens any C- or Fortran-contiguous buffer
    (numpy's out-of-band buffers are one or the other).
    """
    if isinstance(part, bytes):
        return part
    try:
        return pickle.PickleBuffer(part).raw()
    except BufferError as exc:
        raise ValueError(f"frame part is not a contiguous buffer: {exc}") from exc
    except TypeError as exc:
        raise TypeError(f"frame part must be a bytes-like object, not {type(part).__name__}") from exc


def _encode_frame(frame: Frame) -> tuple[bytes, list[bytes | memoryview], int, int]:
    """Frame table, the parts as byte views, their total size, extra flags."""
    header, buffers = frame
    parts = [_byte_view(header)]
    parts.extend(_byte_view(b) for b in buffers)
    lengths = [len(p) for p in parts]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    wide = max(lengths) > U32_MAX
    code = "Q" if wide else "I"
    table = _TABLE.pack(crc, len(parts)) + struct.pack(f"<{len(parts)}{code}", *lengths)
    return table, parts, sum(lengths), F_HAS_FRAME | (F_WIDE if wide else 0)


def _json_meta(meta: Mapping[str, object]) -> bytes:
    """Run metadata as compact JSON (readable without unpickling anything)."""
    return json.dumps(dict(meta), separators=(",", ":"), default=repr).encode("utf-8")


def _write_all(fd: int, parts: list[bytes | memoryview]) -> int:
    """Write every part with as few os.writev calls as possible; bytes written.

    Loops over short writes and over the IOV_MAX limit.
    """
    views: list[bytes | memoryview] = [p for p in parts if len(p)]
    total = 0
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "os.writev wrote nothing")
        total += n
        while n > 0:
            length = len(views[i])
            if n >= length:
                n -= length
                i += 1
            else:
                views[i] = memoryview(views[i])[n:]
                n = 0
    return total


def _sync_fd(fd: int) -> None:
    """Flush the file's data and size to stable storage."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS and friends
        os.fsync(fd)


def _fsync_dir(path: str) -> None:
    """Make a newly created file's directory entry durable (best effort)."""
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(dfd)

# ---------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------

_OPEN_WRITERS: weakref.WeakSet[JournalWriter] = weakref.WeakSet()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _disown_writers_in_child() -> None:
    """After fork(): the child must never append its parent's records."""
    for writer in list(_OPEN_WRITERS):
        writer._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_writers_in_child)


def _read_holder(fd: int) -> tuple[str, int] | None:
    """The "host pid" a lock holder wrote into the lock file, if readable."""
    try:
        text = os.pread(fd, HOLDER_READ_BYTES, 0).decode("utf-8", "replace").split()
        return (text[0], int(text[1]))
    except (OSError, IndexError, ValueError):
        return None


def _acquire_lock(path: str) -> int:
    """Take the exclusive, non-blocking flock on ``path + LOCK_SUFFIX``; its fd."""
    lock_path = path + LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise JournalError(
            f"cannot create the lock file {lock_path!r} of journal {path!r}: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise JournalLockedError(path, holder) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_FLOCK_ERRNOS:
            raise JournalError(
                f"cannot lock journal {path!r}: the file system does not support flock "
                "(on Lustre, mount with -o flock; or put the journal on another file system)"
            ) from exc
        raise JournalError(f"cannot lock journal {path!r}: {exc.strerror or exc}") from exc
    try:
        holder_text = f"{socket.gethostname()} {os.getpid()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_text, 0)
    except OSError:
        pass  # the lock is what matters; the holder's name is a courtesy
    return fd


class JournalWriter:
    """Appends records to a journal; the only writer of a journal at a time.

    Each method appends one record to an in-process buffer; `sync` makes
    everything appended so far durable (see the module docstring).  After a
    failed write the writer truncates the file back to its last whole record
    and refuses further use, so a half-written record never ends up in the
    middle of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._path = os.fspath(path)
        self._fsync = fsync
        self._mutex = threading.Lock()
        self._buf = bytearray()
        self._end = 0  # file offset after the last record handed to the kernel
        self._bytes_written = 0
        self._dirty = False  # data handed to the kernel since the last fsync
        self._closed = True  # until fully open
        self._broken: str | None = None
        # key -> [task id, submissions not yet finished]: unfinished tasks only
        # (version 1 files: every key ever seen, never dropped)
        self._live: dict[str, list[int]] = {}
        self._next_id = 0  # the id the next SUBMIT record defines
        self._v1 = False  # appending to a version 1 file, by its rule
        self._lock_fd = _acquire_lock(self._path)
        try:
            self._fd = self._open_file()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._finalizer = weakref.finalize(self, _close_fds, self._fd, self._lock_fd)
        self._closed = False
        _OPEN_WRITERS.add(self)
        try:
            if self._end == 0:
                self._v1 = FORMAT_VERSION == _V1  # (tests write version 1 files this way)
                self._append(T_FILE, 0, self._file_body())
                self._flush()
                if self._fsync:
                    _sync_fd(self._fd)
                    _fsync_dir(self._path)
                self._dirty = False
        except BaseException:
            self._release()
            raise
        self._start = self._end  # where this writer's records begin (see discard)

    def _open_file(self) -> int:
        """Open for append; check what is there, truncate a torn tail; the fd.

        Every record is checked, frame data too (read once, not kept), so a
        writer never appends to a damaged journal.
        """
        path = self._path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise JournalError(f"cannot open journal {path!r}: {exc.strerror or exc}") from exc
        try:
            state = _replay(path, parts=_VERIFY)
            self._v1 = state.format_version == _V1
            self._next_id = state.task_ids
            if self._v1:
                self._live = {key: [i, 0] for i, key in enumerate(state.tasks)}
            if state.torn_tail_bytes:
                os.ftruncate(fd, state.valid_bytes)
                if self._fsync:
                    _sync_fd(fd)
            self._end = state.valid_bytes
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot repair journal {path!r}: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _file_body() -> bytes:
        host = _encode_text(socket.gethostname())[:U16_MAX]
        return _FILE_BODY.pack(FILE_MAGIC, FORMAT_VERSION, time.time(), len(host)) + host

    # -- properties ---------------------------------------------------------

    @property
    def path(self) -> str:
        """The journal's path."""
        return self._path

    @property
    def bytes_written(self) -> int:
        """Bytes appended by this writer (buffered ones included)."""
        return self._bytes_written

    # -- record methods -----------------------------------------------------

    def run_started(self, meta: Mapping[str, object]) -> None:
        """Record the start of a run (argv, resume flag, time, nworkers, ...)."""
        body = _json_meta(meta)
        with self._mutex:
            self._append(T_RUN_START, 0, body)

    def run_ended(self, meta: Mapping[str, object]) -> None:
        """Record the end of a run (exit code, "complete"/"drained", counts, ...)."""
        body = _json_meta(meta)
        with self._mutex:
            self._append(T_RUN_END, 0, body)

    def submitted(self, key: str, *, label: str, t: float) -> None:
        """Record that task ``key`` was submitted; ``label`` is short human text."""
        with self._mutex:
            self._submit(key, label, t)

    def dispatched(self, key: str, *, rank: int, attempt: int, t: float) -> None:
        """Record that an attempt of ``key`` was sent to worker ``rank``."""
        with self._mutex:
            task_id = self._task_id(key, t)
            self._append(T_DISPATCH, 0, _pack(_DISPATCH, task_id, rank, attempt, t))

    def succeeded(
        self,
        key: str,
        *,
        rank: int,
        attempt: int,
        t_start: float,
        t_end: float,
        result: Frame,
    ) -> None:
        """Record the result of ``key``, stored raw as the worker serialized it."""
        table, parts, nbytes, fflags = _encode_frame(result)
        with self._mutex:
            task_id = self._task_id(key, t_end)
            fields = _pack(_SUCCESS, task_id, rank, attempt, t_start, t_end)
            self._append(T_SUCCESS, fflags, table + fields, parts, nbytes)
            self._finished(key)

    def failed(
        self,
        key: str,
        *,
        rank: int,
        attempt: int,
        t: float,
        error: Frame | None,
        error_text: str,
        final: bool,
        counts_as_attempt: bool = True,
    ) -> None:
        """Record a failed attempt of ``key``.

        ``final=False`` means it will be retried; ``counts_as_attempt=False``
        for an attempt cut off by a walltime kill or drain.  Pass ``rank=-1``
        when no worker was involved (expired, dependency failed).
        """
        flags = (F_FINAL if final else 0) | (F_COUNTS if counts_as_attempt else 0)
        text = _encode_text(error_text)
        table = b""
        parts: list[bytes | memoryview] = []
        nbytes = 0
        if error is not None:
            table, parts, nbytes, fflags = _encode_frame(error)
            flags |= fflags
        with self._mutex:
            task_id = self._task_id(key, t)
            fields = _pack(_FAIL, task_id, rank, attempt, t, len(text)) + text
            self._append(T_FAIL, flags, table + fields, parts, nbytes)
            if final:
                self._finished(key)

    def cancelled(self, key: str, *, t: float) -> None:
        """Record that ``key`` was cancelled before it produced a result."""
        with self._mutex:
            task_id = self._task_id(key, t)
            self._append(T_CANCEL, 0, _pack(_CANCEL, task_id, t))
            self._finished(key)

    # -- commit and close ---------------------------------------------------

    def sync(self) -> None:
        """Group commit: make every record appended so far durable.

        Hands the buffer to the kernel and, with ``fsync=True``, flushes the
        file to stable storage (skipped when nothing was written since the
        last sync).  Call once per service-loop round, before resolving.
        """
        with self._mutex:
            self._check_usable()
            self._flush()
            if not (self._fsync and self._dirty):
                return
            self._dirty = False
            try:
                _sync_fd(self._fd)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the data:
                # nothing written since the last good sync can be trusted.
                self._broken = f"fsync failed: {exc.strerror or exc}"
                raise JournalError(f"journal {self._path!r}: {self._broken}") from exc

    def discard(self) -> None:
        """Drop every record this writer appended, then release the file and lock.

        For a run that must leave no trace (a resume refused because the
        journal holds other work): the file is cut back to what it was when
        this writer opened it (plus the file header, if it created the file).
        """
        if self._closed:
            return
        try:
            with self._mutex:
                self._buf = bytearray()
                if self._end > self._start:
                    os.ftruncate(self._fd, self._start)
                    self._end = self._start
                    _sync_fd(self._fd)
        except OSError as exc:
            raise JournalError(f"journal {self._path!r}: cannot drop this run's records: {exc}") from exc
        finally:
            self._release()

    def close(self) -> None:
        """Sync, then release the file and the lock.  Safe to call twice."""
        if self._closed:
            return
        try:
            if self._broken is None:
                self.sync()
        finally:
            self._release()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _release(self) -> None:
        with self._mutex:
            self._closed = True
            self._buf = bytearray()
        _OPEN_WRITERS.discard(self)
        self._finalizer()  # closes the journal fd and the lock fd, once

    def _disown(self) -> None:
        """In a forked child: close the inherited fds, drop the buffer, refuse use."""
        self._finalizer.detach()
        _close_fds(self._fd, self._lock_fd)
        self._closed = True
        self._broken = "this writer was inherited through fork(); only its opener may write"
        self._buf = bytearray()
        if self._mutex.locked():  # held by a parent thread that does not exist here
            self._mutex = threading.Lock()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise JournalError(f"journal {self._path!r} cannot be written: {self._broken}")
        if self._closed:
            raise JournalError(f"journal {self._path!r} is closed")

    def _submit(self, key: str, label: str, t: float, *, alias: bool = False) -> int:
        """Append a SUBMIT record for ``key``; the task id to use for it."""
        kbytes = _encode_text(key)
        if len(kbytes) > U16_MAX:
            raise ValueError(f"task key is {len(kbytes)} bytes; at most {U16_MAX} allowed")
        lbytes = _encode_text(label[:MAX_LABEL_CHARS])
        flags = F_ALIAS if alias and not self._v1 else 0
        self._append(T_SUBMIT, flags, _pack(_SUBMIT, t, len(kbytes), len(lbytes)) + kbytes + lbytes)
        live = self._live.get(key)
        if live is None:
            live = self._live[key] = [self._next_id, 0]
            self._next_id += 1
        elif not self._v1:  # version 2: this record defined a new id; use it
            live[0] = self._next_id
            self._next_id += 1
        if not alias:
            live[1] += 1
        return live[0]

    def _task_id(self, key: str, t: float) -> int:
        """The id of ``key``; a key not known (any more) gets one now, by an ALIAS record."""
        live = self._live.get(key)
        if live is None:
            return self._submit(key, "", t, alias=True)
        return live[0]

    def _finished(self, key: str) -> None:
        """A submission of ``key`` has its final outcome: forget the id when none is left."""
        if self._v1:
            return
        live = self._live.get(key)
        if live is not None:
            live[1] -= 1
            if live[1] <= 0:
                del self._live[key]

    def _append(
        self,
        rtype: int,
        flags: int,
        body: bytes,
        parts: Sequence[bytes | memoryview] = (),
        parts_bytes: int = 0,
    ) -> None:
        """Append one record (caller holds the mutex)."""
        self._check_usable()
        if len(body) > U32_MAX:
            raise ValueError(f"journal record body of {len(body)} bytes is too large")
        head12 = _HEAD12.pack(RECORD_MAGIC, rtype, flags, len(body), zlib.crc32(body))
        head = head12 + _U32.pack(zlib.crc32(head12))
        if parts_bytes > INLINE_PARTS_MAX:
            pending = memoryview(self._buf)
            self._buf = bytearray()
            self._write([pending, head, body, *parts])
        else:
            buf = self._buf
            buf += head
            buf += body
            for part in parts:
                buf += part
            if len(buf) >= FLUSH_BYTES:
                self._flush()
        self._bytes_written += _HEAD_SIZE + len(body) + parts_bytes

    def _flush(self) -> None:
        if self._buf:
            pending = memoryview(self._buf)
            self._buf = bytearray()
            self._write([pending])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        """Hand whole records to the kernel; on failure undo and break the writer."""
        try:
            self._end += _write_all(self._fd, parts)
            self._dirty = True
        except OSError as exc:
            why = f"write failed: {exc.strerror or exc}"
            try:
                os.ftruncate(self._fd, self._end)
            except OSError as exc2:
                why += f"; could not cut the partial record ({exc2.strerror or exc2}), the next open will"
            self._broken = why
            raise JournalError(f"journal {self._path!r}: {why}") from exc


def _pack(layout: struct.Struct, *values: object) -> bytes:
    """struct.pack with a clear error for out-of-range fields."""
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise ValueError(f"journal field out of range: {exc} (values {values!r})") from None
