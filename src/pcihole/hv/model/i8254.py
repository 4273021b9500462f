"""`Pit`: KVM's in-kernel 8254 (arch/x86/kvm/i8254.c, after QEMU's hw/timer/i8254.c), KVM_CREATE_PIT2.

Ports 0x40-0x43 on KVM_PIO_BUS: three counters at 1.193182 MHz and the mode / command register
(counter select, latch, read-back, access LSB / MSB / word, modes 0-5). Counts are computed from
the host's monotonic clock since the count was loaded (pit_get_count, pit_get_out), so reading
them needs no timer. Counter 0 drives GSI 0 (kvm_set_irq with the PIT's own source id, 1 then 0:
an edge) from a host timer: one-shot in modes 0, 1 and 4, periodic in modes 2 and 3, no faster
than min_timer_period_us (create_pit_timer). With the default reinjection, a tick is sent only
once the previous one was acknowledged (EOI at the PIC or IOAPIC: kvm_pit_ack_irq) and missed
ticks are counted and sent after (pit_do_work); unmasking GSI 0 forgets them (pit_mask_notifer).

With KVM_PIT_SPEAKER_DUMMY port 0x61 is in-kernel too (speaker_ioport_read / _write): bit 0 the
gate of counter 2, bit 1 speaker data, bit 4 the refresh clock toggling every 2^14 ns, bit 5 the
output of counter 2 — what Linux's PIT calibration (pit_calibrate_tsc, pit_hpet_ptimer_calibrate_cpu)
polls.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pcihole.hv.model.host_timer import HostTimer
from pcihole.hv.model.io_bus import PortRange
from pcihole.hv.model.lapic import MIN_TIMER_PERIOD_NS

if TYPE_CHECKING:
    from pcihole.hv.model.irqchip import Irqchip

KVM_PIT_BASE_ADDRESS = 0x40
KVM_PIT_MEM_LENGTH = 4
KVM_SPEAKER_BASE_ADDRESS = 0x61
KVM_SPEAKER_LENGTH = 4
KVM_PIT_FREQ = 1193182
KVM_PIT_SPEAKER_DUMMY = 1
PIT_GSI = 0
NS_PER_S = 1_000_000_000

RW_STATE_LSB = 1
RW_STATE_MSB = 2
RW_STATE_WORD0 = 3
RW_STATE_WORD1 = 4


class Channel:
    """struct kvm_kpit_channel_state."""

    def __init__(self, gate: int) -> None:
        self.count = 0x10000
        self.latched_count = 0
        self.count_latched = 0
        self.status_latched = 0
        self.status = 0
        self.read_state = 0
        self.write_state = 0
        self.write_latch = 0
        self.rw_mode = 0
        self.mode = 0xFF  # kvm_pit_reset
        self.bcd = 0
        self.gate = gate
        self.count_load_time = time.monotonic_ns()


def _answer(value: int, length: int) -> bytes:
    """pit_ioport_read / speaker_ioport_read: the low bytes of a u32, at most 4 of them
    ("if (len > sizeof(ret)) len = sizeof(ret); memcpy(data, (char *)&ret, len)"), zeros after."""
    return (value & 0xFFFFFFFF).to_bytes(4, "little")[:length].ljust(length, b"\0")


class Pit:
    def __init__(self, irqchip: Irqchip, flags: int) -> None:
        self.irqchip = irqchip
        self.flags = flags
        self.channels = [Channel(gate=int(i != 2)) for i in range(3)]
        self.speaker_data_on = False
        self.irq_source_id = irqchip.request_irq_source_id()
        self.timer = HostTimer("pit-timer", self._timer_expired)
        self.period_ns = 0
        self.is_periodic = False
        self.target_ns = 0
        # reinjection (kvm_pit_set_reinject(pit, true) at creation)
        self.reinject = True
        self.pending = 0
        self.irq_ack = True
        #: Ticks sent on GSI 0 (tests and statistics).
        self.ticks = 0
        irqchip.register_ack_notifier(PIT_GSI, self._ack_irq)
        irqchip.register_mask_notifier(PIT_GSI, self._mask_notifier)
        #: The PIO devices kvm_create_pit registers: dev (ports 0x40-0x43) and, with
        #: KVM_PIT_SPEAKER_DUMMY, speaker_dev (port 0x61 only: speaker_ioport_read's check).
        self.ports = PortRange(KVM_PIT_BASE_ADDRESS, KVM_PIT_MEM_LENGTH, self.read, self.write)
        self.speaker = (
            PortRange(KVM_SPEAKER_BASE_ADDRESS, 1, self.speaker_read, self.speaker_write)
            if flags & KVM_PIT_SPEAKER_DUMMY
            else None
        )

    # --- counting (pit_get_count / pit_get_out) -------------------------------------------------

    def _elapsed_ticks(self, channel: int) -> int:
        c = self.channels[channel]
        t = time.monotonic_ns() - c.count_load_time
        return t * KVM_PIT_FREQ // NS_PER_S

    def get_count(self, channel: int) -> int:
        c = self.channels[channel]
        d = self._elapsed_ticks(channel)
        if c.mode in (0, 1, 4, 5):
            return (c.count - d) & 0xFFFF
        if c.mode == 3:
            return c.count - (2 * d) % c.count
        return c.count - d % c.count

    def get_out(self, channel: int) -> int:
        c = self.channels[channel]
        d = self._elapsed_ticks(channel)
        if c.mode == 1:
            return int(d < c.count)
        if c.mode == 2:
            return int(d % c.count == 0 and d != 0)
        if c.mode == 3:
            return int(d % c.count < (c.count + 1) >> 1)
        if c.mode in (4, 5):
            return int(d == c.count)
        return int(d >= c.count)  # mode 0 (and the reset mode 0xff)

    def _latch_count(self, channel: int) -> None:
        c = self.channels[channel]
        if not c.count_latched:
            c.latched_count = self.get_count(channel)
            c.count_latched = c.rw_mode

    def _latch_status(self, channel: int) -> None:
        c = self.channels[channel]
        if not c.status_latched:
            c.status = self.get_out(channel) << 7 | c.rw_mode << 4 | c.mode << 1 | c.bcd
            c.status_latched = 1

    def _set_gate(self, channel: int, val: int) -> None:
        """pit_set_gate: modes 1, 2, 3 and 5 restart counting on a rising edge."""
        c = self.channels[channel]
        if c.mode in (1, 2, 3, 5) and c.gate < val:
            c.count_load_time = time.monotonic_ns()
        c.gate = val

    def _load_count(self, channel: int, val: int) -> None:
        """pit_load_count: 0 means 0x10000; counter 0 (re)starts the timer behind GSI 0."""
        if val == 0:
            val = 0x10000
        c = self.channels[channel]
        c.count = val
        c.count_load_time = time.monotonic_ns()
        if channel != 0:
            return
        if c.mode in (0, 1, 4):
            self._create_timer(val, periodic=False)
        elif c.mode in (2, 3):
            self._create_timer(val, periodic=True)
        else:
            self.timer.cancel()

    def _create_timer(self, val: int, *, periodic: bool) -> None:
        """create_pit_timer."""
        interval = val * NS_PER_S // KVM_PIT_FREQ
        self.timer.cancel()
        self.period_ns = interval
        self.is_periodic = periodic
        self.pending = 0
        self.irq_ack = True
        if periodic and self.period_ns < MIN_TIMER_PERIOD_NS:
            self.period_ns = MIN_TIMER_PERIOD_NS
        self.target_ns = time.monotonic_ns() + interval
        self.timer.start(self.target_ns)

    # --- GSI 0 (pit_timer_fn, pit_do_work, kvm_pit_ack_irq) ---------------------------------------

    def _timer_expired(self) -> int | None:
        with self.irqchip.locked():
            if self.irqchip.closed:
                return None
            if self.reinject:
                self.pending += 1
            self._do_work()
            if self.is_periodic:
                self.target_ns += self.period_ns
                return self.target_ns
            return None

    def _do_work(self) -> None:
        """pit_do_work: with reinjection, wait for the previous tick's acknowledgment."""
        if self.reinject:
            if not self.irq_ack:
                return
            self.irq_ack = False
        self.ticks += 1
        self.irqchip.set_irq(self.irq_source_id, PIT_GSI, True)
        self.irqchip.set_irq(self.irq_source_id, PIT_GSI, False)

    def _ack_irq(self) -> None:
        """kvm_pit_ack_irq: the guest acknowledged a tick; send one that was held back."""
        if not self.reinject:
            return
        self.irq_ack = True
        if self.pending > 0:
            self.pending -= 1
            if self.pending > 0:
                self._do_work()

    def _mask_notifier(self, masked: bool) -> None:
        """pit_mask_notifer: unmasking forgets the ticks missed while masked (kvm_pit_reset_reinject)."""
        if not masked:
            self.pending = 0
            self.irq_ack = True

    # --- ports 0x40-0x43 (pit_ioport_read / pit_ioport_write) ---------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        with self.irqchip.locked():
            channel = addr & 3
            if channel == 3:
                return bytes(length)  # the command register reads nothing (0)
            c = self.channels[channel]
            if c.status_latched:
                c.status_latched = 0
                ret = c.status
            elif c.count_latched:
                if c.count_latched == RW_STATE_MSB:
                    ret = c.latched_count >> 8
                    c.count_latched = 0
                elif c.count_latched == RW_STATE_WORD0:
                    ret = c.latched_count & 0xFF
                    c.count_latched = RW_STATE_MSB
                else:
                    ret = c.latched_count & 0xFF
                    c.count_latched = 0
            else:
                count = self.get_count(channel)
                if c.read_state == RW_STATE_MSB:
                    ret = (count >> 8) & 0xFF
                elif c.read_state == RW_STATE_WORD0:
                    ret = count & 0xFF
                    c.read_state = RW_STATE_WORD1
                elif c.read_state == RW_STATE_WORD1:
                    ret = (count >> 8) & 0xFF
                    c.read_state = RW_STATE_WORD0
                else:
                    ret = count & 0xFF
            return _answer(ret, length)

    def write(self, addr: int, data: bytes) -> bool:
        val = int.from_bytes(data, "little")
        with self.irqchip.locked():
            channel = addr & 3
            if channel == 3:
                selected = val >> 6 & 3
                if selected == 3:  # read-back command
                    for ch in range(3):
                        if val & (2 << ch):
                            if not val & 0x20:
                                self._latch_count(ch)
                            if not val & 0x10:
                                self._latch_status(ch)
                    return True
                c = self.channels[selected]
                access = (val >> 4) & 3
                if access == 0:
                    self._latch_count(selected)
                else:
                    c.rw_mode = c.read_state = c.write_state = access
                    c.mode = (val >> 1) & 7
                    if c.mode > 5:
                        c.mode -= 4
                    c.bcd = val & 1
                return True
            c = self.channels[channel]
            val &= 0xFF
            if c.write_state == RW_STATE_MSB:
                self._load_count(channel, val << 8)
            elif c.write_state == RW_STATE_WORD0:
                c.write_latch = val
                c.write_state = RW_STATE_WORD1
            elif c.write_state == RW_STATE_WORD1:
                self._load_count(channel, c.write_latch | val << 8)
                c.write_state = RW_STATE_WORD0
            else:
                self._load_count(channel, val)
            return True

    # --- port 0x61 (speaker_ioport_read / speaker_ioport_write) -------------------------------------

    def speaker_read(self, addr: int, length: int) -> bytes:
        with self.irqchip.locked():
            refresh_clock = (time.monotonic_ns() >> 14) & 1
            ret = (
                int(self.speaker_data_on) << 1
                | self.channels[2].gate
                | self.get_out(2) << 5
                | refresh_clock << 4
            )
            return _answer(ret, length)

    def speaker_write(self, addr: int, data: bytes) -> bool:
        val = int.from_bytes(data, "little")
        with self.irqchip.locked():
            self.speaker_data_on = bool(val & 2)
            self._set_gate(2, val & 1)
            return True
