"""Resuming from a journal: which of the tasks submitted now already have an outcome.

A task is known by its key: the user's (``Task(key=...)``) or a digest of its
function and arguments.  On resume, a task whose key has a recorded success
resolves from the journal without running; a recorded failure is returned
again unless ``retry_failed``; anything else runs.

Two checks keep a journal from being silently mixed with other work:

* a user key recorded with a different content digest (same name, other
  function or arguments) is a mismatch;
* when none of the first `CHECK_FIRST` submitted keys is in a non-empty
  journal, the script is probably not the one that wrote it.

Both raise `JournalError` unless ``force``.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ._errors import JournalError
from ._journal import JournalState

#: submissions looked at before concluding that a journal belongs to other work
CHECK_FIRST = 32
#: hex digits of the content digest shown in labels of user-keyed tasks
LABEL_DIGEST = 12
#: bytes of a derived task key (hex: twice as many characters)
KEY_BYTES = 16


def content_key(fn_digest: bytes, call: bytes, buffers: tuple[object, ...]) -> str:
    """A task's key derived from its function and arguments, as serialized."""
    h = hashlib.blake2b(fn_digest, digest_size=KEY_BYTES)
    h.update(call)
    for buf in buffers:
        h.update(memoryview(buf))  # type: ignore[arg-type]
    return h.hexdigest()


def label_for(name: str, key: str, content: str) -> str:
    """The journal label: the function's name, plus the content digest for user keys."""
    return name if key == content else f"{name} [{content[:LABEL_DIGEST]}]"


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

    def lookup(self, key: str, label: str) -> Recorded | None:
        """The recorded outcome to reuse for ``key``, or None to run the task."""
        self.looked_up += 1
        entry = self._tasks.get(key)
        if entry is None:
            self.new += 1
            if (
                not self.force
                and self._tasks
                and self.matched + self.rerun == 0
                and self.looked_up >= min(CHECK_FIRST, len(self._tasks))
            ):
                raise JournalError(
                    f"none of the first {self.looked_up} tasks submitted is in the journal "
                    f"({len(self._tasks)} tasks recorded): it was written by other work; "
                    "use another journal, or --force-resume (FarmExecutor(force_resume=True))"
                )
            return None
        self._seen.add(key)
        if entry.label != label and "[" in label + entry.label and not self.force:
            raise JournalError(
                f"task key {key!r} was recorded for {entry.label!r} but is now {label!r}: "
                "same key, other function or arguments; use --force-resume to run it anew"
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

    def summary(self) -> dict[str, int]:
        """Counts for the statistics: reused from the journal, new, rerun, left out."""
        return {
            "journal_tasks": len(self._tasks),
            "reused": self.matched,
            "new": self.new,
            "rerun": self.rerun,
            "not_resubmitted": len(self._tasks) - len(self._seen),
        }
