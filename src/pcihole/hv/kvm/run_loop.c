/*
 * pcihole's vCPU loop in C, for the exit a guest makes by the thousand: a read of an ECAM page.
 * An absent PCI function's page reads as the segment's fill byte (all-ones by default); a present
 * function's page reads as its configuration space, which lives in the function's mirror page
 * (pcihole.pci.config_mirror: the mirror page IS the space's bytes, never a copy of them).
 *
 * Why C: between two KVM_RUNs the Python loop spends a few microseconds (the ioctl call from
 * Python, decoding kvm_run, dispatch), as much as a whole exit costs QEMU, whose loop is C
 * (kvm_cpu_exec). kvmtool and Firecracker also loop in compiled code. Here only config reads are
 * answered; every other exit goes back to Python, where the reference implementation of
 * everything (and of these answers too) lives: pcihole.machine.run_loop.
 *
 * Plain C ABI, no Python C API: loaded with ctypes, which releases the GIL for the whole call, so
 * the kick thread, the --timeout timer and the signal thread run while the vCPU is in here.
 *
 * pcihole_run() loops on KVM_RUN and returns
 *   PCIHOLE_EXIT      kvm_run holds an exit for Python (anything but the reads below);
 *   PCIHOLE_LOG_FULL  the log of answered reads is full (absent reads logged plus mirror reads
 *                     counted reach `capacity`); nothing is pending (the last read is
 *                     answered and completes at the next KVM_RUN): call again after taking the log;
 *   -errno            KVM_RUN failed; -EINTR is a kick (kvm_run.immediate_exit or a signal), which
 *                     Python turns into an Interrupted exit as its own loop does.
 *
 * A KVM_EXIT_MMIO read is answered here only when all of this holds, else it goes to Python:
 *   - it lies in one window of the table and does not cross a 4 KiB page (an access straddling a
 *     hole and a present function must give each byte its own value: Python's host bridge does it);
 *   - either its page's bit in the window's `present` bitmap is clear (pcihole.machine.ecam_window
 *     keeps the bitmap equal to the memory map's punched pages, hot-plug included): the fill;
 *   - or that bit is set and so is the page's bit in `mirrored`, which the host bridge sets, under
 *     its lock, only while the function is in its table with its config space in the mirror page,
 *     and no hot-plug step is changing the mirror (`mirror_seq` is even and the same before and
 *     after the copy: a seqlock, as the kernel's read_seqcount_begin/read_seqcount_retry): the
 *     bytes at that offset of the mirror page, exactly what the host bridge's mmio_read would copy
 *     out of the function's config space under its lock. Config reads have no side effect in
 *     pcihole's device models (no read hook, no read-to-clear), so answering them without Python
 *     skips nothing; writes still go to Python, which emulates them on this same thread, between
 *     two calls of this loop, so no guest write can be half-applied while a read here copies;
 *   - the coalesced-MMIO ring is empty. The Python loop drains the ring before it handles each
 *     exit (QEMU: kvm_flush_coalesced_mmio_buffer). A fill read depends on no earlier write; a
 *     present function's bytes may (a trapped hole write waiting in the ring, once drained, sets
 *     its root port's AER status), and leaving every exit that finds entries waiting to Python
 *     keeps the order of side effects (the console's THR writes, trapped hole writes) exactly the
 *     Python loop's.
 * Each fill read is logged (address, size) and each mirror read counted, so the run's statistics
 * stay exact: a fill read is one mmio_read exit, one ECAM exit, one ECAM read, one absent-function
 * exit at that address; a mirror read is one mmio_read exit, one ECAM exit, one ECAM read and one
 * config read of the host bridge, as Python counts a read of a present function.
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

/* Guest-physical [base, base + pages * 4 KiB): its absent pages read as `fill`, its mirrored pages
 * as the bytes of their mirror page. */
struct pcihole_window {
	uint64_t base;
	uint64_t pages;
	/* One bit per page, little-endian within each byte: set = a page punched out of the hole for a
	 * present function (its reads are not the fill). Python writes it (hot-plug) while this loop
	 * runs: one byte store, read with one byte load. */
	const volatile uint8_t *present;
	/* The same layout: set = the page's function is in the host bridge's table and its config
	 * space is its mirror page (always a subset of `present`). Written under mirror_seq. */
	const volatile uint8_t *mirrored;
	/* Host address of the window's first mirror page (page i is at mirror + i * 4 KiB), or NULL
	 * where the window has no mirror (then every present page's read goes to Python). */
	const volatile uint8_t *mirror;
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
	uint32_t capacity;     /* entries of log, and the bound on count + mirror_reads */
	uint32_t count;        /* entries used; Python empties the log (count = 0) */
	uint32_t mirror_reads; /* reads answered from a mirror since Python last took them (set to 0) */
	struct pcihole_read *log;
	/* Odd while Python changes a mirror page, the `mirrored` bits or the host bridge's table from
	 * another thread (a hot-plug step); incremented before and after (a seqlock's writer side). */
	volatile uint32_t mirror_seq;
	uint32_t reserved;
};

enum answer { ANSWER_PYTHON, ANSWER_FILL, ANSWER_MIRROR };

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

static int bit(const volatile uint8_t *bitmap, uint64_t page)
{
	return bitmap[page >> 3] & (1u << (page & 7));
}

/* The `len` bytes at `from` in a mirror page, into `to`; 0 if a hot-plug step ran meanwhile (the
 * exit is then Python's, which takes the host bridge's lock and waits for the step to end). */
static int copy_mirrored(const struct pcihole_table *t, const struct pcihole_window *w, uint64_t page,
			 const volatile uint8_t *from, uint8_t *to, uint32_t len)
{
	/* x86 keeps loads in order and Python's stores in order (TSO): the acquire load and fence
	 * only stop the compiler from moving the bitmap and page loads out of the section. */
	uint32_t seq = __atomic_load_n(&t->mirror_seq, __ATOMIC_ACQUIRE);

	if (seq & 1 || !bit(w->mirrored, page))
		return 0;
	for (uint32_t i = 0; i < len; i++)
		to[i] = from[i];
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	return __atomic_load_n(&t->mirror_seq, __ATOMIC_RELAXED) == seq;
}

/* Answers the read in kvm_run.mmio.data, or says it is Python's (nothing written then). */
static enum answer answer(struct kvm_run *run, uint32_t ring_offset, const struct pcihole_table *t)
{
	uint64_t addr = run->mmio.phys_addr;
	uint32_t len = run->mmio.len;
	uint8_t bytes[sizeof(run->mmio.data)];

	if (run->mmio.is_write || len < 1 || len > sizeof(run->mmio.data))
		return ANSWER_PYTHON;
	const struct pcihole_window *w = window_of(t, addr);
	if (w == NULL || (addr & PAGE_MASK) + len > (UINT64_C(1) << PAGE_SHIFT))
		return ANSWER_PYTHON;
	uint64_t page = (addr - w->base) >> PAGE_SHIFT;
	if (!bit(w->present, page)) {
		if (!ring_empty(run, ring_offset))
			return ANSWER_PYTHON;
		memset(run->mmio.data, w->fill, len);
		return ANSWER_FILL;
	}
	if (w->mirror == NULL || !bit(w->mirrored, page) || !ring_empty(run, ring_offset))
		return ANSWER_PYTHON;
	if (!copy_mirrored(t, w, page, w->mirror + (addr - w->base), bytes, len))
		return ANSWER_PYTHON;
	memcpy(run->mmio.data, bytes, len);
	return ANSWER_MIRROR;
}

int pcihole_run(int vcpu_fd, struct kvm_run *run, uint32_t ring_offset, struct pcihole_table *t)
{
	if (t->count + t->mirror_reads >= t->capacity)
		return PCIHOLE_LOG_FULL;
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
			return -errno;
		if (run->exit_reason != KVM_EXIT_MMIO)
			return PCIHOLE_EXIT;
		switch (answer(run, ring_offset, t)) {
		case ANSWER_FILL:
			t->log[t->count].addr = run->mmio.phys_addr;
			t->log[t->count].size = run->mmio.len;
			t->count++;
			break;
		case ANSWER_MIRROR:
			t->mirror_reads++;
			break;
		default:
			return PCIHOLE_EXIT;
		}
		if (t->count + t->mirror_reads >= t->capacity)
			return PCIHOLE_LOG_FULL;
	}
}
