"""The journal: a durable, append-only record of every task of a farm run.

Why
---
HPC jobs die whole (walltime, preemption, node loss).  The journal lets a
rerun with ``--resume`` run only what has no result, without losing a result
or counting one twice.  Rank 0 (the master) is the only writer; anyone may
read (``taskfarm status``, the resuming master) without taking a lock.

Results are stored opaque, exactly as the worker serialized them: a
`Frame` is ``(header, buffers)``, a pickle-protocol-5 stream and its
out-of-band buffers.  The parts are written raw (never re-pickled, never
joined into one bigger object when large) and come back as a `Frame` whose
buffers are fresh, writable, malloc-aligned ``bytearray`` objects, so numpy
arrays rebuilt from them are writable and aligned.

File format (version 2, all integers little-endian)
---------------------------------------------------
The file is a sequence of records.  Each record is a 16-byte head, a body,
and, when the record carries a frame, the raw frame parts::

    head  = magic "Tj" (2s) | type (u8) | flags (u8) | body_len (u32)
            | body_crc (u32, crc32 of the body) | head_crc (u32, crc32 of the
            12 head bytes before it)
    body  = [frame table, if flags & HAS_FRAME] fields-of-the-type
    frame table = parts_crc (u32, crc32 over all parts) | nparts (u32)
                  | nparts lengths (u32 each, u64 if flags & WIDE)
    parts = frame header, then each out-of-band buffer, raw, back to back

The head has its own checksum so that a damaged length is recognised as
damage, not mistaken for a record that runs past the end of the file.  Two
crc32s and a table of lengths let the reader check, in order, the head, the
body, then the bulk data, trusting each length only once it is verified.

Record types and their fields (``str16`` is a u16 length then UTF-8 bytes):

====  ===========  =========================================================
type  name         fields
====  ===========  =========================================================
1     FILE         b"TFJOURNL", format version u16, created f64, host str16
2     RUN_START    JSON object (argv, resume flag, time, nworkers, ...)
3     RUN_END      JSON object (exit code, "complete"/"drained", counts, ...)
4     SUBMIT       t f64, key len u16, label len u16, key, label;
                   flag ALIAS: names an id only, not a (re)submission
5     DISPATCH     task id u32, rank i32, attempt u32, t f64
6     SUCCESS      task id u32, rank i32, attempt u32, t_start f64, t_end f64;
                   frame = the result
7     FAIL         task id u32, rank i32, attempt u32, t f64, error_text
                   (u32 length + UTF-8); flags FINAL and COUNTS; optional
                   frame = the pickled exception
8     CANCEL       task id u32, t f64
====  ===========  =========================================================

The first record is always FILE.  A *task id* is the number of SUBMIT
records before the one that defined it: every SUBMIT record defines the next
id, for its key (a key resubmitted by a resumed run gets a new id; all its
ids name the same task).  So a key is stored once per submission and every
later record costs 4 bytes for it.  Reader and writer count the same way, so
ids are never stored, and the writer only remembers the ids of tasks that
are not finished: its memory does not grow with the length of the run.
When it must write about a key it has forgotten (a late duplicate result) it
first writes a SUBMIT with the ALIAS flag, which defines an id without
making the task pending again.  Version 1 files (one id per distinct key, in
order of first appearance, no ALIAS) are still read, and appended to by
their own rule.  A task costs 113 bytes + key + label + result parts (+4 per
out-of-band buffer): a no-op with a 32-character key, a 10-character label
and a 4-byte result takes 166 bytes (SUBMIT 70 + DISPATCH 36 + SUCCESS 60);
see `BYTES_PER_TASK_BOUND`.

Damage rules (never silently skip)
----------------------------------
* A record cut short by the end of the file (a kill mid-write) is a *torn
  tail*: the reader ignores it and reports ``valid_bytes`` and
  ``torn_tail_bytes``; the writer truncates it away on open.  A record whose
  bytes run from its start to the end of the file as zeros also counts as
  torn (a machine crash can leave a zero-filled tail).
* Any other failed check (magic, head checksum, body checksum, parts
  checksum, malformed fields, unknown task id) raises `JournalCorruptError`
  naming the byte offset of the record.  A process that is killed writes a
  prefix of what it meant to write, so a *whole* record with a bad checksum
  can only be real damage, even when it is the last one.
* A file that does not start with a FILE record is refused, never
  truncated: the writer only ever truncates a torn tail.  The writer checks
  every record, frame data included, when it opens an existing journal, so
  it never appends to a damaged one (this reads the file once, at disk
  speed, without keeping the results).

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
import io
import json
import math
import os
import pickle
import socket
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeAlias

from taskfarm._errors import ExitCode, JournalError

__all__ = [
    "BYTES_PER_TASK_BOUND",
    "CANCELLED",
    "FAILURE",
    "FORMAT_VERSION",
    "PENDING",
    "RETRY",
    "RUNNING",
    "STATES",
    "SUCCESS",
    "Frame",
    "JournalCorruptError",
    "JournalLockedError",
    "JournalNotFoundError",
    "JournalState",
    "JournalVersionError",
    "JournalWriter",
    "TaskEntry",
    "format_status",
    "read_journal",
    "status_exit_code",
    "status_report",
]

# ---------------------------------------------------------------------------
# Types and constants
# ---------------------------------------------------------------------------

#: Anything the writer accepts as one frame part (any contiguous buffer).
BufferLike: TypeAlias = bytes | bytearray | memoryview | pickle.PickleBuffer
#: A serialized object: pickle-5 header stream and its out-of-band buffers.
Frame: TypeAlias = tuple[bytes, Sequence[BufferLike]]

PENDING = "PENDING"
RUNNING = "RUNNING"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
CANCELLED = "CANCELLED"
#: Every task state, in the order reports list them.
STATES = (PENDING, RUNNING, RETRY, SUCCESS, FAILURE, CANCELLED)

#: Version written into the FILE record; readers refuse newer versions.
FORMAT_VERSION = 2
#: Version 1 gave one id per distinct key (the writer had to remember every key).
_V1 = 1
#: Starts every record; lets the reader tell a journal from any other file.
RECORD_MAGIC = b"Tj"
#: Starts the FILE record's body; names the file type for humans and tools.
FILE_MAGIC = b"TFJOURNL"
#: Bound asserted by the tests for a no-op task (SUBMIT + DISPATCH + SUCCESS)
#: with a 32-character key, a 10-character label and a 5-byte result.
BYTES_PER_TASK_BOUND = 200

# Record types (the u8 in the head).
T_FILE = 1
T_RUN_START = 2
T_RUN_END = 3
T_SUBMIT = 4
T_DISPATCH = 5
T_SUCCESS = 6
T_FAIL = 7
T_CANCEL = 8
_KNOWN_TYPES = frozenset(range(T_FILE, T_CANCEL + 1))

# Head flag bits.
F_HAS_FRAME = 0x01  # the body starts with a frame table; parts follow the body
F_WIDE = 0x02  # the frame table's lengths are u64 (some part >= 4 GiB)
F_ALIAS = 0x04  # SUBMIT: defines an id for the key, does not resubmit it
F_FINAL = 0x10  # FAIL: no retry will follow
F_COUNTS = 0x20  # FAIL: the attempt counts against the task's retries
_KNOWN_FLAGS = F_HAS_FRAME | F_WIDE | F_ALIAS | F_FINAL | F_COUNTS

# Binary layouts (see the module docstring).
_HEAD12 = struct.Struct("<2sBBII")  # magic, type, flags, body_len, body_crc
_U32 = struct.Struct("<I")  # head_crc; also the frame-table lengths
_HEAD_SIZE = _HEAD12.size + _U32.size  # 16 bytes
_FILE_BODY = struct.Struct("<8sHdH")  # file magic, version, created, host len
_SUBMIT = struct.Struct("<dHH")  # t, key len, label len
_DISPATCH = struct.Struct("<IiId")  # id, rank, attempt, t
_SUCCESS = struct.Struct("<IiIdd")  # id, rank, attempt, t_start, t_end
_FAIL = struct.Struct("<IiIdI")  # id, rank, attempt, t, error_text len
_CANCEL = struct.Struct("<Id")  # id, t
_TABLE = struct.Struct("<II")  # parts crc, number of parts

#: Largest value of a u16 / u32 field.
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
#: Labels are cosmetic; longer ones are cut to this many characters.
MAX_LABEL_CHARS = 200
#: Frame parts up to this many bytes in total are copied into the write
#: buffer (cheaper than a syscall); larger ones go to os.writev uncopied.
INLINE_PARTS_MAX = 64 * 1024
#: The write buffer is handed to the kernel once it holds this many bytes.
FLUSH_BYTES = 1024 * 1024
#: Chunk size when checking that a damaged tail is all zeros.
READ_CHUNK = 1024 * 1024
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
#: format_status shows a per-rank table up to this many ranks, else a summary.
MAX_RANK_ROWS = 16
#: format_status lists at most this many failed tasks.
MAX_FAILED_ROWS = 20
#: format_status cuts keys, labels and error lines to this many characters.
MAX_CELL_CHARS = 60

_TEXT_ERRORS = "surrogatepass"  # keys round-trip even with lone surrogates


def _iov_max() -> int:
    """Most buffers one os.writev call takes on this system."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        return DEFAULT_IOV_MAX
    return value if value > 0 else DEFAULT_IOV_MAX


_IOV_MAX = _iov_max()


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class JournalNotFoundError(JournalError):
    """There is no journal at the given path."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no journal at {path!r}: nothing was recorded there "
            "(wrong path, or no farm has run with this journal yet)"
        )
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path,))


class JournalLockedError(JournalError):
    """Another live process holds the journal's write lock."""

    def __init__(self, path: str, holder: tuple[str, int] | None = None) -> None:
        who = f"host {holder[0]}, pid {holder[1]}" if holder else "holder unknown"
        super().__init__(
            f"journal {path!r} is being written by another farm ({who}); two runs "
            "must not write one journal: wait for that run to end, or use another path"
        )
        self.path = path
        self.holder = holder

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.holder))


class JournalCorruptError(JournalError):
    """A record before the end of the journal fails its checks.

    ``offset`` is the byte offset of the damaged record; everything before it
    is intact.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(
            f"journal {path!r} is corrupt at byte offset {offset}: {reason}; the "
            f"{offset} bytes before it are intact, nothing after it was used"
        )
        self.path = path
        self.offset = offset
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.offset, self.reason))


class JournalVersionError(JournalError):
    """The journal was written in a newer format than this taskfarm reads."""

    def __init__(self, path: str, version: int) -> None:
        super().__init__(
            f"journal {path!r} has format version {version}; this taskfarm reads "
            f"up to version {FORMAT_VERSION}: use a newer taskfarm"
        )
        self.path = path
        self.version = version

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.version))


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8", _TEXT_ERRORS)


def _decode_text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", _TEXT_ERRORS)


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
# State
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class TaskEntry:
    """What the journal knows about one task key after replay."""

    key: str
    label: str = ""
    state: str = PENDING
    #: attempts that counted (successes and failures with counts_as_attempt)
    attempts: int = 0
    #: rank of the latest attempt; None if never dispatched (or no worker)
    rank: int | None = None
    t_submit: float | None = None
    t_start: float | None = None
    t_end: float | None = None
    result: Frame | None = None
    #: the latest error frame and text (kept as history after a retry succeeds)
    error: Frame | None = None
    error_text: str | None = None
    #: SUCCESS records seen for this key: 1 normally, >1 if a writer misbehaved
    successes: int = 0


@dataclass
class JournalState:
    """Everything a journal says, replayed: tasks, runs, and how much was read."""

    #: by key, in order of first submission
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    #: one per run_started, run_ended fields merged in (``"ended"`` says which)
    runs: list[dict[str, object]] = field(default_factory=list)
    #: end of the last whole record
    valid_bytes: int = 0
    #: bytes after it that were ignored (a record torn by a kill)
    torn_tail_bytes: int = 0
    path: str = ""
    format_version: int | None = None
    created: float | None = None
    host: str | None = None
    #: rank -> {"done", "failed", "busy_s"}, accumulated during replay
    rank_stats: dict[int, dict[str, float]] = field(default_factory=dict)
    #: task ids defined so far (the next SUBMIT defines this one)
    task_ids: int = 0

    def counts(self) -> dict[str, int]:
        """Number of tasks in each state (every state present, zeros too)."""
        out = dict.fromkeys(STATES, 0)
        for entry in self.tasks.values():
            out[entry.state] = out.get(entry.state, 0) + 1
        return out

    def per_rank(self) -> dict[int, dict[str, float]]:
        """Per worker rank: tasks done, counted failures, busy seconds."""
        return {rank: dict(stats) for rank, stats in sorted(self.rank_stats.items())}

    def complete(self) -> bool:
        """True when every task recorded has succeeded."""
        return all(entry.state == SUCCESS for entry in self.tasks.values())


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class _ShrankError(Exception):
    """The file got shorter while being read: what is missing counts as torn."""


# What the scanner does with frame parts: keep them, check their checksum
# without keeping them (the writer on open), or seek past them (status).
_LOAD = "load"
_VERIFY = "verify"
_SKIP = "skip"


@dataclass(slots=True)
class _Record:
    offset: int
    rtype: int
    flags: int
    fields: memoryview  # the body after the frame table
    frame: Frame | None  # None if the record has none, or parts were skipped


class _Scanner:
    """Walks the records of a journal file, checking each, deciding the tail.

    After iteration ``valid_bytes`` and ``torn_tail_bytes`` are set.
    """

    def __init__(self, path: str, fileobj: io.BufferedReader, size: int, parts: str) -> None:
        self.path = path
        self.f = fileobj
        self.size = size
        self.parts = parts  # _LOAD, _VERIFY or _SKIP
        self.valid_bytes = 0
        self.torn_tail_bytes = 0

    def _corrupt(self, offset: int, reason: str) -> JournalCorruptError:
        if offset == 0:
            reason = f"not a taskfarm journal, or its first record is damaged ({reason})"
        return JournalCorruptError(self.path, offset, reason)

    def _zeros_to_end(self, offset: int) -> bool:
        self.f.seek(offset)
        left = self.size - offset
        while left > 0:
            chunk = self.f.read(min(READ_CHUNK, left))
            if not chunk or chunk.count(0) != len(chunk):
                return False
            left -= len(chunk)
        return True

    def _bad(self, offset: int, reason: str) -> JournalCorruptError | None:
        """None if the failed record is a zero-filled tail, else the error."""
        if self._zeros_to_end(offset):
            return None
        return self._corrupt(offset, reason)

    def __iter__(self) -> Iterator[_Record]:
        f = self.f
        off = 0
        size = self.size
        f.seek(0)
        while off < size:
            left = size - off
            if left < _HEAD_SIZE:
                have = f.read(left)
                prefix = RECORD_MAGIC[: len(have)]
                if have[: len(prefix)] == prefix or have.count(0) == len(have):
                    break  # torn inside the head
                raise self._corrupt(off, "bad record magic")
            head = f.read(_HEAD_SIZE)
            magic, rtype, flags, body_len, body_crc = _HEAD12.unpack_from(head)
            (head_crc,) = _U32.unpack_from(head, _HEAD12.size)
            if magic != RECORD_MAGIC or zlib.crc32(head[: _HEAD12.size]) != head_crc:
                why = "bad record magic" if magic != RECORD_MAGIC else "record head checksum mismatch"
                err = self._bad(off, why)
                if err is None:
                    break
                raise err
            if rtype not in _KNOWN_TYPES or flags & ~_KNOWN_FLAGS:
                raise self._corrupt(off, f"unknown record type {rtype} or flags {flags:#x}")
            if off == 0 and rtype != T_FILE:
                raise self._corrupt(0, "no file header record")
            if off != 0 and rtype == T_FILE:
                raise self._corrupt(off, "second file header record")
            if left < _HEAD_SIZE + body_len:
                break  # torn inside the body
            body = memoryview(f.read(body_len))
            if len(body) != body_len:
                break  # the file shrank under us (a writer cut a torn tail)
            if zlib.crc32(body) != body_crc:
                err = self._bad(off, "record body checksum mismatch")
                if err is None:
                    break
                raise err
            end = off + _HEAD_SIZE + body_len
            frame: Frame | None = None
            fields = body
            if flags & F_HAS_FRAME:
                try:
                    parts_crc, nparts = _TABLE.unpack_from(body)
                    code = "Q" if flags & F_WIDE else "I"
                    lengths = struct.unpack_from(f"<{nparts}{code}", body, _TABLE.size)
                except struct.error:
                    raise self._corrupt(off, "malformed frame table") from None
                if nparts < 1:
                    raise self._corrupt(off, "frame with no parts")
                fields = body[_TABLE.size + nparts * struct.calcsize(code) :]
                parts_len = sum(lengths)
                if end + parts_len > size:
                    break  # torn inside the frame parts
                try:
                    if self.parts == _LOAD:
                        frame = self._read_parts(off, lengths, parts_crc)
                    elif self.parts == _VERIFY:
                        self._verify_parts(off, parts_len, parts_crc)
                    else:
                        f.seek(parts_len, os.SEEK_CUR)
                except _ShrankError:
                    break
                end += parts_len
            yield _Record(off, rtype, flags, fields, frame)
            off = end
        self.valid_bytes = off
        self.torn_tail_bytes = size - off

    def _verify_parts(self, off: int, parts_len: int, parts_crc: int) -> None:
        """Check the frame data's checksum without keeping the data."""
        crc = 0
        left = parts_len
        while left > 0:
            chunk = self.f.read(min(READ_CHUNK, left))
            if not chunk:
                raise _ShrankError
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if crc != parts_crc:
            raise self._corrupt(off, "frame data checksum mismatch")

    def _read_parts(self, off: int, lengths: Sequence[int], parts_crc: int) -> Frame:
        header = self.f.read(lengths[0])
        crc = zlib.crc32(header)
        buffers: list[bytearray] = []
        for length in lengths[1:]:
            buf = bytearray(length)
            got = self.f.readinto(buf)
            if got != length:
                raise _ShrankError
            crc = zlib.crc32(buf, crc)
            buffers.append(buf)
        if len(header) != lengths[0]:
            raise _ShrankError
        if crc != parts_crc:
            raise self._corrupt(off, "frame data checksum mismatch")
        return (header, buffers)


class _Replay:
    """Applies records to a JournalState under the rules of the module docstring."""

    def __init__(self, state: JournalState) -> None:
        self.state = state
        self.keys: list[str] = []  # task id -> key

    def _entry(self, rec: _Record, task_id: int) -> TaskEntry:
        if task_id >= len(self.keys):
            raise JournalCorruptError(self.state.path, rec.offset, f"unknown task id {task_id}")
        return self.state.tasks[self.keys[task_id]]

    def _stats(self, rank: int) -> dict[str, float] | None:
        if rank < 0:
            return None
        return self.state.rank_stats.setdefault(rank, {"done": 0, "failed": 0, "busy_s": 0.0})

    def apply(self, rec: _Record) -> None:
        try:
            self._apply(rec)
        except (struct.error, ValueError, TypeError) as exc:  # Unicode/JSONDecodeError too
            raise JournalCorruptError(
                self.state.path, rec.offset, f"malformed record of type {rec.rtype}: {exc}"
            ) from None

    def _apply(self, rec: _Record) -> None:
        st = self.state
        body = rec.fields
        rtype = rec.rtype
        if rtype == T_SUBMIT:
            t, klen, llen = _SUBMIT.unpack_from(body)
            if _SUBMIT.size + klen + llen != len(body):
                raise ValueError("lengths do not match the body")
            if rec.flags & F_ALIAS and st.format_version == _V1:
                raise ValueError("ALIAS flag in a version 1 journal")
            key = _decode_text(body[_SUBMIT.size : _SUBMIT.size + klen])
            label = _decode_text(body[_SUBMIT.size + klen :])
            entry = st.tasks.get(key)
            if entry is None or st.format_version != _V1:
                self.keys.append(key)  # version 2: every SUBMIT defines an id
            if entry is None:
                st.tasks[key] = TaskEntry(key=key, label=label, t_submit=t)
            elif not rec.flags & F_ALIAS:
                if not entry.label:
                    entry.label = label
                if entry.state != SUCCESS:
                    entry.state = PENDING  # resubmitted (resume): history kept
        elif rtype == T_DISPATCH:
            task_id, rank, _attempt, t = _DISPATCH.unpack(body)
            entry = self._entry(rec, task_id)
            if entry.state != SUCCESS:
                entry.state = RUNNING
                entry.rank = rank if rank >= 0 else None
                entry.t_start = t
                entry.t_end = None
        elif rtype == T_SUCCESS:
            task_id, rank, _attempt, t_start, t_end = _SUCCESS.unpack(body)
            entry = self._entry(rec, task_id)
            entry.successes += 1
            if entry.state != SUCCESS:  # the first success wins and is final
                entry.state = SUCCESS
                entry.attempts += 1
                entry.rank = rank if rank >= 0 else None
                entry.t_start = t_start
                entry.t_end = t_end
                entry.result = rec.frame
                stats = self._stats(rank)
                if stats is not None:
                    stats["done"] += 1
                    stats["busy_s"] += max(0.0, t_end - t_start)
        elif rtype == T_FAIL:
            task_id, rank, _attempt, t, tlen = _FAIL.unpack_from(body)
            if _FAIL.size + tlen != len(body):
                raise ValueError("lengths do not match the body")
            entry = self._entry(rec, task_id)
            if entry.state == SUCCESS:
                return  # a failure after a success is ignored
            counts = bool(rec.flags & F_COUNTS)
            stats = self._stats(rank)
            if stats is not None:
                if counts:
                    stats["failed"] += 1
                if entry.t_start is not None and entry.state == RUNNING:
                    stats["busy_s"] += max(0.0, t - entry.t_start)
            if counts:
                entry.attempts += 1
            entry.state = FAILURE if rec.flags & F_FINAL else RETRY
            entry.rank = rank if rank >= 0 else entry.rank
            entry.t_end = t
            entry.error = rec.frame
            entry.error_text = _decode_text(body[_FAIL.size :])
        elif rtype == T_CANCEL:
            task_id, t = _CANCEL.unpack(body)
            entry = self._entry(rec, task_id)
            if entry.state not in (SUCCESS, FAILURE):
                entry.state = CANCELLED
                entry.t_end = t
        elif rtype == T_RUN_START:
            run = _load_meta(body)
            run["ended"] = False
            st.runs.append(run)
        elif rtype == T_RUN_END:
            meta = _load_meta(body)
            if st.runs and st.runs[-1].get("ended") is False:
                st.runs[-1].update(meta)
                st.runs[-1]["ended"] = True
            else:  # an end without a start: keep it, visibly
                meta["ended"] = True
                meta["started"] = False
                st.runs.append(meta)
        elif rtype == T_FILE:
            magic, version, created, hlen = _FILE_BODY.unpack_from(body)
            if magic != FILE_MAGIC:
                raise ValueError("bad file magic")
            if version > FORMAT_VERSION:
                raise JournalVersionError(st.path, version)
            st.format_version = version
            st.created = created
            st.host = _decode_text(body[_FILE_BODY.size : _FILE_BODY.size + hlen])


def _load_meta(body: memoryview) -> dict[str, object]:
    value = json.loads(bytes(body).decode("utf-8"))
    if not isinstance(value, dict):
        raise TypeError("run metadata is not a JSON object")
    return value


def _replay(path: str, *, parts: str) -> JournalState:
    state = JournalState(path=path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            replay = _Replay(state)
            scanner = _Scanner(path, f, size, parts)
            for rec in scanner:
                replay.apply(rec)
            state.task_ids = len(replay.keys)
    except FileNotFoundError:
        raise JournalNotFoundError(path) from None
    except IsADirectoryError as exc:
        raise JournalError(f"cannot read journal {path!r}: it is a directory") from exc
    except OSError as exc:
        raise JournalError(f"cannot read journal {path!r}: {exc.strerror or exc}") from exc
    state.valid_bytes = scanner.valid_bytes
    state.torn_tail_bytes = scanner.torn_tail_bytes
    return state


def read_journal(path: str | os.PathLike[str], *, results: bool = True) -> JournalState:
    """Replay the journal at ``path`` into a `JournalState`.

    Takes no lock, so it works while a writer is appending (it reads the
    file as it was when opened; a record being written shows as a torn tail).
    ``results=False`` skips result and error frames (``result`` and ``error``
    are None; their data checksums are not checked): for status reports on
    big journals, it reads little more than the record heads and bodies.

    Raises `JournalNotFoundError` if the file is missing and
    `JournalCorruptError` (with ``.offset``) for damage before the end.
    """
    return _replay(os.fspath(path), parts=_LOAD if results else _SKIP)


# ---------------------------------------------------------------------------
# Writing
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


# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------


def _last_run_finished(state: JournalState) -> bool:
    """The last run recorded an end and did not say it stopped early."""
    if not state.runs:
        return bool(state.tasks)  # tasks without run records: judge by tasks
    last = state.runs[-1]
    status = last.get("status")
    return last.get("ended") is True and (status is None or status == "complete")


def status_exit_code(state: JournalState) -> int:
    """0 if everything succeeded, 1 if any task failed for good, else 75.

    75 (incomplete) also covers "every recorded task succeeded but the last
    run did not end, or ended with a status other than "complete"", since
    the script may not have submitted everything yet.
    """
    if any(entry.state == FAILURE for entry in state.tasks.values()):
        return int(ExitCode.FAILED)
    if state.complete() and _last_run_finished(state):
        return int(ExitCode.OK)
    return int(ExitCode.INCOMPLETE)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def status_report(state: JournalState) -> dict[str, object]:
    """The journal's status as a JSON-able dict (for ``taskfarm status --json``)."""
    counts = state.counts()
    ntasks = len(state.tasks)
    failed = [
        {
            "key": e.key,
            "label": e.label,
            "error_text": e.error_text,
            "attempts": e.attempts,
            "rank": e.rank,
        }
        for e in state.tasks.values()
        if e.state == FAILURE
    ]
    duplicates = [e.key for e in state.tasks.values() if e.successes > 1]
    return {
        "path": state.path,
        "format_version": state.format_version,
        "created": state.created,
        "host": state.host,
        "tasks": ntasks,
        "counts": counts,
        "complete": state.complete(),
        "exit_code": status_exit_code(state),
        "failed": failed,
        "duplicate_successes": duplicates,
        "per_rank": {str(r): s for r, s in state.per_rank().items()},
        "runs": _jsonable(state.runs),
        "valid_bytes": state.valid_bytes,
        "torn_tail_bytes": state.torn_tail_bytes,
        "bytes_per_task": state.valid_bytes / ntasks if ntasks else None,
    }


def _cut(text: str, width: int = MAX_CELL_CHARS) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def format_status(state: JournalState) -> str:
    """The status as short, aligned human text (for ``taskfarm status``)."""
    counts = state.counts()
    ntasks = len(state.tasks)
    code = status_exit_code(state)
    verdict = {0: "complete", 1: "failed tasks"}.get(code, "incomplete, resumable")
    lines = [f"journal  {state.path}  ({state.valid_bytes} bytes"]
    if state.torn_tail_bytes:
        lines[0] += f", {state.torn_tail_bytes} torn bytes at the end ignored"
    lines[0] += ")"
    shown = "  ".join(f"{s} {n}" for s, n in counts.items() if n) or "none"
    lines.append(f"tasks    {ntasks}: {shown}")
    if state.runs:
        last = state.runs[-1]
        end = f"ended ({last['status']})" if "status" in last else "ended"
        lines.append(f"runs     {len(state.runs)}; last {end if last.get('ended') else 'did not end'}")
    lines.append(f"status   {verdict} (exit {code})")
    dup = sum(1 for e in state.tasks.values() if e.successes > 1)
    if dup:
        lines.append(f"warning  {dup} tasks have more than one success record (first kept)")
    failed = [e for e in state.tasks.values() if e.state == FAILURE]
    if failed:
        lines.append(f"failed tasks ({len(failed)}):")
        rows = [["key", "label", "attempts", "error"]]
        for e in failed[:MAX_FAILED_ROWS]:
            rows.append([_cut(e.key), _cut(e.label), str(e.attempts), _cut(_last_line(e.error_text))])
        lines.extend(_table(rows, {2}))
        if len(failed) > MAX_FAILED_ROWS:
            lines.append(f"  ... and {len(failed) - MAX_FAILED_ROWS} more")
    ranks = state.per_rank()
    if ranks and len(ranks) <= MAX_RANK_ROWS:
        lines.append("per rank:")
        rows = [["rank", "done", "failed", "busy_s"]]
        for rank, s in ranks.items():
            rows.append([str(rank), str(int(s["done"])), str(int(s["failed"])), f"{s['busy_s']:.1f}"])
        lines.extend(_table(rows, {0, 1, 2, 3}))
    elif ranks:
        done = [s["done"] for s in ranks.values()]
        busy = [s["busy_s"] for s in ranks.values()]
        lines.append(
            f"ranks    {len(ranks)}: done min/mean/max {min(done):.0f}/{sum(done) / len(done):.1f}/"
            f"{max(done):.0f}, busy_s min/mean/max {min(busy):.1f}/"
            f"{sum(busy) / len(busy):.1f}/{max(busy):.1f}"
        )
    return "\n".join(lines)
