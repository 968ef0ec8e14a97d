"""The public surface of taskfarm and the layering of its modules (no MPI)."""

from __future__ import annotations

import ast
import concurrent.futures
import inspect
import pickle
from pathlib import Path

import pytest

import taskfarm

PACKAGE = Path(taskfarm.__file__).resolve().parent

#: the public names, sorted; a change here is an API change: update docs too
PUBLIC = [
    "BrokenFarmError",
    "DependencyFailed",
    "ExitCode",
    "FarmExecutor",
    "FarmFuture",
    "FarmStatistics",
    "GroupResult",
    "JournalError",
    "MaxRetriesExceededError",
    "PeriodicTask",
    "RankStatistics",
    "RemoteTraceback",
    "SerializationError",
    "Signature",
    "Task",
    "TaskExpired",
    "TaskState",
    "TaskfarmError",
    "TimeLimitExceeded",
    "WorkerLostError",
    "__version__",
    "as_completed_async",
    "chain",
    "chord",
    "farm",
    "group",
    "signature",
]

#: low to high: a module may import its own layer and the layers below, never above
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"_errors", "_task", "_signals", "_pages"}),
    (
        "core",
        {
            "_protocol",
            "_serialization",
            "_scheduler",
            "_journal",
            "_journal_writer",
            "_future",
            "_resume",
            "_events",
            "_bundles",
            "_statistics",
            "_trials",
        },
    ),
    ("io", {"_transport", "_loopback"}),
    (
        "runtime",
        {"_worker", "_master", "_farm_state", "_dispatch", "_intake", "_shortcuts", "_outcomes", "_pools"},
    ),
    ("api", {"_executor", "_canvas", "_periodic"}),
    ("front", {"_cli", "__main__", "_commands", "_report", "_progress", "_status", "slurm", "_spawned"}),
]
LEVEL = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
LAYER_NAME = {module: name for name, modules in LAYERS for module in modules}


def test_all_is_pinned_and_sorted() -> None:
    assert sorted(taskfarm.__all__) == PUBLIC
    assert len(set(taskfarm.__all__)) == len(taskfarm.__all__)
    for name in PUBLIC:
        assert hasattr(taskfarm, name), name


def test_version_is_a_string() -> None:
    assert isinstance(taskfarm.__version__, str)
    assert taskfarm.__version__.count(".") >= 1


def test_broken_farm_error_is_a_broken_executor() -> None:
    assert issubclass(taskfarm.BrokenFarmError, concurrent.futures.BrokenExecutor)
    assert issubclass(taskfarm.BrokenFarmError, taskfarm.TaskfarmError)


def test_serialization_error_is_a_pickling_error() -> None:
    assert issubclass(taskfarm.SerializationError, pickle.PicklingError)
    assert issubclass(taskfarm.SerializationError, taskfarm.TaskfarmError)


def test_farm_errors_derive_from_taskfarm_error() -> None:
    for name in PUBLIC:
        obj = getattr(taskfarm, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not taskfarm.RemoteTraceback:
            assert issubclass(obj, taskfarm.TaskfarmError), name


def test_executor_and_future_are_the_standard_types() -> None:
    assert issubclass(taskfarm.FarmExecutor, concurrent.futures.Executor)
    assert issubclass(taskfarm.FarmFuture, concurrent.futures.Future)


@pytest.mark.parametrize("name", [n for n in PUBLIC if n != "__version__"])
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(taskfarm, name)
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    assert doc and doc.strip(), f"taskfarm.{name} has no docstring"
    # a dataclass without a docstring gets its signature as one
    assert not doc.startswith(f"{name}("), f"taskfarm.{name} has only the generated docstring"


# --------------------------------------------------------------------------
# layering
# --------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, taskfarm module) for every import of a taskfarm module, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "taskfarm" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "taskfarm":
                    continue
                rest = parts[1:]
            elif node.level == 1:
                rest = (node.module or "").split(".") if node.module else []
            else:
                continue
            if rest:
                found.append((node.lineno, rest[0]))
            else:  # from . import _x, _y  /  from taskfarm import _x
                found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def _third_party(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_every_module_is_placed_in_a_layer() -> None:
    unplaced = sorted(set(_modules()) - set(LEVEL))
    assert not unplaced, f"put these modules into a layer in tests/test_api.py: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for name, path in _modules().items():
        if name not in LEVEL:
            continue
        for line, target in _imports(path):
            if target in LEVEL and LEVEL[target] > LEVEL[name]:
                violations.append(
                    f"taskfarm/{path.name}:{line}: {name} ({LAYER_NAME[name]}) imports "
                    f"{target} ({LAYER_NAME[target]})"
                )
    assert not violations, "\n".join(violations)


def test_the_farms_layers_call_only_themselves_and_the_layers_below() -> None:
    """`taskfarm._master.Farm` is built in layers, a class over the one below
    (its module docstring): no layer's method calls a method that only a
    layer above it has."""
    from taskfarm._master import Farm

    farm_methods = {name for name, value in inspect.getmembers(Farm) if callable(value) or isinstance(value, property)}
    violations = []
    for layer in Farm.__mro__[:-1]:
        source = inspect.getsource(inspect.getmodule(layer))  # type: ignore[arg-type]
        tree = ast.parse(source)
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == layer.__name__)
        for attr in ast.walk(node):
            if (
                isinstance(attr, ast.Attribute)
                and isinstance(attr.value, ast.Name)
                and attr.value.id == "self"
                and attr.attr in farm_methods
                and not hasattr(layer, attr.attr)
            ):
                violations.append(f"{layer.__name__} (line {attr.lineno}) uses self.{attr.attr}, from a layer above")
    assert [cls.__name__ for cls in Farm.__mro__[:-1]] == [
        "Farm",
        "ShortCuts",
        "ResultIntake",
        "Dispatching",
        "FarmState",
    ]
    assert not violations, "\n".join(violations)


def test_import_scanner_sees_every_form() -> None:
    source = (
        "from . import _a, _b as bee\n"
        "from ._c import x\n"
        "import taskfarm._d\n"
        "from taskfarm._e import y\n"
        "from taskfarm import _f\n"
        "def late():\n"
        "    from ._g import z\n"
        "import os\n"
    )
    probe = PACKAGE.parent / "tests" / "_scanner_probe.txt"
    try:
        probe.write_text(source)
        assert sorted(t for _, t in _imports(probe)) == ["_a", "_b", "_c", "_d", "_e", "_f", "_g"]
    finally:
        probe.unlink()


def test_only_the_transport_imports_mpi4py() -> None:
    offenders = [
        f"taskfarm/{path.name}:{line}"
        for name, path in _modules().items()
        for line, top in _third_party(path)
        if top == "mpi4py" and name != "_transport"
    ]
    assert not offenders, f"mpi4py imported outside taskfarm/_transport.py: {offenders}"
    assert any(top == "mpi4py" for _, top in _third_party(_modules()["_transport"]))
