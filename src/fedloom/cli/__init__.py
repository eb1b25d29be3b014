"""The ``fedloom`` command (console script ``fedloom.cli:main``).

:mod:`~fedloom.cli.main` parses the arguments and dispatches to one module per command
family: :mod:`~fedloom.cli.run` (run, centralized, report), :mod:`~fedloom.cli.deploy`
(server, client, certs, token) and :mod:`~fedloom.cli.leakage`; their shared helpers are
in :mod:`~fedloom.cli.common`.
"""

from fedloom.cli.main import main

__all__ = ["main"]
