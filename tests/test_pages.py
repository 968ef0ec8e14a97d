"""Huge pages for incoming arrays (taskfarm._pages): which VMs withhold them, and that the advice lands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from taskfarm import _pages, _transport


def virtio(root: Path, name: str, device: int, features: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "device").write_text(f"0x{device:04x}\n")
    (d / "features").write_text(features + "\n")


REPORTING = "011001" + "0" * 58  # feature bits 1, 2 and 5 (free page reporting), bit 0 first
NOT_REPORTING = "011000" + "0" * 58


def test_a_balloon_that_reports_free_pages_is_seen(tmp_path: Path) -> None:
    virtio(tmp_path, "virtio1", 0x0002, REPORTING)  # a block device: the bit means something else there
    assert not _pages.free_pages_reported(str(tmp_path))
    virtio(tmp_path, "virtio0", 0x0005, NOT_REPORTING)
    assert not _pages.free_pages_reported(str(tmp_path))
    virtio(tmp_path, "virtio9", 0x0005, REPORTING)
    assert _pages.free_pages_reported(str(tmp_path))


def test_no_virtio_bus_or_unreadable_devices_report_nothing(tmp_path: Path) -> None:
    assert not _pages.free_pages_reported(str(tmp_path / "missing"))
    (tmp_path / "virtio0").mkdir()  # no device file
    virtio(tmp_path, "virtio1", 0x0005, "01")  # too few bits
    assert not _pages.free_pages_reported(str(tmp_path))


@pytest.fixture
def choice() -> Iterator[Callable[[], bool]]:
    """`huge_pages_wanted`, made afresh for the test (it is cached per process) and after it."""
    _pages.huge_pages_wanted.cache_clear()
    yield _pages.huge_pages_wanted
    _pages.huge_pages_wanted.cache_clear()


@pytest.mark.parametrize(("value", "wanted"), [("1", True), ("0", False), (" 0 ", False)])
def test_the_environment_decides_when_set(
    monkeypatch: pytest.MonkeyPatch, choice: Callable[[], bool], value: str, wanted: bool
) -> None:
    monkeypatch.setenv(_pages.HUGE_PAGES_ENV, value)
    monkeypatch.setattr(_pages, "free_pages_reported", lambda: pytest.fail("not asked when the variable is set"))
    assert choice() is wanted


@pytest.mark.parametrize("reported", [True, False])
def test_unset_the_vm_decides(monkeypatch: pytest.MonkeyPatch, choice: Callable[[], bool], reported: bool) -> None:
    monkeypatch.delenv(_pages.HUGE_PAGES_ENV, raising=False)
    monkeypatch.setattr(_pages, "free_pages_reported", lambda: reported)
    assert choice() is not reported


def test_a_bad_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, choice: Callable[[], bool]) -> None:
    monkeypatch.setenv(_pages.HUGE_PAGES_ENV, "yes")
    with pytest.raises(ValueError, match=_pages.HUGE_PAGES_ENV):
        choice()


def vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_large_receive_buffer_is_advised_against_huge_pages_when_withheld(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nh` in the mapping's flags is the kernel's record of MADV_NOHUGEPAGE."""
    size = 4 * _pages.ADVISED_MIN
    monkeypatch.setattr(_transport, "huge_pages_wanted", lambda: False)
    withheld = _transport._receive_buffer(size)
    middle = withheld.ctypes.data + size // 2
    assert "nh" in vm_flags(middle)
    monkeypatch.setattr(_transport, "huge_pages_wanted", lambda: True)
    kept = _transport._receive_buffer(size)
    assert "nh" not in vm_flags(kept.ctypes.data + size // 2)
    assert isinstance(withheld, np.ndarray) and withheld.nbytes == size


def test_small_buffers_are_left_alone() -> None:
    small = np.empty(_pages.ADVISED_MIN // 2, dtype=np.uint8)
    before = vm_flags(small.ctypes.data)
    _pages.withhold_huge_pages(small)
    assert vm_flags(small.ctypes.data) == before
