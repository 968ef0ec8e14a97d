"""Resuming from a journal: which of the tasks submitted now already have an outcome.

A task is known by its key: the user's (``Task(key=...)``) or a digest of its
function and arguments.  On resume, a task whose key has a recorded success
resolves from the journal without running; a recorded failure is returned
again unless ``retry_failed``; anything else runs.

Two checks keep a journal from being silently mixed with other work:

* a user key recorded with a different content digest under the same task
  name (other function or arguments) is a mismatch.  The digest travels in
  the label (``name [digest]``, see `label_for`); when the name part changed
  too (a task file's ``line 12: ...`` after a line was inserted above) the
  key alone decides, since such keys are derived from content already;
* when none of the first `CHECK_FIRST` submitted keys is in a non-empty
  journal, the script is probably not the one that wrote it.

Both raise `JournalError` unless ``force``; with ``force`` keys alone decide:
every recorded key is reused (first success wins, as in the journal), the
rest runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import pickle
import re
import types
import weakref
from collections.abc import Callable
from typing import Any

from ._errors import JournalError
from ._journal import MAX_LABEL_CHARS, JournalState

#: submissions looked at before concluding that a journal belongs to other work
CHECK_FIRST = 32
#: hex digits of the content digest shown in labels of user-keyed tasks
LABEL_DIGEST = 12
#: bytes of a derived task key (hex: twice as many characters)
KEY_BYTES = 16
#: new (unrecorded) keys named in the errors and the end-of-run line
EXAMPLES = 3
#: longest example shown
EXAMPLE_CHARS = 60
#: a user-keyed task's label: the name, then the content digest in brackets
_DIGEST_LABEL = re.compile(rf"^(.*) \[([0-9a-f]{{{LABEL_DIGEST}}})\]$", re.DOTALL)


def content_key(fn_digest: bytes, call: bytes, buffers: tuple[object, ...]) -> str:
    """A task's key derived from its function (`function_digest`) and arguments, as serialized."""
    h = hashlib.blake2b(fn_digest, digest_size=KEY_BYTES)
    h.update(call)
    for buf in buffers:
        h.update(memoryview(buf))  # type: ignore[arg-type]
    return h.hexdigest()


_digests: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def function_digest(fn: Callable[..., Any]) -> bytes:
    """A digest of what a function does that is the same in every process and run.

    Not the digest of its dill payload: dill writes the globals a function
    reads in set order, which changes with Python's per-process string hash
    seed, so a script's keys would change from run to run.  A function is
    known by its module, qualified name and code (bytecode, names and
    constants, nested code too), its defaults and its closure; functions met
    in those are followed the same way.  Line numbers are left out, so
    editing elsewhere in the file keeps the keys; the values of globals the
    function reads are left out too.  Other callables (partials, bound
    methods, instances) are digested through their parts or their pickle.
    Cached per function, except closures (their cells can change).
    """
    try:
        return _digests[fn]
    except (KeyError, TypeError):
        pass
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    _feed(h, fn, 0)
    digest = h.digest()
    if getattr(fn, "__closure__", None) is None:
        try:
            _digests[fn] = digest
        except TypeError:  # not weak-referenceable
            pass
    return digest


#: nesting of functions inside functions (closures, defaults) followed before giving up
_MAX_DEPTH = 8


def _feed(h: Any, obj: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        h.update(b"deep")
        return
    if isinstance(obj, types.FunctionType):
        h.update(f"function {obj.__module__}.{obj.__qualname__}".encode())
        _feed_code(h, obj.__code__)
        for part in (obj.__defaults__, obj.__kwdefaults__):
            _feed(h, part, depth + 1)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                h.update(b"empty cell")
                continue
            _feed(h, value, depth + 1)
    elif isinstance(obj, types.MethodType):
        h.update(b"method")
        _feed(h, obj.__func__, depth + 1)
        _feed(h, obj.__self__, depth + 1)
    elif isinstance(obj, functools.partial):
        h.update(b"partial")
        _feed(h, obj.func, depth + 1)
        _feed(h, obj.args, depth + 1)
        _feed(h, sorted(obj.keywords.items()), depth + 1)
    elif isinstance(obj, (tuple, list)) and any(callable(v) for v in obj):
        h.update(f"{type(obj).__name__} {len(obj)}".encode())
        for value in obj:
            _feed(h, value, depth + 1)
    elif isinstance(obj, dict) and any(callable(v) for v in obj.values()):
        h.update(f"dict {len(obj)}".encode())
        for k, value in obj.items():
            _feed(h, k, depth + 1)
            _feed(h, value, depth + 1)
    else:
        h.update(_pickled(obj))


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    h.update(repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)).encode())
    for const in code.co_consts:
        _feed_const(h, const)


def _feed_const(h: Any, const: object) -> None:
    if isinstance(const, types.CodeType):
        _feed_code(h, const)
    elif isinstance(const, tuple):
        h.update(b"(")
        for item in const:
            _feed_const(h, item)
        h.update(b")")
    elif isinstance(const, frozenset):  # `x in {"a", "b"}`: repr order follows the hash seed
        h.update(repr(sorted(repr(item) for item in const)).encode())
    else:
        h.update(f"{type(const).__name__}:{const!r}".encode())


def _pickled(obj: Any) -> bytes:
    """Bytes that stand for ``obj``: its pickle, else dill's, else its type and id."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - anything pickle refuses goes to dill
        pass
    try:
        import dill

        return bytes(dill.dumps(obj, pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - unpicklable: the task fails when it is sent anyway
        return f"unpicklable {type(obj).__module__}.{type(obj).__qualname__} {id(obj)}".encode()


def label_for(name: str, key: str, content: str) -> str:
    """The journal label: the function's name, plus the content digest for user keys.

    The name is cut so that the digest survives the journal's label limit.
    """
    if key == content:
        return name
    return f"{name[: MAX_LABEL_CHARS - LABEL_DIGEST - 3]} [{content[:LABEL_DIGEST]}]"


def _split_label(label: str) -> tuple[str, str | None]:
    """(name, content digest) of a label made by `label_for`; no digest: None."""
    match = _DIGEST_LABEL.match(label)
    return (match.group(1), match.group(2)) if match else (label, None)


def _content_differs(recorded: str, now: str) -> bool:
    """Same task name, other content digest: the user key now names other work."""
    old_name, old_digest = _split_label(recorded)
    name, digest = _split_label(now)
    return old_digest is not None and digest is not None and old_digest != digest and old_name == name


def _example(key: str, label: str) -> str:
    """A task named in a message: its key, and its label when that says more."""
    text = f"{key} ({label})" if label and label != key else key
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What the journal says about one key."""

    ok: bool
    frame: tuple[bytes, tuple[object, ...]] | None  # result or pickled exception
    error_text: str


class ResumeIndex:
    """Answers "has this task already run?" for a resuming farm."""

    def __init__(self, state: JournalState, *, retry_failed: bool = False, force: bool = False) -> None:
        self._tasks = state.tasks
        self.retry_failed = retry_failed
        self.force = force
        self.matched = 0
        self.new = 0
        self.rerun = 0
        self.looked_up = 0
        self._seen: set[str] = set()
        #: labels of the first few tasks not in the journal (for the reports)
        self.new_examples: list[str] = []
        #: the journal was found to hold other work: the run must leave it as it was
        self.refused = False

    def lookup(self, key: str, label: str) -> Recorded | None:
        """The recorded outcome to reuse for ``key``, or None to run the task."""
        self.looked_up += 1
        entry = self._tasks.get(key)
        if entry is None:
            self.new += 1
            if len(self.new_examples) < EXAMPLES:
                self.new_examples.append(_example(key, label))
            if (
                not self.force
                and self._tasks
                and self.matched + self.rerun == 0
                and self.looked_up >= min(CHECK_FIRST, len(self._tasks))
            ):
                firsts = itertools.islice(self._tasks.values(), EXAMPLES)
                recorded = ", ".join(repr(_example(e.key, e.label)) for e in firsts)
                self.refused = True
                raise JournalError(
                    f"journal from other work: none of the first {self.looked_up} tasks submitted is "
                    f"among its {len(self._tasks)} recorded tasks (new here: "
                    f"{', '.join(map(repr, self.new_examples))}; recorded there: {recorded}); "
                    "use another journal, or --force-resume (FarmExecutor(force_resume=True)) "
                    "to keep its results and run the rest (if this is the same work, its task keys "
                    "changed: see docs/journal.md, task keys)"
                )
            return None
        self._seen.add(key)
        if not self.force and _content_differs(entry.label, label):
            raise JournalError(
                f"task key {key!r} is recorded for {entry.label!r} but is now {label!r}: same key, "
                "other function or arguments (the bracketed content digests differ); give the task "
                "another key to run it, or --force-resume to trust the key and reuse what it recorded"
            )
        if entry.state == "SUCCESS" and entry.result is not None:
            self.matched += 1
            return Recorded(True, (entry.result[0], tuple(entry.result[1])), "")
        if entry.state == "FAILURE" and not self.retry_failed:
            self.matched += 1
            frame = None if entry.error is None else (entry.error[0], tuple(entry.error[1]))
            return Recorded(False, frame, entry.error_text or "failed in an earlier run")
        self.rerun += 1
        return None

    def describe(self) -> str:
        """One line for the end of a resumed run: what came from the journal."""
        s = self.summary()
        line = (
            f"resumed: {s['reused']} of {s['journal_tasks']} recorded tasks reused, "
            f"{s['rerun']} rerun, {s['new']} new"
        )
        if self.new_examples:
            line += f" (e.g. {', '.join(map(repr, self.new_examples))})"
        if s["not_resubmitted"]:
            line += f", {s['not_resubmitted']} recorded tasks not submitted this time"
        return line

    def summary(self) -> dict[str, int]:
        """Counts for the statistics: reused from the journal, new, rerun, left out."""
        return {
            "journal_tasks": len(self._tasks),
            "reused": self.matched,
            "new": self.new,
            "rerun": self.rerun,
            "not_resubmitted": len(self._tasks) - len(self._seen),
        }
