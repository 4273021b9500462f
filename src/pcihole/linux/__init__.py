"""Booting an unmodified Linux kernel: the Debian cloud kernel and busybox fetched from apt (no host
install), pcihole's initramfs, the kernel command line, and what Linux's PCI core printed.

This package sits beside guest/ (above boot/, below machine/): the CLI and the bench import it, it
never imports the machine.
"""
