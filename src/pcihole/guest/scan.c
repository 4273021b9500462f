/*
 * pcihole scan guest: finds PCIe ECAM the way an OS does (ACPI RSDP ->
 * XSDT/RSDT -> MCFG, or the pcihole.ecam= command-line option), probes it
 * the way Linux does (pci_scan_child_bus + pcibios_fixup_peer_bridges),
 * and reports what it found in memory (pcihole_report) and on COM1.
 *
 * Freestanding, 32-bit, paging off: every physical address below 4 GiB
 * is a plain pointer. See README.md for the report layout and protocol.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ------------------------------------------------------------------ */
/* Report (read by the VMM from guest memory; layout is ABI, see README) */

#define REPORT_MAGIC 0x52534850u /* "PHSR" */
#define REPORT_VERSION 2
/*
 * Every ECAM window lies below 4 GiB (paging is off) and is at least 1 MiB
 * (one bus), so no valid machine has more than 4096 regions: the report
 * holds that many, and a machine never needs more.
 */
#define MAX_REGIONS 4096
/*
 * The device list is where pcihole.devices=ADDR,MAX says (the VMM sizes it
 * from the machine), else this many entries in .bss.
 */
#define DEFAULT_MAX_DEVICES 256

#define STATE_RUNNING 1
#define STATE_DONE 2

#define ST_NO_ECAM 0x01		/* no usable ECAM region: nothing scanned */
#define ST_BAD_START_INFO 0x02	/* EBX did not point at hvm_start_info */
#define ST_NO_ACPI 0x04		/* no valid RSDP / RSDT / XSDT */
#define ST_NO_MCFG 0x08		/* ACPI present but no valid MCFG */
#define ST_BAD_TABLE 0x10	/* some ACPI structure failed its checks */
#define ST_REGION_SKIPPED 0x20	/* an ECAM region was above 4 GiB or invalid */
#define ST_BAD_OPTION 0x40	/* a pcihole.* option could not be parsed */
#define ST_TRUNCATED 0x80	/* more devices than max_devices */

#define SRC_MCFG 1
#define SRC_CMDLINE 2
#define REGION_SKIPPED 0x01

#define DEV_PEER_SCAN 0x01	/* found by the peer-bus brute force */
#define DEV_ONE_CHILD 0x02	/* PCIe Root/Downstream Port: only device 0 scanned below */
#define DEV_NOT_FOLLOWED 0x04	/* bridge whose secondary bus was not scanned */

struct region {
	u64 base;		/* ECAM address of bus 0 (as in MCFG) */
	u16 segment;
	u8 start_bus;
	u8 end_bus;
	u8 source;
	u8 flags;
	u16 reserved;
};

struct device {
	u16 segment;
	u8 bus;
	u8 devfn;
	u16 vendor;
	u16 device;
	u32 class_rev;		/* dword at 0x08: class << 8 | revision */
	u8 header_type;		/* raw byte at 0x0e (bit 7 = multifunction) */
	u8 flags;
	u8 secondary;		/* bridges: from dword 0x18 */
	u8 subordinate;
};

struct report {
	u32 magic;		/* 0x00 */
	u16 version;		/* 0x04 */
	u16 header_size;	/* 0x06 */
	u32 max_regions;	/* 0x08 */
	u32 max_devices;	/* 0x0c */
	u32 state;		/* 0x10 */
	u32 status;		/* 0x14 */
	u32 scans;		/* 0x18 */
	u32 config_reads;	/* 0x1c: ECAM reads of the last scan */
	u32 total_config_reads;	/* 0x20: all scans */
	u32 ndevices;		/* 0x24: found in the last scan (may exceed max_devices) */
	u32 nregions;		/* 0x28 */
	u32 rsdp_paddr;		/* 0x2c */
	u32 mcfg_paddr;		/* 0x30 */
	u32 devices_paddr;	/* 0x34: where devices[max_devices] is */
	struct region regions[MAX_REGIONS];	/* 0x38 */
};

typedef char assert_region_size[sizeof(struct region) == 16 ? 1 : -1];
typedef char assert_device_size[sizeof(struct device) == 16 ? 1 : -1];
typedef char assert_report_size[sizeof(struct report) == 0x38 + 16 * MAX_REGIONS ? 1 : -1];

struct report pcihole_report;
static struct device default_devices[DEFAULT_MAX_DEVICES];
static struct device *devices = default_devices;

/*
 * How long the scan took, in TSC ticks, beside the report (not inside it: the
 * report's layout is ABI). The VMM reads it by its symbol; with the
 * pcihole.timing option the done line carries it too, which is how a
 * benchmark times the scan alone on a VMM it cannot look into (QEMU), with the
 * same clock on every VMM.
 */
#define TIMING_MAGIC 0x4d544850u /* "PHTM" */
#define TIMING_VERSION 1

struct timing {
	u32 magic;		/* 0x00 */
	u32 version;		/* 0x04 */
	u64 scan_tsc;		/* 0x08: TSC ticks from before the first scan to after the last */
};

typedef char assert_timing_size[sizeof(struct timing) == 16 ? 1 : -1];

struct timing pcihole_timing;

/*
 * pcihole.exitloop=N: after the scan, N timed 4-byte reads of offset 0 of
 * the first absent function the scan found, of the first present one (the
 * host bridge, 00:00.0, on q35 and on pcihole's machines) and of a RAM word.
 * On a VMM that traps ECAM each config read is one exit, so
 * (absent ticks - RAM ticks) / N is what one exit costs, the guest's own
 * loop taken out, measured the same way on every VMM.
 */
static u32 opt_exitloop;
static u32 first_absent, first_present;	/* ECAM addresses, 0 if none found */
static volatile u32 exitloop_ram_word;

/* ------------------------------------------------------------------ */
/* Port I/O and serial output                                          */

#define COM1 0x3f8

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

/*
 * No LSR polling: each LSR read is one more exit, and both QEMU's 16550
 * and the pcihole VMM accept THR writes back to back.
 */
static void putc(char c)
{
	outb(COM1, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void puthex(u64 v, int digits)
{
	while (digits--)
		putc("0123456789abcdef"[(v >> (digits * 4)) & 0xf]);
}

static void putdec(u32 v)
{
	char buf[10];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		putc(buf[--n]);
}

/* ------------------------------------------------------------------ */
/* ECAM accesses: plain loads, like Linux's mmio_config_read{b,w,l}    */

static u32 nreads;

static inline u32 cfg_read32(u32 addr)
{
	u32 v;

	nreads++;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr));
	return v;
}

static inline u16 cfg_read16(u32 addr)
{
	u16 v;

	nreads++;
	__asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(addr));
	return v;
}

static inline u8 cfg_read8(u32 addr)
{
	u8 v;

	nreads++;
	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(addr));
	return v;
}

/*
 * The time-stamp counter. No serialising fence around it: a scan takes
 * thousands of instructions, so a few out of order do not matter. Under KVM
 * an RDTSC never exits to the VMM (the kernel answers it if it traps at all).
 */
static inline u64 rdtsc(void)
{
	u64 t;

	__asm__ volatile("rdtsc" : "=A"(t));
	return t;
}

/* ------------------------------------------------------------------ */
/* Small helpers (plain memory, no exits)                              */

static inline u8 rd8(u32 a) { return *(const volatile u8 *)a; }
static inline u16 rd16(u32 a) { return *(const volatile u16 *)a; }
static inline u32 rd32(u32 a) { return *(const volatile u32 *)a; }
static inline u64 rd64(u32 a) { return (u64)rd32(a) | (u64)rd32(a + 4) << 32; }

static int sig_is(u32 a, const char *sig)
{
	for (; *sig; sig++, a++)
		if (rd8(a) != (u8)*sig)
			return 0;
	return 1;
}

static int checksum_ok(u32 a, u32 len)
{
	u8 sum = 0;

	while (len--)
		sum += rd8(a++);
	return sum == 0;
}

static void *memzero(void *p, u32 n)
{
	u8 *d = p;

	while (n--)
		*d++ = 0;
	return p;
}

/* ------------------------------------------------------------------ */
/* ECAM regions                                                        */

static u32 status;

static void add_region(u64 base, u16 seg, u32 start, u32 end, u8 source)
{
	struct report *r = &pcihole_report;
	struct region *g;

	if (r->nregions >= MAX_REGIONS) {
		status |= ST_REGION_SKIPPED;
		return;
	}
	g = &r->regions[r->nregions++];
	g->base = base;
	g->segment = seg;
	g->start_bus = (u8)start;
	g->end_bus = (u8)end;
	g->source = source;
	/* Paging is off: the whole window must lie below 4 GiB. */
	if (start > end || end > 255 || base + ((u64)(end + 1) << 20) > 0x100000000ull) {
		g->flags |= REGION_SKIPPED;
		status |= ST_REGION_SKIPPED;
	}
}

/* ------------------------------------------------------------------ */
/* ACPI: RSDP -> XSDT / RSDT -> MCFG                                   */

static int rsdp_valid(u32 a)
{
	u32 len;

	if (!sig_is(a, "RSD PTR ") || !checksum_ok(a, 20))
		return 0;
	if (rd8(a + 15) >= 2) {
		len = rd32(a + 20);
		if (len < 36 || len > 4096 || !checksum_ok(a, len))
			return 0;
	}
	return 1;
}

static u32 find_rsdp(u64 hint)
{
	u32 a;

	if (hint) {
		if (hint < 0x100000000ull && rsdp_valid((u32)hint))
			return (u32)hint;
		status |= ST_BAD_TABLE;
	}
	for (a = 0xe0000; a < 0x100000; a += 16)
		if (rsdp_valid(a))
			return a;
	return 0;
}

static int table_valid(u64 a, const char *sig)
{
	u32 len;

	if (!a || a >= 0x100000000ull - 36)
		return 0;
	if (sig && !sig_is((u32)a, sig))
		return 0;
	len = rd32((u32)a + 4);
	if (len < 36 || len > (16u << 20) || (u64)a + len > 0x100000000ull)
		return 0;
	return checksum_ok((u32)a, len);
}

static void parse_mcfg(u32 mcfg)
{
	u32 len = rd32(mcfg + 4), off;

	pcihole_report.mcfg_paddr = mcfg;
	for (off = 44; off + 16 <= len; off += 16) {
		u32 e = mcfg + off;

		add_region(rd64(e), rd16(e + 8), rd8(e + 10), rd8(e + 11), SRC_MCFG);
	}
}

static void acpi_find_ecam(u64 rsdp_hint)
{
	u32 rsdp = find_rsdp(rsdp_hint), root = 0, esz = 4, n, i;

	if (!rsdp) {
		status |= ST_NO_ACPI;
		return;
	}
	pcihole_report.rsdp_paddr = rsdp;
	if (rd8(rsdp + 15) >= 2) {
		u64 x = rd64(rsdp + 24);

		if (table_valid(x, "XSDT")) {
			root = (u32)x;
			esz = 8;
		} else if (x) {
			status |= ST_BAD_TABLE;
		}
	}
	if (!root) {
		u32 r = rd32(rsdp + 16);

		if (!table_valid(r, "RSDT")) {
			status |= ST_NO_ACPI | (r ? ST_BAD_TABLE : 0);
			return;
		}
		root = r;
	}
	n = (rd32(root + 4) - 36) / esz;
	for (i = 0; i < n; i++) {
		u32 e = root + 36 + i * esz;
		u64 t = esz == 8 ? rd64(e) : rd32(e);

		if (!t || t >= 0x100000000ull || !sig_is((u32)t, "MCFG"))
			continue;
		if (!table_valid(t, 0) || rd32((u32)t + 4) < 44) {
			status |= ST_BAD_TABLE;
			continue;
		}
		parse_mcfg((u32)t);
		return;
	}
	status |= ST_NO_MCFG;
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

static u32 opt_repeat = 1;
static u64 opt_devices_paddr, opt_max_devices;
static int opt_quiet;
static int opt_timing;

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Parses a decimal or 0x-prefixed hexadecimal number; returns 0 if none. */
static int parse_num(const char **pp, u64 *out)
{
	const char *p = *pp;
	u64 v = 0;
	int any = 0, hex = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		hex = 1;
		p += 2;
	}
	for (;; p++) {
		int d;

		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (hex && *p >= 'a' && *p <= 'f')
			d = *p - 'a' + 10;
		else if (hex && *p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			break;
		if (v >> 60)
			return 0;
		v = hex ? v << 4 | (u64)d : v * 10 + (u64)d;
		any = 1;
	}
	*pp = p;
	*out = v;
	return any;
}

static int starts_with(const char *p, const char *s)
{
	while (*s)
		if (*p++ != *s++)
			return 0;
	return 1;
}

static int at_end(const char *p)
{
	return *p == 0 || is_space(*p);
}

/* pcihole.devices=ADDR,MAX: the device list goes at ADDR, MAX entries of 16 bytes, below 4 GiB. */
static int parse_devices(const char *p)
{
	u64 addr, max;

	if (!parse_num(&p, &addr) || *p++ != ',' || !parse_num(&p, &max) || !at_end(p))
		return 0;
	if (!addr || !max || max > 0x10000000ull || addr + max * sizeof(struct device) > 0x100000000ull)
		return 0;
	opt_devices_paddr = addr;
	opt_max_devices = max;
	return 1;
}

/* pcihole.ecam=BASE,START-END[,SEGMENT] */
static int parse_ecam(const char *p)
{
	u64 base, start, end, seg = 0;

	if (!parse_num(&p, &base) || *p++ != ',' || !parse_num(&p, &start) || *p++ != '-' ||
	    !parse_num(&p, &end))
		return 0;
	if (*p == ',' && (p++, !parse_num(&p, &seg)))
		return 0;
	if (!at_end(p) || start > 255 || end > 255 || start > end || seg > 0xffff)
		return 0;
	add_region(base, (u16)seg, (u32)start, (u32)end, SRC_CMDLINE);
	return 1;
}

static void parse_cmdline(const char *p)
{
	for (;;) {
		while (is_space(*p))
			p++;
		if (!*p)
			return;
		if (starts_with(p, "pcihole.ecam=")) {
			if (!parse_ecam(p + 13))
				status |= ST_BAD_OPTION;
		} else if (starts_with(p, "pcihole.devices=")) {
			if (!parse_devices(p + 16))
				status |= ST_BAD_OPTION;
		} else if (starts_with(p, "pcihole.repeat=")) {
			const char *q = p + 15;
			u64 n;

			if (parse_num(&q, &n) && at_end(q) && n >= 1 && n <= 0xffffffffull)
				opt_repeat = (u32)n;
			else
				status |= ST_BAD_OPTION;
		} else if (starts_with(p, "pcihole.exitloop=")) {
			const char *q = p + 17;
			u64 n;

			if (parse_num(&q, &n) && at_end(q) && n >= 1 && n <= 0xffffffffull)
				opt_exitloop = (u32)n;
			else
				status |= ST_BAD_OPTION;
		} else if (starts_with(p, "pcihole.quiet") && at_end(p + 13)) {
			opt_quiet = 1;
		} else if (starts_with(p, "pcihole.timing") && at_end(p + 14)) {
			opt_timing = 1;
		} else if (starts_with(p, "pcihole.")) {
			status |= ST_BAD_OPTION;
		}
		while (!at_end(p))
			p++;
	}
}

/* ------------------------------------------------------------------ */
/* The scan (drivers/pci/probe.c and arch/x86/pci/legacy.c, in small)  */

static u32 known[MAX_REGIONS][8];	/* buses already scanned, per region */
/*
 * The regions of each segment, as chains of index + 1 (0 ends a chain), so
 * that finding the regions of a bus costs the regions of its segment, not all
 * of them: with a thousand one-bus segments, a scan over every region for
 * every bus made the scan quadratic (seconds under a software KVM).
 */
static u16 segment_first[65536];
static u16 segment_next[MAX_REGIONS];

static void link_segments(void)
{
	struct report *r = &pcihole_report;
	u32 i;

	for (i = r->nregions; i-- > 0;) {
		u16 seg = r->regions[i].segment;

		segment_next[i] = segment_first[seg];
		segment_first[seg] = (u16)(i + 1);
	}
}

static int id_absent(u32 id)
{
	return id == 0xffffffffu || id == 0 || id == 0x0000ffffu || id == 0xffff0000u;
}

static u32 ecam_addr(int ri, u32 bus, u32 devfn)
{
	return (u32)pcihole_report.regions[ri].base + (bus << 20) + (devfn << 12);
}

/* The region of this segment that decodes this bus, or -1. */
static int region_of(u16 seg, u32 bus)
{
	struct report *r = &pcihole_report;
	u32 i;

	for (i = segment_first[seg]; i; i = segment_next[i - 1]) {
		struct region *g = &r->regions[i - 1];

		if (!(g->flags & REGION_SKIPPED) && g->start_bus <= bus && bus <= g->end_bus)
			return (int)(i - 1);
	}
	return -1;
}

static void mark_known(u16 seg, u32 bus)
{
	struct report *r = &pcihole_report;
	u32 i;

	for (i = segment_first[seg]; i; i = segment_next[i - 1]) {
		struct region *g = &r->regions[i - 1];

		if (g->start_bus <= bus && bus <= g->end_bus)
			known[i - 1][bus >> 5] |= 1u << (bus & 31);
	}
}

static int is_known(int ri, u32 bus)
{
	return (known[ri][bus >> 5] >> (bus & 31)) & 1;
}

/* only_one_child(): is this bridge a PCIe Root Port or Downstream Port? */
static int pcie_downstream_port(u32 cfg)
{
	int ttl = 48;
	u32 pos;

	if (!(cfg_read16(cfg + 0x06) & 0x10))	/* PCI_STATUS_CAP_LIST */
		return 0;
	pos = cfg_read8(cfg + 0x34);
	while (ttl--) {
		u16 ent;

		pos &= ~3u;
		if (pos < 0x40)
			break;
		ent = cfg_read16(cfg + pos);
		if ((ent & 0xff) == 0xff)
			break;
		if ((ent & 0xff) == 0x10) {	/* PCI_CAP_ID_EXP */
			u32 type = (cfg_read16(cfg + pos + 2) >> 4) & 0xf;

			return type == 0x4 || type == 0x6;	/* ROOT_PORT, DOWNSTREAM */
		}
		pos = ent >> 8;
	}
	return 0;
}

static void scan_bus(int ri, u32 bus, int one_child, u8 dflags)
{
	struct report *r = &pcihole_report;
	u16 seg = r->regions[ri].segment;
	u32 first = r->ndevices, last, dev, fn, i;

	mark_known(seg, bus);
	for (dev = 0; dev < (one_child ? 1u : 32u); dev++) {
		for (fn = 0; fn < 8; fn++) {
			u32 cfg = ecam_addr(ri, bus, dev << 3 | fn);
			u32 id = cfg_read32(cfg);
			u8 hdr;
			u32 cr;

			if (id_absent(id)) {
				if (!first_absent)
					first_absent = cfg;
				if (fn == 0)
					break;
				continue;
			}
			if (!first_present)
				first_present = cfg;
			hdr = cfg_read8(cfg + 0x0e);
			cr = cfg_read32(cfg + 0x08);
			if (r->ndevices < r->max_devices) {
				struct device *d = &devices[r->ndevices];

				d->segment = seg;
				d->bus = (u8)bus;
				d->devfn = (u8)(dev << 3 | fn);
				d->vendor = (u16)id;
				d->device = (u16)(id >> 16);
				d->class_rev = cr;
				d->header_type = hdr;
				d->flags = dflags;
				d->secondary = 0;
				d->subordinate = 0;
			} else {
				status |= ST_TRUNCATED;
			}
			r->ndevices++;
			if (fn == 0 && !(hdr & 0x80))
				break;
		}
	}

	/* Then the bridges of this bus, as pci_scan_child_bus_extend does. */
	last = r->ndevices < r->max_devices ? r->ndevices : r->max_devices;
	for (i = first; i < last; i++) {
		struct device *d = &devices[i];
		u32 cfg, buses, sec;
		int one, rj;

		if ((d->header_type & 0x7f) != 1)
			continue;
		cfg = ecam_addr(ri, bus, d->devfn);
		buses = cfg_read32(cfg + 0x18);	/* primary, secondary, subordinate */
		sec = (buses >> 8) & 0xff;
		d->secondary = (u8)sec;
		d->subordinate = (u8)(buses >> 16);
		one = pcie_downstream_port(cfg);
		if (one)
			d->flags |= DEV_ONE_CHILD;
		/* Bus numbers are not assigned here: an unconfigured bridge is left alone. */
		rj = region_of(seg, sec);
		if (sec == 0 || sec <= bus || rj < 0 || is_known(rj, sec)) {
			d->flags |= DEV_NOT_FOLLOWED;
			continue;
		}
		scan_bus(rj, sec, one, dflags);
	}
}

/* pcibios_scan_specific_bus(): 16-bit vendor reads, devfn step 8. */
static void peer_scan(int ri, u32 bus)
{
	u32 dev;

	for (dev = 0; dev < 32; dev++) {
		u16 v = cfg_read16(ecam_addr(ri, bus, dev << 3));

		if (v != 0 && v != 0xffff) {
			scan_bus(ri, bus, 0, DEV_PEER_SCAN);
			return;
		}
	}
}

static void scan_all(void)
{
	struct report *r = &pcihole_report;
	u32 i, bus;

	nreads = 0;
	r->ndevices = 0;
	/* Only the regions in use: 128 KiB for all 4096 would cost every scan. Device entries need no
	 * zeroing: scan_bus writes every field of each one it records. */
	memzero(known, r->nregions * sizeof(known[0]));
	/* Root buses first (one per region: its start bus), then peer buses. */
	for (i = 0; i < r->nregions; i++)
		if (!(r->regions[i].flags & REGION_SKIPPED) && !is_known((int)i, r->regions[i].start_bus))
			scan_bus((int)i, r->regions[i].start_bus, 0, 0);
	for (i = 0; i < r->nregions; i++) {
		if (r->regions[i].flags & REGION_SKIPPED)
			continue;
		for (bus = r->regions[i].start_bus; bus <= r->regions[i].end_bus; bus++)
			if (!is_known((int)i, bus))
				peer_scan((int)i, bus);
	}
}

/* ------------------------------------------------------------------ */
/* pcihole.exitloop=N: the cost of one config read                     */

/*
 * TSC ticks of n 4-byte loads of addr: the same movl as cfg_read32, in a
 * loop the compiler keeps (the asm is volatile), not counted in config_reads.
 */
static u64 time_reads(u32 addr, u32 n)
{
	u64 start = rdtsc();
	u32 v;

	while (n--)
		__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr));
	return rdtsc() - start;
}

static u64 exitloop_absent_tsc, exitloop_present_tsc, exitloop_ram_tsc;

static void run_exitloop(void)
{
	if (first_absent)
		exitloop_absent_tsc = time_reads(first_absent, opt_exitloop);
	if (first_present)
		exitloop_present_tsc = time_reads(first_present, opt_exitloop);
	exitloop_ram_tsc = time_reads((u32)&exitloop_ram_word, opt_exitloop);
}

/* An address of 0: the scan found no such function, and its loop did not run. */
static void print_exitloop(void)
{
	puts("pcihole-scan: exitloop reads=");
	putdec(opt_exitloop);
	puts(" absent=0x");
	puthex(first_absent, 8);
	puts(" absent_tsc=0x");
	puthex(exitloop_absent_tsc, 16);
	puts(" present=0x");
	puthex(first_present, 8);
	puts(" present_tsc=0x");
	puthex(exitloop_present_tsc, 16);
	puts(" ram_tsc=0x");
	puthex(exitloop_ram_tsc, 16);
	putc('\n');
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static void print_report(void)
{
	struct report *r = &pcihole_report;
	u32 i, n;

	if (!opt_quiet) {
		for (i = 0; i < r->nregions; i++) {
			struct region *g = &r->regions[i];

			puts("pcihole-scan: ecam ");
			puthex(g->segment, 4);
			puts(" base=0x");
			puthex(g->base, 16);
			puts(" buses=");
			puthex(g->start_bus, 2);
			putc('-');
			puthex(g->end_bus, 2);
			puts(g->source == SRC_MCFG ? " source=mcfg" : " source=cmdline");
			puts(g->flags & REGION_SKIPPED ? " skipped\n" : "\n");
		}
		n = r->ndevices < r->max_devices ? r->ndevices : r->max_devices;
		for (i = 0; i < n; i++) {
			struct device *d = &devices[i];

			puts("pcihole-scan: ");
			puthex(d->segment, 4);
			putc(':');
			puthex(d->bus, 2);
			putc(':');
			puthex(d->devfn >> 3, 2);
			putc('.');
			puthex(d->devfn & 7, 1);
			putc(' ');
			puthex(d->vendor, 4);
			putc(':');
			puthex(d->device, 4);
			puts(" class ");
			puthex(d->class_rev >> 8, 6);
			puts(" rev ");
			puthex(d->class_rev & 0xff, 2);
			puts(" hdr ");
			puthex(d->header_type, 2);
			putc('\n');
		}
	}
	/* Printed even when quiet (it was asked for), just before the done line, which stays last. */
	if (opt_exitloop)
		print_exitloop();
	puts("pcihole-scan: done devices=");
	putdec(r->ndevices);
	puts(" config_reads=");
	putdec(r->config_reads);
	puts(" status=0x");
	puthex(r->status, 2);
	puts(" scans=");
	putdec(r->scans);
	if (opt_timing) {
		puts(" scan_tsc=0x");
		puthex(pcihole_timing.scan_tsc, 16);
	}
	putc('\n');
}

/* ------------------------------------------------------------------ */

#define HVM_START_MAGIC 0x336ec578u

u32 pcihole_main(u32 start_info)
{
	struct report *r = &pcihole_report;
	u64 rsdp_hint = 0, tsc_start;
	u32 n;

	r->magic = REPORT_MAGIC;
	r->version = REPORT_VERSION;
	r->header_size = (u16)__builtin_offsetof(struct report, regions);
	r->max_regions = MAX_REGIONS;
	r->max_devices = DEFAULT_MAX_DEVICES;
	r->devices_paddr = (u32)default_devices;
	r->state = STATE_RUNNING;

	if (start_info && rd32(start_info) == HVM_START_MAGIC) {
		u64 cmdline = rd64(start_info + 24);

		rsdp_hint = rd64(start_info + 32);
		if (cmdline && cmdline < 0x100000000ull)
			parse_cmdline((const char *)(u32)cmdline);
	} else {
		status |= ST_BAD_START_INFO;
	}

	if (opt_max_devices) {
		devices = (struct device *)(u32)opt_devices_paddr;
		r->devices_paddr = (u32)opt_devices_paddr;
		r->max_devices = (u32)opt_max_devices;
	}

	/* pcihole.ecam= replaces the firmware's description; ACPI is not read then. */
	if (!r->nregions)
		acpi_find_ecam(rsdp_hint);
	for (n = 0; n < r->nregions; n++)
		if (!(r->regions[n].flags & REGION_SKIPPED))
			break;
	if (n == r->nregions)
		status |= ST_NO_ECAM;
	link_segments();

	tsc_start = rdtsc();
	for (n = 0; n < opt_repeat; n++) {
		scan_all();
		r->total_config_reads += nreads;
	}
	pcihole_timing.scan_tsc = rdtsc() - tsc_start;
	/* After the timed scan, before any serial output. */
	if (opt_exitloop)
		run_exitloop();
	pcihole_timing.version = TIMING_VERSION;
	pcihole_timing.magic = TIMING_MAGIC;
	r->config_reads = nreads;
	r->scans = opt_repeat;
	r->status = status;
	r->state = STATE_DONE;
	print_report();
	return status & 0xff;
}
