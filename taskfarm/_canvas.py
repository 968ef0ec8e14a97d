"""Celery's canvas over farm futures: `signature`, `chain`, `group`, `chord`.

A canvas is a description of work; ``submit(executor)`` sends all of it to
the farm at once and returns futures.  Nothing waits on rank 0: each step is
an ordinary task whose inputs are the futures of the steps before it, so the
master dispatches it when they are done and substitutes their values (see
`FarmExecutor.submit`).  A step whose input failed fails with
`DependencyFailed`, and so does everything after it.

The vocabulary is Celery's::

    chain(a, b, c)       a's result is b's first argument, b's is c's
    a | b | c            the same
    group(a, b, c)       run side by side; the result is the list of results
    chord(group, body)   body gets the list of the group's results
    group(...) | body    the same

Steps are `Signature` objects (``signature(fn, *args, **kwargs)``, with
per-task options through ``.set(countdown=..., priority=...)``), `Task`
objects, or plain callables.  A signature made with ``immutable=True``
(Celery's ``si``) ignores the previous step's result.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

from ._future import FarmFuture
from ._task import Task

if TYPE_CHECKING:
    from ._executor import FarmExecutor

__all__ = ["GroupResult", "Signature", "chain", "chord", "group", "signature"]

#: the per-task options a signature may carry: every `Task` field but the call
_OPTIONS = frozenset(f.name for f in dataclasses.fields(Task)) - {"fn", "args", "kwargs"}


class _NoParent:
    """The first step of a canvas gets no previous result."""

    def __repr__(self) -> str:
        return "<no parent>"


_NO_PARENT = _NoParent()

#: what a step hands to the next one: a future, or (from a group) a list of them
Parent = Union[FarmFuture, "GroupResult", _NoParent]


class GroupResult(list):  # type: ignore[type-arg]
    """The futures of a group, in the group's order (a list; nested groups nest).

    Like Celery's ``GroupResult``: ``get()`` waits for every member and
    returns their values, raising the first failure in member order.
    """

    def get(self, timeout: float | None = None) -> list[Any]:
        """The members' values, in order; waits at most ``timeout`` seconds in all."""
        done, not_done = concurrent.futures.wait(list(_leaves(self)), timeout)
        if not_done:
            raise concurrent.futures.TimeoutError(f"{len(not_done)} of {len(done) + len(not_done)} tasks not done")
        return [m.get() if isinstance(m, GroupResult) else m.result() for m in self]

    def ready(self) -> bool:
        """True when every member is done (successfully or not)."""
        return all(f.done() for f in _leaves(self))

    def successful(self) -> bool:
        """True when every member is done and none failed or was cancelled."""
        return all(f.done() and not f.cancelled() and f.exception(0) is None for f in _leaves(self))

    def failed(self) -> bool:
        """True when some member failed or was cancelled."""
        return any(f.done() and (f.cancelled() or f.exception(0) is not None) for f in _leaves(self))

    def completed_count(self) -> int:
        """Members that finished successfully."""
        return sum(1 for f in _leaves(self) if f.done() and not f.cancelled() and f.exception(0) is None)


def _plain(parent: Any) -> Any:
    """A group's futures as plain (nested) lists, which the master fills with values."""
    if isinstance(parent, GroupResult):
        return [_plain(member) for member in parent]
    return parent


def _leaves(result: Iterable[Any]) -> Iterable[FarmFuture]:
    for member in result:
        if isinstance(member, GroupResult):
            yield from _leaves(member)
        else:
            yield member


class Canvas:
    """What `chain`, `group`, `chord` and `Signature` have in common."""

    def submit(self, executor: FarmExecutor) -> Any:
        """Send the whole canvas to ``executor``'s farm; returns at once.

        A signature, chain or chord gives the `FarmFuture` of its last task;
        a group (or a chain ending in one) gives a `GroupResult`.
        """
        return self._apply(executor, _NO_PARENT)

    def _apply(self, executor: FarmExecutor, parent: Parent) -> Any:
        raise NotImplementedError

    def __or__(self, other: Any) -> Canvas:
        if isinstance(self, group):
            return chord(self, other)
        return chain(self, other)


class Signature(Canvas):
    """One call, its per-task options, and whether it takes the previous result."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"a signature needs a callable, not {type(fn).__name__}")
        unknown = set(options or ()) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown task option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        self.fn = fn
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = immutable
        self.options = dict(options or {})

    def set(self, *, immutable: bool | None = None, **options: Any) -> Signature:
        """A copy with these `Task` options (countdown, eta, expires, priority, ...)."""
        return Signature(
            self.fn,
            self.args,
            self.kwargs,
            immutable=self.immutable if immutable is None else immutable,
            options={**self.options, **options},
        )

    def task(self, parent_value: Any = _NO_PARENT) -> Task:
        """The `Task` this step submits, with ``parent_value`` prepended unless immutable."""
        args = self.args
        if parent_value is not _NO_PARENT and not self.immutable:
            args = (parent_value, *args)
        return Task(self.fn, args, self.kwargs, **self.options)

    def _apply(self, executor: FarmExecutor, parent: Parent) -> FarmFuture:
        return executor.submit_task(self.task(_plain(parent)))

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        call = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        extra = f" {self.options}" if self.options else ""
        return f"{'si' if self.immutable else 's'}:{name}({', '.join(call)}){extra}"


def signature(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Signature:
    """``fn(*args, **kwargs)`` as a canvas step (Celery's ``fn.s(*args, **kwargs)``).

    In a chain the previous step's result is prepended to ``args``; use
    ``signature(...).set(immutable=True)`` (Celery's ``si``) to ignore it.
    """
    return Signature(fn, args, kwargs)


def _as_canvas(step: Any) -> Canvas:
    if isinstance(step, Canvas):
        return step
    if isinstance(step, Task):
        options = {name: getattr(step, name) for name in _OPTIONS}
        return Signature(step.fn, step.args, step.kwargs, options=options)
    if callable(step):
        return Signature(step)
    raise TypeError(
        f"a canvas step is a signature, chain, group, chord, Task or callable, not {type(step).__name__}"
    )


def _steps(tasks: tuple[Any, ...]) -> list[Canvas]:
    """The steps given as arguments, or as one iterable (a list or generator)."""
    if len(tasks) == 1 and not callable(tasks[0]) and not isinstance(tasks[0], (Canvas, Task)):
        tasks = tuple(tasks[0])
    return [_as_canvas(t) for t in tasks]


class chain(Canvas):
    """Steps one after another: each step's result is the next step's first argument."""

    def __init__(self, *tasks: Any) -> None:
        steps: list[Canvas] = []
        for step in _steps(tasks):
            steps.extend(step.tasks if isinstance(step, chain) else [step])
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.tasks: tuple[Canvas, ...] = tuple(steps)

    def _apply(self, executor: FarmExecutor, parent: Parent) -> Any:
        result: Any = parent
        for step in self.tasks:
            result = step._apply(executor, result)
        return result

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)


class group(Canvas):
    """Steps side by side; the result is the list of their results, in order.

    In a chain, each member gets the previous step's result.
    """

    def __init__(self, *tasks: Any) -> None:
        self.tasks: tuple[Canvas, ...] = tuple(_steps(tasks))

    def _apply(self, executor: FarmExecutor, parent: Parent) -> GroupResult:
        return GroupResult(step._apply(executor, parent) for step in self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"


class chord(Canvas):
    """A group (the header) and a callback (the body) over the list of its results.

    The body runs once every header task succeeded; if one failed, the body
    fails with `DependencyFailed`.  An empty header gives the body ``[]``.
    """

    def __init__(self, header: Any, body: Any) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = _as_canvas(body)

    def _apply(self, executor: FarmExecutor, parent: Parent) -> Any:
        return self.body._apply(executor, self.header._apply(executor, parent))

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"
