"""The command line, on click: ``python -m proxy`` (and the ``llm-cost-proxy`` console
script) serves; ``python -m proxy COMMAND`` runs a tool.

* ``app``: the root group, its lazily loaded subcommands, ``--version`` and ``main``.
* ``base``: the click classes and the exit policy (one ``error:`` line and status 2 for a
  user error, a closed pipe taken quietly).
* ``options``: the options several commands share, defined once.
* one module per command: ``serve``, ``report``, ``keys``, ``budgets``, ``pricing``, ``reprice``.
"""

from proxy.cli.app import main

__all__ = ["main"]
