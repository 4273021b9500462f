"""The one error a benchmark step raises when what it measured cannot be trusted."""


class BenchError(RuntimeError):
    """A measurement failed (a guest that did not finish its scan, a peer that did not start...)."""
