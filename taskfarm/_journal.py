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

Writing (buffering, durability, the lock) is `taskfarm._journal_writer`;
reporting a journal's status is `taskfarm._status`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from taskfarm._errors import JournalError

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
    "TaskEntry",
    "read_journal",
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
#: Chunk size when checking that a damaged tail is all zeros.
READ_CHUNK = 1024 * 1024

_TEXT_ERRORS = "surrogatepass"  # keys round-trip even with lone surrogates


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



def _decode_text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", _TEXT_ERRORS)



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
