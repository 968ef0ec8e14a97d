"""Huge pages for incoming arrays: withheld on VMs that hand freed memory back.

numpy advises the kernel to back arrays of 4 MiB and more with transparent
huge pages.  On a VM whose balloon device reports free pages to its host
(virtio-balloon's free page reporting), memory a process frees goes back to
the host within seconds, and the next first touch of a huge page costs a
host fault per 2 MiB whose speed varied 0.4-7 GB/s from one minute to the
next, where 4 KiB pages ran at 1.6-2.4 GB/s (docs/performance.md, "Fresh
memory on this VM").  The farm's receive buffers are such first touches: a
task's array arguments on a worker, its array results on rank 0.  On such a
VM they are advised against huge pages; elsewhere numpy's advice stands.
``TASKFARM_HUGE_PAGES=1`` (numpy's advice) or ``0`` (withheld) decides instead.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from typing import Any

#: environment variable that overrides the choice: 1 (numpy's advice) or 0 (withheld)
HUGE_PAGES_ENV = "TASKFARM_HUGE_PAGES"
#: numpy advises huge pages for arrays from this size (its own threshold): smaller buffers are left alone
ADVISED_MIN = 4 << 20
#: where Linux lists virtio devices, each with its ``device`` id and ``features`` bits
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
#: virtio device id of a memory balloon
_BALLOON = 0x0005
#: its feature bit for free page reporting (VIRTIO_BALLOON_F_REPORTING)
_REPORTING_BIT = 5


def free_pages_reported(devices: str = VIRTIO_DEVICES) -> bool:
    """True on a VM whose memory balloon reports free pages to the host."""
    try:
        names = os.listdir(devices)
    except OSError:
        return False  # no virtio bus: not such a VM
    for name in names:
        try:
            with open(os.path.join(devices, name, "device")) as f:
                device = int(f.read().strip(), 16)
            with open(os.path.join(devices, name, "features")) as f:
                features = f.read().strip()  # one character per bit, bit 0 first
        except (OSError, ValueError):
            continue
        if device == _BALLOON and len(features) > _REPORTING_BIT and features[_REPORTING_BIT] == "1":
            return True
    return False


@functools.cache
def huge_pages_wanted() -> bool:
    """Whether receive buffers keep numpy's huge-page advice (see the module
    docstring); ValueError for a `HUGE_PAGES_ENV` other than 0 or 1."""
    value = os.environ.get(HUGE_PAGES_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ValueError(f"{HUGE_PAGES_ENV} must be 1 (huge pages for incoming arrays) or 0 (none), not {value!r}")
    return not free_pages_reported()


@functools.cache
def _madvise() -> Any:
    return ctypes.CDLL(None, use_errno=True).madvise


def withhold_huge_pages(buffer: Any) -> None:
    """Advise the kernel to back ``buffer`` (a numpy array not yet written)
    with small pages: its whole pages, where numpy advised huge ones."""
    if buffer.nbytes < ADVISED_MIN:
        return
    page = mmap.PAGESIZE
    start = buffer.ctypes.data
    first = -(-start // page) * page
    end = (start + buffer.nbytes) // page * page
    # advice only: a kernel without transparent huge pages refuses it, and nothing changes
    _madvise()(ctypes.c_void_p(first), ctypes.c_size_t(end - first), mmap.MADV_NOHUGEPAGE)
