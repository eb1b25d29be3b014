"""``python -m fedloom.cli``: the ``fedloom`` command."""

import sys

import fedloom.cli

sys.exit(fedloom.cli.main())
