"""Test harness: one QEMU process with QMP on a unix socket and the serial port in a file, shared by
the scan-guest checks (tests/guest/guest_qemu.py) and the Linux boots (tests/linux/linux_qemu_boot.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64")


class QemuProcess:
    """`qemu-system-x86_64 ARGS -qmp unix:... -serial file:...`, connected to its QMP monitor."""

    def __init__(self, args: list[str], *, prefix: str = "phq"):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))  # short: unix socket paths are limited to 108 bytes
        self.sock_path = self.dir / "qmp.sock"
        self.serial_path = self.dir / "serial.txt"
        command = [
            QEMU or "qemu-system-x86_64",
            *args,
            "-qmp", f"unix:{self.sock_path},server=on,wait=off",
            "-serial", f"file:{self.serial_path}",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        # QEMU creates the socket file at bind(), before it listens on it: retry a refused connect
        # until it listens (a connect as soon as the file existed was refused now and then under load).
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(
                    f"QEMU did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            try:
                self.sock.connect(str(self.sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                time.sleep(0.02)
        self.f = self.sock.makefile("rw")
        assert "QMP" in json.loads(self.f.readline())
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments):
        self.f.write(
            json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}) + "\n"
        )
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def serial(self) -> str:
        return self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""

    def close(self):
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self.qmp("quit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
