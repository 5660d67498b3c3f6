"""Helpers shared by the tests and bench/: free ports, the mock upstream, the synthetic
cost log, the proxy run as a process, file-system faults."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
