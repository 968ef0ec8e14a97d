"""map's automatic chunk sizes, driven without MPI.

`FarmExecutor._map_auto` only needs the farm's worker count and ``submit``;
here ``submit`` runs each chunk at once and reports a simulated duration, so
the sizes it chooses can be checked exactly: one-item probes first (a wave
of two per worker, and one more per result until the wave is timed), then
chunks of `MAP_CHUNK_SECONDS` of work at the wave's mean time per item,
shrinking at the end of an input of known length (guided self-scheduling) but
not below `MAP_CHUNK_MIN_SECONDS`.
"""

from __future__ import annotations

import concurrent.futures
import types
from collections.abc import Callable
from typing import Any

from taskfarm._executor import MAP_CHUNK_MIN_SECONDS, MAP_CHUNK_SECONDS, MAP_GUIDED_FACTOR, FarmExecutor

#: simulated seconds per item (a power of two: the running mean stays exact)
ITEM_SECONDS = 2.0**-10
WORKERS = 2
#: one-item tasks before the first chunk: the wave of probes (two per
#: worker), then one more for each probe result but the wave's last
PROBING = 2 * (2 * WORKERS) - 1


class _FakeExecutor:
    """What `_map_auto` uses of an executor: the farm's peers and ``_submit_chunk``."""

    def __init__(self, workers: int, item_seconds: Callable[[Any], float]) -> None:
        self._farm = types.SimpleNamespace(transport=types.SimpleNamespace(peers=lambda: list(range(1, workers + 1))))
        self.sizes: list[int] = []
        self.item_seconds = item_seconds

    def _submit_chunk(self, runner: Callable[..., Any], fn: Callable[[Any], Any], chunk: list[Any]) -> Any:
        self.sizes.append(len(chunk))
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(([fn(x) for x in chunk], sum(map(self.item_seconds, chunk))))
        return future


def _map(
    n: int, length: int | None, item_seconds: Callable[[Any], float] = lambda x: ITEM_SECONDS
) -> tuple[list[int], list[int]]:
    fake = _FakeExecutor(WORKERS, item_seconds)
    runner = object()  # never called: the fake runs chunks itself
    out = list(FarmExecutor._map_auto(fake, lambda x: 3 * x, iter(range(n)), length, None, runner))  # type: ignore[arg-type]
    return out, fake.sizes


def test_probes_then_chunks_of_the_target_work_then_a_guided_tail() -> None:
    n = 2000
    out, sizes = _map(n, n)
    assert out == [3 * x for x in range(n)] and sum(sizes) == n
    assert sizes[:PROBING] == [1] * PROBING, sizes[:10]
    full = int(MAP_CHUNK_SECONDS / ITEM_SECONDS)
    assert max(sizes) == full and sizes[PROBING] == full, sizes[:10]
    # the tail: each chunk at most the remaining items / (factor x workers), never below the floor
    floor = max(1, int(MAP_CHUNK_MIN_SECONDS / ITEM_SECONDS))
    remaining = n - sum(sizes[: PROBING + 1])
    for size in sizes[PROBING + 1 :]:
        guided = -(-remaining // (MAP_GUIDED_FACTOR * WORKERS))
        assert size == min(full, max(guided, floor), remaining), (size, remaining, sizes[-12:])
        remaining -= size
    assert sizes[-1] < full, sizes[-12:]


def test_an_input_of_unknown_length_keeps_full_chunks() -> None:
    out, sizes = _map(1000, None)
    assert out == [3 * x for x in range(1000)] and sum(sizes) == 1000
    full = int(MAP_CHUNK_SECONDS / ITEM_SECONDS)
    assert set(sizes[PROBING:-1]) == {full}, sizes


def test_chunks_are_sized_from_the_whole_wave_of_probes_not_its_first() -> None:
    """A fast first item (a quarter of the others' time) must not make every
    chunk four times its target: chunks hold most of a known-length input."""
    n = 2000
    out, sizes = _map(n, n, lambda x: ITEM_SECONDS / 4 if x == 0 else ITEM_SECONDS)
    assert out == [3 * x for x in range(n)] and sizes[:PROBING] == [1] * PROBING
    wave = 2 * WORKERS
    mean = (ITEM_SECONDS / 4 + (wave - 1) * ITEM_SECONDS) / wave
    assert sizes[PROBING] == int(MAP_CHUNK_SECONDS / mean) < 2 * int(MAP_CHUNK_SECONDS / ITEM_SECONDS), sizes[:12]
