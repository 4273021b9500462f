"""A fake PCI function for the memory tests, and how to compare the bytes that writes leave.

(The VM these tests run, TableGuest, is in tests/guest_runner.py with the other guest runners.)
"""

from __future__ import annotations


class FakeFunction:
    """A fake PCI function's config page: byte i reads as (i * 7 + 0x11) & 0xff; writes are recorded."""

    def __init__(self, seed: int = 0x11) -> None:
        self.seed = seed
        self.writes: list[tuple[int, bytes]] = []

    def byte(self, offset: int) -> int:
        return (offset * 7 + self.seed) & 0xFF

    def bytes_at(self, offset: int, size: int) -> bytes:
        return bytes(self.byte(offset + i) for i in range(size))

    def read(self, offset: int, size: int) -> bytes:
        return self.bytes_at(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def bytes_written(writes) -> dict[int, int]:
    """{guest address: byte} of a list of (addr, data) writes; fails if any byte is written twice.

    Backends may split a write into several pieces (KVM splits at page boundaries, the model's
    Unicorn CPU splits unaligned accesses further), so tests compare bytes, not accesses.
    """
    out: dict[int, int] = {}
    for addr, data in writes:
        for i, b in enumerate(data):
            assert addr + i not in out, f"byte {addr + i:#x} written twice"
            out[addr + i] = b
    return out


def expected_bytes(writes: list[tuple[int, int, int]]) -> dict[int, int]:
    """Same, from (addr, size, value) as the guest table has them."""
    return bytes_written([(a, v.to_bytes(8, "little")[:s]) for a, s, v in writes])
