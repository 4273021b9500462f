"""The error every failing model "ioctl" raises: an OSError with the kernel's errno."""

from __future__ import annotations

import os


class ModelKvmError(OSError):
    """A model ioctl failed. `.errno` is what the kernel returns; `.ioctl` names the request.

    Same shape and message as the kvm backend's KvmError, e.g.
    `KVM_SET_USER_MEMORY_REGION(slot=7, ...): [Errno 17] File exists (overlaps slot 3 [...])`.
    """

    def __init__(self, err: int, ioctl: str, detail: str = "", why: str = "") -> None:
        message = f"{ioctl}({detail}): {os.strerror(err)}"
        if why:
            message += f" ({why})"
        super().__init__(err, message)
        self.ioctl = ioctl
        self.detail = detail
        self.why = why
