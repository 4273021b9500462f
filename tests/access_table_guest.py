"""A table-driven 64-bit test guest: the host writes a list of accesses, the guest performs them.

The table at `table` is `u64 count` followed by `count` entries of 32 bytes,
`{u64 addr; u64 op; u64 value; u64 result}`: op is the access size (1, 2, 4, 8) for a read, or
WRITE | size for a write of `value`. The guest stores what each read returned in `result`, then HLTs.
Used by the memory tests and the reliability fuzzing (one copy of the guest for both).
"""

from __future__ import annotations

import struct

WRITE = 0x100
ENTRY = struct.Struct("<QQQQ")


def pack_table(ops: list[tuple[int, int, int]]) -> bytes:
    """The table for `ops` = [(addr, op, value), ...]."""
    return struct.pack("<Q", len(ops)) + b"".join(ENTRY.pack(a, op, v, 0) for a, op, v in ops)


def read_results(raw: bytes, count: int) -> list[int]:
    """The `result` fields of the first `count` entries, from the bytes after the count."""
    return [ENTRY.unpack_from(raw, i * ENTRY.size)[3] for i in range(count)]


def access_table_guest(table: int) -> str:
    """The guest's source (GNU as, 64-bit), reading its table at guest-physical `table`."""
    return f"""
    mov ${table:#x}, %ebx
    mov (%rbx), %rcx
    add $8, %rbx
next:
    test %rcx, %rcx
    jz done
    mov (%rbx), %rdi
    mov 8(%rbx), %rax
    mov 16(%rbx), %rdx
    xor %r8, %r8
    cmp $1, %rax
    je r1
    cmp $2, %rax
    je r2
    cmp $4, %rax
    je r4
    cmp $8, %rax
    je r8
    cmp $0x101, %rax
    je w1
    cmp $0x102, %rax
    je w2
    cmp $0x104, %rax
    je w4
    cmp $0x108, %rax
    je w8
    ud2
r1: movzbq (%rdi), %r8
    jmp store
r2: movzwq (%rdi), %r8
    jmp store
r4: movl (%rdi), %r8d
    jmp store
r8: mov (%rdi), %r8
    jmp store
w1: mov %dl, (%rdi)
    jmp store
w2: mov %dx, (%rdi)
    jmp store
w4: mov %edx, (%rdi)
    jmp store
w8: mov %rdx, (%rdi)
store:
    mov %r8, 24(%rbx)
    add $32, %rbx
    dec %rcx
    jmp next
done:
    hlt
"""
