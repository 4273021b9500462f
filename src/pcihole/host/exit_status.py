"""The process exit statuses of every pcihole command (README.md "## Errors").

Defined here, below every layer, so that the command line (cli.py) and `pcihole bench`
(bench/runner.py), which returns its own status, name the same numbers.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the guest or the host failed
EXIT_USAGE = 2  # bad input, found before any guest runs
#: A signal ends a command with 128 + its number (130 SIGINT, 143 SIGTERM), as a shell reports it.
EXIT_SIGNAL_BASE = 128
