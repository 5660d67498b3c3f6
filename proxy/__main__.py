"""``python -m proxy``: the command line (proxy.cli), serving by default."""

from proxy.bootstrap import ensure_dependencies

ensure_dependencies()  # with a Python that lacks them, re-run with ./.venv's

from proxy.cli import main  # noqa: E402

raise SystemExit(main())
