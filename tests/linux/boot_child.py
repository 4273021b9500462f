"""One Linux boot in a process of its own, for the suite's background boots (tests/linux/boot_pool.py).

    python -m tests.linux.boot_child machine MACHINE BACKEND STRATEGY UNTIL KERNEL INITRD CONSOLE RESULT
    python -m tests.linux.boot_child cli ARGS...

`machine` boots the Debian kernel on MACHINE ("default" or a machine file) through the library, as
the tests did in their own process: the console goes to the CONSOLE file as it comes (so a failing
or killed boot still shows its tail) and the RunResult, with the process's CPU time, is pickled to
RESULT. UNTIL is the console line that ends the run ("" for /init's power-off). `cli` runs
`pcihole ARGS...` (pcihole.cli.main), for the tests of the command line itself.

Either way the process first asks the kernel to kill it when the thread that started it ends
(PR_SET_PDEATHSIG): a suite killed outright leaves no guest running.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import resource
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

#: <linux/prctl.h>
PR_SET_PDEATHSIG = 1
#: The default machine's 64 MiB cannot hold a distribution kernel.
RAM_MIB = 512
#: The kernel's time on a software KVM is minutes (measured here: PCI at ~200 s, kernel init done at ~600 s,
#: idle host); sharing two cores with the rest of the suite, a boot can take twice that.
BOOT_TIMEOUT = 2400
#: Below the suite's own process, which runs the other tests meanwhile (their guests have timeouts too).
NICENESS = 5
CMDLINE = "console=ttyS0 panic=-1"


@dataclass
class BootRecord:
    """What a `machine` boot pickles: the run and what it cost this process."""

    result: object  # pcihole.machine.machine.RunResult
    user_seconds: float
    system_seconds: float


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent was gone before the request took effect
        os._exit(1)


def boot_machine(
    machine: str,
    backend: str,
    strategy: str,
    until: str,
    kernel: str,
    initrd: str,
    console: str,
    result_path: str,
) -> int:
    from pcihole.machine.builder import build_machine
    from pcihole.machine.machinefile import load, load_default

    spec = replace(load_default() if machine == "default" else load(Path(machine)), ram_mib=RAM_MIB)
    with open(console, "wb", buffering=0) as out:
        built = build_machine(
            spec,
            backend=backend,
            strategy=strategy,
            kernel=Path(kernel).read_bytes(),
            kernel_name=kernel,
            cmdline=CMDLINE,
            serial_sink=out.write,
            initrd=Path(initrd).read_bytes(),
            quirk_kernel_args=True,
        )
        with built:
            result = built.run(timeout=BOOT_TIMEOUT, until_serial=until or None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # Run as `-m`, this module is __main__: pickle the class under the name the suite imports it by.
    from tests.linux.boot_child import BootRecord as Record

    record = Record(result, usage.ru_utime, usage.ru_stime)
    partial = f"{result_path}.partial"
    with open(partial, "wb") as f:
        pickle.dump(record, f)
    os.replace(partial, result_path)
    return 0


def main(argv: list[str]) -> int:
    die_with_parent(int(os.environ["PCIHOLE_TEST_PARENT"]))
    os.nice(NICENESS)
    if argv[0] == "machine":
        return boot_machine(*argv[1:])
    if argv[0] == "cli":
        from pcihole.cli import main as pcihole_main

        return pcihole_main(argv[1:])
    raise SystemExit(f"boot_child: unknown kind {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
