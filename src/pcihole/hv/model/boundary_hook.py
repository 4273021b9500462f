"""A block hook another thread can arm: the vCPU thread then runs Python at the next instruction boundary.

KVM applies a memslot change made by another thread at once, and kicks a running vCPU out of the guest
at an instruction boundary. A Unicorn engine cannot do either from another thread:
- its memory map may only be edited by the thread that emulates (nothing in Unicorn is locked);
- uc_emu_stop from another thread is observed after any load or store (check_exit_request), and the
  emulation then restarts at the beginning of the interrupted instruction: a store that already
  happened is done again, so `incl (mem)` increments twice and an MMIO write is delivered twice
  (measured on unicorn 2.1.4: 550 extra increments in 570 stops of an `incl` loop).

What is safe is a UC_HOOK_BLOCK callback: Unicorn calls it at the start of a translation block, before
the block's own exit check, with the guest PC synced. Calling it for every block from Python would
cost far too much, so the engine gets two block hooks:
- a C callback that does nothing (libunicorn's own `uc_errno`, which only reads uc->errnum), bounded
  to every address: it makes every translated block call helper_uc_tracecode, which checks each
  block hook's bounds at run time (with a single block hook, Unicorn would inline its callback into
  the block and skip the bounds);
- the Python callback, bounded to an address no block starts at. arm() widens its bounds to every
  address (begin > end), with two aligned 8-byte stores into Unicorn's `struct hook`; the vCPU thread
  narrows them again in the callback. `struct hook` is Unicorn's private layout (include/uc_priv.h,
  unicorn 2.1.x), so install() checks it against the values the hook was created with and falls
  back to uc_emu_stop (with the restart hazard above) where it does not match.

A callback that wants emulation to end calls uc_emu_stop: the block then exits before its first
instruction, at a clean boundary.

`unchanged`, if given, is asked first at each armed block start: True leaves the hook armed without
calling the callback. The vCPU polls RFLAGS.IF at every block while an interrupt waits for it, and
that poll is most of what the hook costs in a Linux boot (half a million block starts): answering
it in one predicate instead of disarm, callback and re-arm took it from 3.4-4.9 us to about 2 us a
block (measured in one run, a 200,000-block IF-clear loop).

pcihole's engine (engine/patches, docs/model-system-cpu.md) has `uc_pcihole_request_boundary`: the
engine itself calls the Python hook at the next block start, from a check it already makes there, so
neither the C no-op hook nor widened bounds are needed (the Python hook stays bounded to no address
and is never translated into a block). And while `unchanged` holds, the request becomes "at the
first block start where the guest can take an external interrupt" (RFLAGS.IF set, no shadow): the
engine checks that in C, and Python runs once when the window opens instead of at every block.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from unicorn import UC_HOOK_BLOCK, Uc, UcError
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

_NOWHERE = (1 << 64) - 0x1000  # never the start of a translation block
_BEGIN, _END = 24, 32  # offsetof(struct hook, begin / end) in unicorn 2.1.x (include/uc_priv.h)
_TYPE = 0
# uc_pcihole_request_boundary's `when` (include/unicorn/unicorn.h of the patched engine)
_NEXT, _WINDOW = 1, 2
_REQUEST = getattr(uclib, "uc_pcihole_request_boundary", None)  # None: a stock engine
if _REQUEST is not None:
    _REQUEST.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    _REQUEST.restype = ctypes.c_int


def engine_requests_boundaries() -> bool:
    """The engine calls a boundary hook when asked (pcihole's patched Unicorn), with no per-block cost."""
    return _REQUEST is not None


class BoundaryHook:
    """Arm from any thread; `callback(uc)` then runs once in the emulating thread at a block start."""

    def __init__(
        self, uc: Uc, callback: Callable[[Uc], None], unchanged: Callable[[Uc], bool] | None = None
    ) -> None:
        self._uc = uc
        self._callback = callback
        self._unchanged = unchanged
        self.armed = False
        if _REQUEST is not None:
            self._hook = uc.hook_add(UC_HOOK_BLOCK, self._on_block, None, _NOWHERE, _NOWHERE)
            self._uch = uc._uch
            self.precise = True
            return
        self._uch = None
        handle = uc_hook_h()
        noop = ctypes.cast(uclib.uc_errno, ctypes.c_void_p)
        err = uclib.uc_hook_add(
            uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK, noop, None, ctypes.c_uint64(1), ctypes.c_uint64(0)
        )
        if err:
            raise UcError(err)
        self._hook = uc.hook_add(UC_HOOK_BLOCK, self._on_block, None, _NOWHERE, _NOWHERE)
        self._begin = ctypes.c_uint64.from_address(self._hook + _BEGIN)
        self._end = ctypes.c_uint64.from_address(self._hook + _END)
        kind = ctypes.c_int.from_address(self._hook + _TYPE).value
        self.precise = kind == UC_HOOK_BLOCK and self._begin.value == self._end.value == _NOWHERE

    def arm(self) -> None:
        """Run the callback at the next block start (any thread)."""
        self.armed = True
        if _REQUEST is not None:
            _REQUEST(self._uch, self._hook, _NEXT)
        elif self.precise:
            self._begin.value = 1  # [1, _NOWHERE]: nearly everything, while `end` is changed
            self._end.value = 0  # begin > end: every address
        else:
            self._uc.emu_stop()

    def _disarm(self) -> None:
        self.armed = False
        if _REQUEST is None and self.precise:
            self._end.value = _NOWHERE
            self._begin.value = _NOWHERE

    def _on_block(self, uc: Uc, address: int, size: int, _data: object) -> None:
        if not self.armed:
            return
        if self._unchanged is not None and self._unchanged(uc):
            if _REQUEST is not None:
                _REQUEST(self._uch, self._hook, _WINDOW)  # asked again once the window opens
            return  # stays armed: the same question at the next block start
        self._disarm()
        self._callback(uc)
