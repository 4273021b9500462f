"""Which windows each root bridge's _CRS produces: the main host bridge of every segment and every
expander bus, worked out once so that the DSDT describes them and the machine can check them.

Each segment gets an I/O window, its 32-bit window (pci_windows.allocate_windows, chosen by the
caller) and a 64-bit window (pci_windows.allocate_mem64_windows, grown to what the segment needs);
its expander buses take blocks from the top of each (pci_windows.carve) and the main host bridge
keeps the rest, as QEMU's PCI0 keeps what its pxb buses leave (crs_replace_with_free_ranges()).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pcihole.memory.address import align_up
from pcihole.pci.bridge_windows import WindowNeed

from .expander_bridge import ExpanderBus, ExpanderWindows
from .mcfg import EcamSegment
from .pci_windows import (
    IO_WINDOW_GRANULE,
    MmioWindow,
    allocate_io_windows,
    allocate_mem64_windows,
    carve,
    power_of_two_at_least,
)


@dataclass(frozen=True, slots=True)
class MainBridgeWindows:
    """A segment's main host bridge's windows: each the ranges its expanders leave (none: empty)."""

    io: tuple[MmioWindow, ...]
    mem32: tuple[MmioWindow, ...]
    mem64: tuple[MmioWindow, ...]


@dataclass(frozen=True, slots=True)
class PlacedWindow:
    """A guest-physical range the firmware tables hand out, and what it is, for error messages."""

    what: str
    window: MmioWindow


@dataclass(frozen=True, slots=True)
class WindowPlan:
    main: tuple[MainBridgeWindows, ...]  # one per segment, in the segments' order
    expanders: tuple[ExpanderWindows, ...]  # one per expander bus, in the expanders' order

    def memory_windows(
        self, segments: Sequence[EcamSegment], expanders: Sequence[ExpanderBus]
    ) -> list[PlacedWindow]:
        """Every memory window of the plan (I/O windows are port numbers, not addresses)."""
        out = []
        for s, main in zip(segments, self.main, strict=True):
            out += [PlacedWindow(f"segment {s.id}'s 32-bit MMIO window", w) for w in main.mem32]
            out += [PlacedWindow(f"segment {s.id}'s 64-bit MMIO window", w) for w in main.mem64]
        for x, windows in zip(expanders, self.expanders, strict=True):
            where = f"expander bus {x.bus:#04x} (segment {x.segment})'s"
            if windows.mem32 is not None:
                out.append(PlacedWindow(f"{where} 32-bit MMIO window", windows.mem32))
            if windows.mem64 is not None:
                out.append(PlacedWindow(f"{where} 64-bit MMIO window", windows.mem64))
        return out


def plan_windows(
    segments: Sequence[EcamSegment],
    windows: Sequence[MmioWindow | None],
    expanders: Sequence[ExpanderBus] = (),
    needs: Sequence[WindowNeed] = (),
) -> WindowPlan:
    """The plan for these segments; windows[i] is segment i's 32-bit window, needs[i] what its main
    root bus needs (default: nothing). ValueError for an expander in an undeclared segment, or
    expanders whose blocks do not fit their segment's windows."""
    needs = [*needs, *[WindowNeed()] * (len(segments) - len(needs))]
    expanders_of: list[list[int]] = [[] for _ in segments]
    index_of = {s.id: i for i, s in enumerate(segments)}
    for n, x in enumerate(expanders):
        if x.segment not in index_of:
            raise ValueError(f"expander bus {x.bus:#x} is in segment {x.segment}, which is not declared")
        expanders_of[index_of[x.segment]].append(n)
    io_windows = allocate_io_windows(len(segments))
    mem64_windows = allocate_mem64_windows(
        len(segments),
        [
            needs[i].mem64 + sum(_block(expanders[n].need.mem64) for n in expanders_of[i])
            for i in range(len(segments))
        ],
    )
    main = []
    expander_windows: dict[int, ExpanderWindows] = {}
    for i in range(len(segments)):
        mine = [expanders[n] for n in expanders_of[i]]
        io = carve(
            io_windows[i], [align_up(x.need.io, IO_WINDOW_GRANULE) for x in mine], IO_WINDOW_GRANULE, "I/O"
        )
        mem32 = carve(windows[i], [_block(x.need.mem32) for x in mine], None, "32-bit memory")
        mem64 = carve(mem64_windows[i], [_block(x.need.mem64) for x in mine], None, "64-bit memory")
        for k, n in enumerate(expanders_of[i]):
            expander_windows[n] = ExpanderWindows(io.blocks[k], mem32.blocks[k], mem64.blocks[k])
        if mine:
            main.append(MainBridgeWindows(io.free, mem32.free, mem64.free))
        else:
            main.append(
                MainBridgeWindows(_ranges(io_windows[i]), _ranges(windows[i]), _ranges(mem64_windows[i]))
            )
    return WindowPlan(tuple(main), tuple(expander_windows[n] for n in range(len(expanders))))


def _ranges(window: MmioWindow | None) -> tuple[MmioWindow, ...]:
    return () if window is None else (window,)


def _block(need: int) -> int:
    """A memory block for `need` bytes: a naturally aligned power of two (0 for none)."""
    return power_of_two_at_least(need) if need else 0
