"""Tests for taskfarm._serialization: the wire form of calls, results and exceptions (no MPI)."""

from __future__ import annotations

import functools
import gc
import hashlib
import pickle
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

from taskfarm import _serialization as ser
from taskfarm._errors import SerializationError, TaskfarmError
from taskfarm._future import FarmFuture


def roundtrip(obj: Any, where: str = "argument") -> Any:
    data, buffers = ser.dumps(obj, where)
    # the transport hands the receiver fresh writable buffers: do the same
    return ser.loads(data, tuple(bytearray(memoryview(b)) for b in buffers))


def module_level(x: int) -> int:
    return x + 1


class ReduceRaises:
    def __reduce__(self) -> Any:
        raise ValueError("mine")


class TwoArgs(Exception):
    """Pickles, but cannot be unpickled: its ``__init__`` wants two arguments."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


# --------------------------------------------------------------------------
# dumps / loads
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None,
        0,
        -(2**70),
        3.5,
        "text ☃",
        b"\x00bytes",
        bytearray(b"ba"),
        [1, [2, (3, {"k": {4, 5}})]],
        {"nested": {"list": [1.0, None], "tuple": ("a",)}},
        frozenset({1, 2}),
        ValueError("boom"),
    ],
    ids=repr,
)
def test_plain_objects_round_trip(obj: Any) -> None:
    back = roundtrip(obj)
    if isinstance(obj, BaseException):
        assert type(back) is type(obj) and back.args == obj.args
    else:
        assert back == obj and type(back) is type(obj)


def test_what_pickle_refuses_goes_through_dill() -> None:
    def outer(k: int) -> Any:
        return lambda x: x * k

    fn, rest = roundtrip((outer(3), [lambda: "inner"]))
    assert fn(5) == 15
    assert rest[0]() == "inner"


def test_frame_nbytes_counts_stream_and_buffers() -> None:
    arr = np.zeros(ser.OOB_THRESHOLD, dtype=np.uint8)
    frame = ser.dumps(arr, "argument")
    assert ser.frame_nbytes(frame) == len(frame[0]) + arr.nbytes


# --------------------------------------------------------------------------
# out-of-band buffers
# --------------------------------------------------------------------------


def test_large_numpy_array_travels_out_of_band() -> None:
    arr = np.arange(ser.OOB_THRESHOLD // 8 * 4, dtype=np.float64)
    data, buffers = ser.dumps(arr, "argument")
    assert len(buffers) == 1
    assert memoryview(buffers[0]).nbytes == arr.nbytes
    assert len(data) < 1024  # the data is not copied into the pickle stream
    back = ser.loads(data, (bytearray(memoryview(buffers[0])),))
    assert np.array_equal(back, arr) and back.dtype == arr.dtype


def test_out_of_band_result_is_built_over_the_received_buffer() -> None:
    arr = np.arange(ser.OOB_THRESHOLD, dtype=np.int32)
    data, buffers = ser.dumps(arr, "result")
    received = bytearray(memoryview(buffers[0]))
    back = ser.loads(data, (received,))
    assert back.flags.writeable
    received[:4] = (12345).to_bytes(4, "little")
    assert back[0] == 12345  # no copy: the array is a view of the buffer


def test_small_numpy_array_stays_in_band() -> None:
    arr = np.arange(16, dtype=np.float64)
    data, buffers = ser.dumps(arr, "argument")
    assert buffers == ()
    assert np.array_equal(ser.loads(data), arr)


def test_threshold_is_inclusive_at_oob_threshold() -> None:
    below = np.zeros(ser.OOB_THRESHOLD - 1, dtype=np.uint8)
    at = np.zeros(ser.OOB_THRESHOLD, dtype=np.uint8)
    assert ser.dumps(below, "argument")[1] == ()
    assert len(ser.dumps(at, "argument")[1]) == 1


def test_many_arrays_each_get_their_buffer_and_come_back_in_place() -> None:
    big = [np.full(ser.OOB_THRESHOLD, i, dtype=np.uint8) for i in range(3)]
    small = np.arange(3)
    obj = {"big": big, "small": small, "again": big[1]}
    data, buffers = ser.dumps(obj, "argument")
    assert len(buffers) == 3  # the repeated array is memoised, not sent twice
    back = ser.loads(data, tuple(bytearray(memoryview(b)) for b in buffers))
    for i in range(3):
        assert np.array_equal(back["big"][i], big[i])
    assert back["again"] is back["big"][1]
    assert np.array_equal(back["small"], small)


def test_non_contiguous_and_fortran_arrays_round_trip() -> None:
    base = np.arange(4 * ser.OOB_THRESHOLD, dtype=np.float64).reshape(4, -1)
    for arr in (base[:, ::3], np.asfortranarray(base), base.T):
        back = roundtrip(arr)
        assert np.array_equal(back, arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype


# --------------------------------------------------------------------------
# FunctionCache
# --------------------------------------------------------------------------


def test_function_cache_returns_the_same_entry_for_the_same_function() -> None:
    cache = ser.FunctionCache()
    first = cache.get(module_level)
    assert cache.get(module_level) is first
    digest, payload = first
    assert digest == hashlib.blake2b(payload, digest_size=ser.DIGEST_SIZE).digest()
    assert ser.loads(payload)(1) == 2


def test_function_cache_distinguishes_functions() -> None:
    cache = ser.FunctionCache()

    def other(x: int) -> int:
        return x - 1

    assert cache.get(module_level)[0] != cache.get(other)[0]
    lam = lambda x: x * 2  # noqa: E731
    assert cache.get(lam) is cache.get(lam)  # no closure: cached too


def test_function_cache_answers_for_the_function_asked_not_the_last_one() -> None:
    """The cache keeps the last function looked up in front (a loop submits
    one function over and over): it must answer only for that very function,
    and not for a new one made where a dead one was."""
    cache = ser.FunctionCache()
    one = lambda x, k=1: x + k  # noqa: E731
    two = lambda x, k=2: x + k  # noqa: E731
    first = cache.get(one)
    assert cache.get(two) is not first
    assert cache.get(one) is first and cache.get(one) is first
    assert ser.loads(cache.get(two)[1])(0) == 2
    del one, first
    gc.collect()
    three = lambda x, k=3: x + k  # noqa: E731  # may take the dead one's address
    assert ser.loads(cache.get(three)[1])(0) == 3


def test_function_cache_does_not_cache_closures() -> None:
    cache = ser.FunctionCache()
    n = 1

    def get() -> int:
        return n

    first = cache.get(get)
    assert ser.loads(first[1])() == 1
    n = 2  # the cell changes between two submits
    second = cache.get(get)
    assert second is not first
    assert second[0] != first[0]
    assert ser.loads(second[1])() == 2


def test_function_cache_handles_functions_it_cannot_weakly_reference() -> None:
    cache = ser.FunctionCache()
    digest, payload = cache.get(len)
    assert cache.get(len)[0] == digest
    assert ser.loads(payload)([1, 2]) == 2


def test_function_cache_reports_an_unpicklable_callable() -> None:
    cache = ser.FunctionCache()
    holder = functools.partial(module_level, (i for i in range(3)))  # a generator: nobody pickles it
    with pytest.raises(SerializationError) as info:
        cache.get(holder)
    assert info.value.where == "function"


# --------------------------------------------------------------------------
# SerializationError
# --------------------------------------------------------------------------


def test_locks_and_files_are_refused_even_next_to_code_that_needs_dill(tmp_path: Any) -> None:
    # dill would rebuild a lock or an open file as a new, unrelated object
    with open(tmp_path / "f.txt", "w") as handle:
        for obj in (threading.Lock(), threading.RLock(), handle):
            with pytest.raises(SerializationError) as info:
                ser.dumps((lambda: 1, [obj]), "argument")
            assert info.value.where == "argument"
            assert info.value.type_name.endswith(type(obj).__name__)


@pytest.mark.parametrize("where", ["argument", "result"])
def test_unpicklable_object_raises_serialization_error_naming_type_and_place(where: str) -> None:
    with pytest.raises(SerializationError) as info:
        ser.dumps({"deep": [1, threading.Lock()]}, where)
    err = info.value
    assert err.where == where
    assert "lock" in err.type_name
    assert isinstance(err, pickle.PicklingError)
    assert isinstance(err, TaskfarmError)


def test_serialization_error_survives_pickling_with_its_fields() -> None:
    err = SerializationError("cannot", where="result", type_name="socket")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SerializationError
    assert (str(back), back.where, back.type_name) == ("cannot", "result", "socket")


def test_exception_from_an_objects_own_reduce_propagates_unchanged() -> None:
    with pytest.raises(ValueError) as info:
        ser.dumps([ReduceRaises()], "argument")
    assert type(info.value) is ValueError and info.value.args == ("mine",)


# --------------------------------------------------------------------------
# dumps_exception
# --------------------------------------------------------------------------


def test_dumps_exception_keeps_a_loadable_exception() -> None:
    back = ser.loads(*ser.dumps_exception(KeyError("k", 2)))
    assert type(back) is KeyError and back.args == ("k", 2)


def test_dumps_exception_stands_in_for_an_exception_that_will_not_unpickle() -> None:
    exc = TwoArgs(1, 2)
    with pytest.raises(TypeError):  # the premise: plain pickle cannot load it back
        pickle.loads(pickle.dumps(exc))
    back = ser.loads(*ser.dumps_exception(exc))
    assert type(back) is SerializationError
    assert back.where == "exception"
    assert back.type_name == "TwoArgs"
    assert "1/2" in str(back)  # the original message is kept


def test_dumps_exception_stands_in_for_an_exception_that_will_not_pickle() -> None:
    exc = RuntimeError("holds a lock")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    back = ser.loads(*ser.dumps_exception(exc))
    assert type(back) is SerializationError
    assert back.where == "exception" and back.type_name == "RuntimeError"


# --------------------------------------------------------------------------
# futures as arguments: persistent references
# --------------------------------------------------------------------------


def _refs(inputs: list[int]) -> ser.Persistent:
    def persistent(obj: Any) -> Any:
        if isinstance(obj, FarmFuture):
            inputs.append(obj.task_id)
            return ("dep", obj.task_id)
        return None

    return persistent


def test_a_future_in_the_arguments_asks_for_the_reference_hook() -> None:
    with pytest.raises(ser.FutureInArguments):
        ser.dumps(((1, FarmFuture(7)), {}), "argument")


def test_futures_become_references_and_load_as_their_values() -> None:
    a, b = FarmFuture(7), FarmFuture(8)
    inputs: list[int] = []
    call = ((a, [b, {"again": a}]), {"kw": b})
    data, buffers = ser.dumps(call, "argument", _refs(inputs))
    assert sorted(set(inputs)) == [7, 8]
    big = np.ones(ser.OOB_THRESHOLD, dtype=np.uint8)
    args, kwargs = ser.loads(data, buffers, {7: "seven", 8: big})
    assert args[0] == "seven" and args[1][1]["again"] == "seven"
    assert args[1][0] is big and kwargs["kw"] is big


def test_references_work_on_the_dill_fallback_path_too() -> None:
    fut = FarmFuture(3)
    inputs: list[int] = []
    call = ((fut, lambda y: y + 1), {})  # the lambda forces the dill pickler
    data, buffers = ser.dumps(call, "argument", _refs(inputs))
    assert set(inputs) == {3}
    (value, fn), _ = ser.loads(data, buffers, {3: 41})
    assert fn(value) == 42


# --------------------------------------------------------------------------
# objects of __main__: a worker's __main__ is not the user's script
# --------------------------------------------------------------------------


@pytest.fixture
def script_main(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in for the user's script as ``__main__``, with a class and a function."""
    main = types.ModuleType("__main__")
    exec(
        "import dataclasses\n"
        "@dataclasses.dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "class MyError(Exception):\n"
        "    pass\n"
        "def triple(v):\n"
        "    return 3 * v\n",
        main.__dict__,
    )
    monkeypatch.setitem(sys.modules, "__main__", main)
    return main


def _elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Become the other side: a process whose __main__ lacks the script's names."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


def test_main_functions_and_instances_in_arguments_travel_by_value(
    script_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = ser.dumps(((script_main.triple, script_main.Point(2)), {}), "argument")
    _elsewhere(monkeypatch)
    (fn, point), _ = ser.loads(*frame)
    assert fn(point.x) == 6
    assert type(point).__qualname__ == "Point" and point.x == 2


def test_main_class_instances_share_one_class_on_the_receiving_side(
    script_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = [ser.dumps(script_main.Point(i), "argument") for i in range(3)]
    _elsewhere(monkeypatch)
    points = [ser.loads(*f) for f in frames]
    assert len({type(p) for p in points}) == 1
    assert points[0] == type(points[0])(0)


def test_main_classes_in_results_and_exceptions_come_back_as_the_masters_own(
    script_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_cls, error_cls = script_main.Point, script_main.MyError
    result = ser.dumps(point_cls(5), "result")
    error = ser.dumps_exception(error_cls("bad"))
    _elsewhere(monkeypatch)  # the worker side can still load them (by value)
    assert ser.loads(*result).x == 5
    monkeypatch.setitem(sys.modules, "__main__", script_main)  # back on the master
    back = ser.loads(*result)
    assert type(back) is point_cls and back.x == 5
    exc = ser.loads(*error)
    assert type(exc) is error_cls and exc.args == ("bad",)
