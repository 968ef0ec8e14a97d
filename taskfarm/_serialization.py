"""Turning calls, results and exceptions into bytes and back.

* Functions go through dill (lambdas, closures, ``__main__`` and interactive
  definitions all work), once: the bytes are cached on the master by function
  object and on each worker by digest, so a function crosses the wire once per
  worker.
* Arguments, results and exceptions go through plain pickle, protocol 5, with
  buffers of 64 KiB and more (numpy data, bytes-like objects) kept out-of-band
  so the transport sends them as raw MPI buffers; dill is the fallback for what
  pickle refuses.
* Functions and classes of ``__main__`` inside arguments go by value (a
  worker's ``__main__`` is not the user's script); classes of ``__main__`` in
  results and exceptions go by name with their value as fallback, so the
  master gets its own class back (``except MyError`` works).  Locks and open
  files are refused even where dill would copy them.
* A future passed as an argument is pickled as a reference to its task
  (``persistent_id``); the worker substitutes the input's value.

Errors follow concurrent.futures: an exception raised by an object's own
pickling code propagates unchanged; when the serializer itself cannot handle
an object (a lock, a socket), `SerializationError` names its type and where it
was found.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dill

from ._errors import SerializationError

PROTOCOL = 5
#: buffers at least this large travel out-of-band as their own MPI message;
#: below it, one copy into the pickle stream is cheaper than a message
OOB_THRESHOLD = 64 * 1024
#: bytes of a function's digest (blake2b); 16 makes collisions impossible in practice
DIGEST_SIZE = 16

Buffers = tuple[Any, ...]
Frame = tuple[bytes, Buffers]

_CANNOT_PICKLE = re.compile(r"(?:cannot|can't) pickle '?([\w.<>]+)'?", re.IGNORECASE)


def _keep_oob(buf: pickle.PickleBuffer) -> bool:
    """buffer_callback: a false value sends ``buf`` out-of-band."""
    return buf.raw().nbytes < OOB_THRESHOLD


def _is_serializer_failure(exc: BaseException) -> bool:
    """True when the pickler refused an object, as opposed to user code raising."""
    if isinstance(exc, pickle.PicklingError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (TypeError, AttributeError)) and "pickle" in text


def _failure(exc: BaseException, obj: object, where: str) -> SerializationError:
    match = _CANNOT_PICKLE.search(str(exc))
    type_name = match.group(1) if match else type(obj).__name__
    err = SerializationError(
        f"cannot serialize {where}: {type_name!r} object ({exc})", where=where, type_name=type_name
    )
    err.__cause__ = exc
    return err


class FutureInArguments(Exception):
    """Raised by a farm future's ``__reduce__``: the call has inputs to resolve.

    The executor then pickles again with a ``persistent`` hook that turns each
    future into a reference to its task; plain calls never pay for the hook.
    """


Persistent = Callable[[Any], Any]


class _RefPickler(pickle.Pickler):
    """Pickles objects the hook names (farm futures) as persistent references."""

    def __init__(self, file: io.BytesIO, persistent: Persistent, **kw: Any) -> None:
        super().__init__(file, PROTOCOL, **kw)
        self.persistent_id = persistent  # type: ignore[method-assign]


_MAIN = b"__main__"
#: objects of __main__ loaded by value, by digest: one class object per class
#: however many tasks carry its instances (bounded: closures vary)
_LOADED_MAX = 256
_loaded: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_loaded_lock = threading.Lock()
_by_value: weakref.WeakKeyDictionary[Any, tuple[bytes, bytes]] = weakref.WeakKeyDictionary()


class _MainPickler(pickle.Pickler):
    """Pickles the functions and classes of ``__main__`` so the other side can load them.

    Plain pickle names them ``__main__.<name>``, which on a worker is not the
    user's script.  They go by value (dill) instead; with ``by_name`` (results
    and exceptions, bound for the master) a class goes as its name with its
    value as fallback, so the master gets its own class back: ``except
    MyError`` and ``isinstance`` work on what tasks return and raise.
    """

    def __init__(self, file: io.BytesIO, persistent: Persistent | None, by_name: bool, **kw: Any) -> None:
        super().__init__(file, PROTOCOL, **kw)
        if persistent is not None:
            self.persistent_id = persistent  # type: ignore[method-assign]
        self._by_name = by_name

    def reducer_override(self, obj: Any) -> Any:
        if not (isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__"):
            return NotImplemented
        digest, payload = _value_of(obj)
        if self._by_name and isinstance(obj, type):
            return _load_main_class, (obj.__qualname__, digest, payload)
        return _load_value, (digest, payload)


def _value_of(obj: Any) -> tuple[bytes, bytes]:
    try:
        return _by_value[obj]
    except (KeyError, TypeError):
        pass
    payload = _dill_dumps(obj)
    entry = (hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest(), payload)
    if getattr(obj, "__closure__", None) is None:
        try:
            _by_value[obj] = entry
        except TypeError:
            pass
    return entry


def _dill_dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    _DillPickler(out, PROTOCOL, recurse=True).dump(obj)
    return out.getvalue()


def _load_value(digest: bytes, payload: bytes) -> Any:
    """Unpickling side of `_MainPickler`: an object of the sender's __main__, by value."""
    with _loaded_lock:
        if digest in _loaded:
            _loaded.move_to_end(digest)
            return _loaded[digest]
    obj = pickle.loads(payload)
    with _loaded_lock:
        obj = _loaded.setdefault(digest, obj)
        while len(_loaded) > _LOADED_MAX:
            _loaded.popitem(last=False)
    return obj


def _load_main_class(qualname: str, digest: bytes, payload: bytes) -> Any:
    """This process's own ``__main__.<qualname>`` if it has that class, else the sent one."""
    obj: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and obj.__module__ == "__main__" and obj.__qualname__ == qualname:
        return obj
    return _load_value(digest, payload)


#: process-bound resources: dill would rebuild them as new, unrelated objects on
#: the other side (a fresh lock, a reopened file), so they are refused as plain
#: pickle refuses them; dill is the fallback for code, not for resources
_RESOURCES: tuple[type, ...] = (
    type(threading.Lock()),
    type(threading.RLock()),
    io.FileIO,
    io.BufferedReader,
    io.BufferedWriter,
    io.BufferedRandom,
    io.TextIOWrapper,
)


class _DillPickler(dill.Pickler):  # type: ignore[misc]
    """dill, minus its pickling of locks and open files."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _RESOURCES):
            kind = type(obj)
            raise TypeError(f"cannot pickle '{kind.__module__}.{kind.__qualname__}' object")
        return NotImplemented


class _DillRefPickler(_DillPickler):
    def __init__(self, file: io.BytesIO, persistent: Persistent, **kw: Any) -> None:
        super().__init__(file, PROTOCOL, recurse=True, **kw)
        self._persistent = persistent

    def persistent_id(self, obj: Any) -> Any:
        return self._persistent(obj)


class _DepUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, values: Mapping[int, Any], **kw: Any) -> None:
        super().__init__(file, **kw)
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        return self._values[pid[1]]


#: types whose pickle never holds an out-of-band buffer, a class reference or
#: a farm future, and loads on any Python: `dumps` pickles them directly, and a
#: bundled call's value of one of them rides in its message as it is (most
#: results of small tasks; `taskfarm._protocol.PartValues`)
PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
_value_types: frozenset[type] | None = None  # see `value_types`


def value_types() -> frozenset[type]:
    """The types a bundled call's value rides as, in its message, without a
    pickle of its own (`taskfarm._protocol.PartValues`): `PLAIN`, and once
    numpy is loaded its numeric scalars (``numpy.float64``, ``numpy.int64``,
    ``numpy.bool_``, ...), which numeric functions return more often than
    Python's.  Their pickle names numpy, which every rank has; each one's
    own pickle cost a bundled call ~4 us on its worker, its record in the
    message, and a decode on the master."""
    global _value_types
    if _value_types is not None:
        return _value_types
    numpy = sys.modules.get("numpy")
    if numpy is None:  # no numpy scalar can have been made yet
        return PLAIN
    numeric = (numpy.number, numpy.bool_)
    _value_types = PLAIN | {t for t in set(numpy.sctypeDict.values()) if issubclass(t, numeric)}
    return _value_types


#: the plain types of a few bytes each: a call whose positional arguments are all
#: of them (and without keyword arguments) is not pickled on submit; they ride
#: in a bundle's message as they are (`taskfarm._protocol.Part`)
SCALARS = PLAIN - {str, bytes}


def dumps(obj: Any, where: str, persistent: Persistent | None = None) -> Frame:
    """Serialize ``obj`` for the wire: (pickle stream, out-of-band buffers).

    ``persistent`` is a pickle ``persistent_id`` hook (farm futures inside a
    call become references to their tasks).  Raises `SerializationError` when
    neither pickle nor dill can handle an object; exceptions from the object's
    own ``__reduce__`` propagate unchanged.
    """
    if type(obj) in PLAIN:
        return pickle.dumps(obj, PROTOCOL), ()
    buffers: list[pickle.PickleBuffer] = []
    first: BaseException | None = None
    try:
        if persistent is not None:
            out = io.BytesIO()
            _RefPickler(out, persistent, buffer_callback=_collector(buffers)).dump(obj)
            data = out.getvalue()
        else:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=_collector(buffers))
        # a reference to __main__ would name the wrong module on the other side
        # (a worker's __main__ is not the user's script): redo with _MainPickler
        if _MAIN not in data:
            return data, tuple(buffers)
    except Exception as exc:
        if not _is_serializer_failure(exc):
            raise
        first = exc
    buffers.clear()
    try:
        out = io.BytesIO()
        _MainPickler(out, persistent, where != "argument", buffer_callback=_collector(buffers)).dump(obj)
        return out.getvalue(), tuple(buffers)
    except Exception as exc:
        if not _is_serializer_failure(exc):
            raise
        first = first or exc
    buffers.clear()
    try:
        out = io.BytesIO()
        if persistent is not None:
            _DillRefPickler(out, persistent, buffer_callback=_collector(buffers)).dump(obj)
        else:
            _DillPickler(out, PROTOCOL, recurse=True, buffer_callback=_collector(buffers)).dump(obj)
        return out.getvalue(), tuple(buffers)
    except Exception as exc:
        if not _is_serializer_failure(exc):
            raise
        raise _failure(exc, obj, where) from first


def _collector(buffers: list[pickle.PickleBuffer]) -> Callable[[pickle.PickleBuffer], bool]:
    def collect(buf: pickle.PickleBuffer) -> bool:
        if _keep_oob(buf):
            return True
        buffers.append(buf)
        return False

    return collect


def loads(data: bytes, buffers: Buffers = (), deps: Mapping[int, Any] | None = None) -> Any:
    """Inverse of `dumps`; ``deps`` gives the values of referenced input tasks."""
    if deps is None:
        return pickle.loads(data, buffers=buffers)
    return _DepUnpickler(io.BytesIO(data), deps, buffers=buffers).load()


def buffers_nbytes(buffers: Sequence[Any]) -> int:
    """Bytes of a frame's out-of-band buffers."""
    return sum(memoryview(b).nbytes for b in buffers)


def frame_nbytes(frame: Frame) -> int:
    """Bytes a frame puts on the wire."""
    return len(frame[0]) + buffers_nbytes(frame[1])


class FunctionCache:
    """Function -> (digest, dill bytes), computed once per function object.

    Functions with closures are serialized anew each time (a closure cell can
    change between submits); everything else is cached weakly by identity, so
    a module-level function is dill-ed once per executor however many tasks
    use it.  Like multiprocessing, later changes to the globals a function
    reads are not seen by workers.
    """

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[Any, tuple[bytes, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        #: the last function looked up (weakly) and its entry: a loop submits
        #: one function over and over, and a weak-key lookup makes a weak
        #: reference each time (~0.1 us of a submit's ~5)
        self._last: tuple[weakref.ref[Any], tuple[bytes, bytes]] | None = None

    def get(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        last = self._last
        if last is not None and last[0]() is fn:
            return last[1]
        try:
            entry = self._cache[fn]
            self._last = (weakref.ref(fn), entry)
            return entry
        except (KeyError, TypeError):
            pass
        try:
            payload = dill.dumps(fn, PROTOCOL, recurse=True)
        except Exception as exc:
            if not _is_serializer_failure(exc):
                raise
            raise _failure(exc, fn, "function") from None
        entry = (hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest(), payload)
        if getattr(fn, "__closure__", None) is None:
            try:
                self._cache[fn] = entry
            except TypeError:  # not weak-referenceable (e.g. a builtin)
                pass
        return entry


def dumps_exception(exc: BaseException) -> Frame:
    """Serialize an exception so that it also loads back on the other side.

    Many exception classes pickle but fail to unpickle (an ``__init__`` with
    other arguments); such an exception is replaced by a `SerializationError`
    naming its type and message, so one bad exception fails only its task.
    """
    try:
        frame = dumps(exc, "exception")
        loads(*frame)
        return frame
    except Exception as err:  # noqa: BLE001 - any failure to round-trip means: use a stand-in
        text = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        stand_in = SerializationError(
            f"cannot serialize exception {text} ({err})",
            where="exception",
            type_name=type(exc).__qualname__,
        )
        return dumps(stand_in, "exception")
