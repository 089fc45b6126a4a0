"""rbees: llama-orch in Python."""

__version__ = "0.1.0"
