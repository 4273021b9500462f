"""Booting an unmodified Linux kernel: the Debian cloud kernel and busybox fetched from apt (no host
install), pcihole's initramfs, the kernel command line, and what Linux's PCI core printed.

This package sits beside guest/ (above boot/, below machine/): the CLI and the bench import it, it
never imports the machine.
"""

#: The RAM a Linux boot gets at least: the Debian cloud kernel runs out of memory with 64 MiB (the
#: default machine's; it dies in its tracefs initcalls, before /init) and boots with 128 MiB; 256 MiB
#: is what the QEMU peer boots use too.
MIN_RAM_MIB = 256
