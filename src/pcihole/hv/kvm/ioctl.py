"""The one function every KVM ioctl goes through, and the error it raises.

One place to trace every syscall, and errors that say which ioctl failed with which arguments,
e.g. `KVM_SET_USER_MEMORY_REGION(slot=7, flags=0x2, ...): [Errno 17] File exists`.

libc's ioctl(2) through ctypes rather than fcntl.ioctl: the kernel takes an `unsigned long`
argument (KVM_SET_TSS_ADDR's 0xfffbd000 does not fit fcntl's C int), and ctypes drops the GIL for
the call, so a host thread can change memslots while a vCPU thread sits in KVM_RUN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from typing import TYPE_CHECKING

from pcihole.hv.ioctls import KvmIoctl

if TYPE_CHECKING:
    from pcihole.hv.interface import IoctlObserver

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class KvmError(OSError):
    """A KVM ioctl failed. `.errno` is the kernel's; `.ioctl` names the request."""

    def __init__(self, err: int, ioctl: KvmIoctl | str, detail: str = "") -> None:
        name = ioctl.name if isinstance(ioctl, KvmIoctl) else ioctl
        super().__init__(err, f"{name}({detail}): {os.strerror(err)}")
        self.ioctl = name
        self.detail = detail


def kvm_ioctl(
    fd: int,
    request: KvmIoctl,
    arg: int | ctypes.Structure | ctypes.Array = 0,
    detail: str = "",
    observer: IoctlObserver | None = None,
) -> int:
    """ioctl(fd, request, arg): `arg` is an integer, or a ctypes object passed by address (in/out).

    `observer` (a Vm's, see hv/interface.py) is told of the call once it has returned or failed.
    """
    ptr = arg if isinstance(arg, int) else ctypes.addressof(arg)
    if observer is None:
        ret = _ioctl(fd, request, ptr)
    else:
        start = time.perf_counter()
        try:
            ret = _ioctl(fd, request, ptr)
        finally:
            observer(request.name, None if isinstance(arg, int) else arg, time.perf_counter() - start)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), request, detail)
    return ret
