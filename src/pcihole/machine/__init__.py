"""The machine: its description (machine files), and what builds and runs a VM from it."""
