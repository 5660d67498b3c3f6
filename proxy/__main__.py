"""``python -m proxy``: the command line (proxy.cli), serving by default."""

from proxy.cli import main

raise SystemExit(main())
