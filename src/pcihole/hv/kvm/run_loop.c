/*
 * pcihole's vCPU loop in C, for the one exit a guest makes by the thousand: a read of an absent
 * PCI function's ECAM page, which reads as the segment's fill byte (all-ones by default).
 *
 * Why C: between two KVM_RUNs the Python loop spends a few microseconds (the ioctl call from
 * Python, decoding kvm_run, dispatch), as much as a whole exit costs QEMU, whose loop is C
 * (kvm_cpu_exec). kvmtool and Firecracker also loop in compiled code. Here only the absent-function
 * read is answered; every other exit goes back to Python, where the reference implementation of
 * everything (and of this answer too) lives: pcihole.machine.run_loop.
 *
 * Plain C ABI, no Python C API: loaded with ctypes, which releases the GIL for the whole call, so
 * the kick thread, the --timeout timer and the signal thread run while the vCPU is in here.
 *
 * pcihole_run() loops on KVM_RUN and returns
 *   PCIHOLE_EXIT      kvm_run holds an exit for Python (anything but the absent read below);
 *   PCIHOLE_LOG_FULL  the log of answered reads is full; nothing is pending (the last read is
 *                     answered and completes at the next KVM_RUN): call again after taking the log;
 *   -errno            KVM_RUN failed; -EINTR is a kick (kvm_run.immediate_exit or a signal), which
 *                     Python turns into an Interrupted exit as its own loop does.
 *
 * A KVM_EXIT_MMIO read is answered here only when all of this holds, else it goes to Python:
 *   - it lies in one window of the table and does not cross a 4 KiB page (an access straddling a
 *     hole and a present function must give each byte its own value: Python's host bridge does it);
 *   - its page's bit in the window's `present` bitmap is clear (pcihole.machine.ecam_window keeps
 *     the bitmap equal to the host bridge's present functions, hot-plug included);
 *   - the coalesced-MMIO ring is empty. The Python loop drains the ring before it handles each
 *     exit (QEMU: kvm_flush_coalesced_mmio_buffer); a fill read depends on no earlier write, but
 *     leaving every exit that finds entries waiting to Python keeps the order of side effects
 *     (the console's THR writes, trapped hole writes) exactly the Python loop's.
 * Each answered read is logged (address, size), so the run's statistics stay exact: it is one
 * mmio_read exit, one ECAM exit, one ECAM read, one absent-function exit at that address.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define PCIHOLE_EXIT 0
#define PCIHOLE_LOG_FULL 1
#define PAGE_SHIFT 12
#define PAGE_MASK ((UINT64_C(1) << PAGE_SHIFT) - 1)

/* Guest-physical [base, base + pages * 4 KiB): its absent pages read as `fill`. */
struct pcihole_window {
	uint64_t base;
	uint64_t pages;
	/* One bit per page, little-endian within each byte: set = a present function (Python answers).
	 * Python writes it (hot-plug) while this loop runs: one byte store, read with one byte load. */
	const volatile uint8_t *present;
	uint8_t fill;
};

struct pcihole_read {
	uint64_t addr;
	uint32_t size;
	uint32_t reserved;
};

struct pcihole_table {
	const struct pcihole_window *windows; /* sorted by base, not overlapping */
	uint32_t nwindows;
	uint32_t capacity; /* entries of log */
	uint32_t count;    /* entries used; Python empties the log (count = 0) */
	uint32_t reserved;
	struct pcihole_read *log;
};

static const struct pcihole_window *window_of(const struct pcihole_table *t, uint64_t addr)
{
	uint32_t lo = 0, hi = t->nwindows;

	while (lo < hi) { /* the last window whose base <= addr */
		uint32_t mid = lo + (hi - lo) / 2;

		if (t->windows[mid].base <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0)
		return NULL;
	const struct pcihole_window *w = &t->windows[lo - 1];
	return ((addr - w->base) >> PAGE_SHIFT) < w->pages ? w : NULL;
}

static int ring_empty(const struct kvm_run *run, uint32_t ring_offset)
{
	if (!ring_offset)
		return 1;
	const volatile struct kvm_coalesced_mmio_ring *ring =
		(const void *)((const char *)run + ring_offset);
	return ring->first == ring->last;
}

/* The fill the guest reads, or -1: the exit is Python's. */
static int absent_fill(const struct kvm_run *run, uint32_t ring_offset, const struct pcihole_table *t)
{
	uint64_t addr = run->mmio.phys_addr;
	uint32_t len = run->mmio.len;

	if (run->mmio.is_write || len < 1 || len > sizeof(run->mmio.data))
		return -1;
	const struct pcihole_window *w = window_of(t, addr);
	if (w == NULL || (addr & PAGE_MASK) + len > (UINT64_C(1) << PAGE_SHIFT))
		return -1;
	uint64_t page = (addr - w->base) >> PAGE_SHIFT;
	if (w->present[page >> 3] & (1u << (page & 7)))
		return -1;
	if (!ring_empty(run, ring_offset))
		return -1;
	return w->fill;
}

int pcihole_run(int vcpu_fd, struct kvm_run *run, uint32_t ring_offset, struct pcihole_table *t)
{
	if (t->count >= t->capacity)
		return PCIHOLE_LOG_FULL;
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
			return -errno;
		if (run->exit_reason != KVM_EXIT_MMIO)
			return PCIHOLE_EXIT;
		int fill = absent_fill(run, ring_offset, t);
		if (fill < 0)
			return PCIHOLE_EXIT;
		memset(run->mmio.data, fill, run->mmio.len);
		t->log[t->count].addr = run->mmio.phys_addr;
		t->log[t->count].size = run->mmio.len;
		if (++t->count == t->capacity)
			return PCIHOLE_LOG_FULL;
	}
}
