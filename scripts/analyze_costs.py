#!/usr/bin/env python3
"""Cost reports from the proxy's JSONL log: ``python -m proxy report`` under this name.
See ``--help``; the command is proxy/cli/report.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from proxy.bootstrap import ensure_dependencies  # noqa: E402

ensure_dependencies()  # with a Python that lacks them, re-run with ./.venv's

from proxy.cli.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="analyze_costs.py"))
