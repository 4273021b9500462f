"""`pcihole bench`: the hole strategies side by side on this machine, measured in one run.

`runner.run_bench` drives it: the default machine's scan per backend x strategy (scan.py) with QEMU
as a peer (qemu_peer.py), scaling with the ECAM size and the number of functions (scaling.py), the cost
of a hot-plug change (hotplug.py) and of one exit through pcihole against a bare KVM_RUN loop
(exit_path.py); then JSON, a markdown table (report.py) and PNG plots (plots.py).

Every scan is timed by the guest itself (TSC ticks around the scan, `pcihole.timing`), converted with
the host's TSC frequency (tsc.py), so pcihole and QEMU rows use one clock and one method. Compare rows
by the ratios and the exit counts: on a software KVM absolute times say little.
"""
