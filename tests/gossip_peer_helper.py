"""``python -m tests.gossip_peer_helper --hold-after R PEER_ARGS...``: a real
``fedloom peer`` that stops after recording round R and waits to be killed.

The kill drill needs a peer that dies *mid-run* whatever the machine's speed: held
after round R, it is still alive (its neighbours' pings succeed, they wait for its next
model), and the test kills it on the "holding" line, so the others always have rounds
left to run without it. The real command has no such knob on purpose.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from fedloom.cli.common import make_console, setup_logging
from fedloom.cli.main import _parser
from fedloom.cli.peer import cmd_peer


def main(argv: list[str]) -> int:
    if argv[:1] != ["--hold-after"] or len(argv) < 2:
        raise SystemExit("usage: --hold-after ROUND PEER_ARGS...")
    hold_after = int(argv[1])
    args = _parser().parse_args(["peer", *argv[2:]])
    setup_logging(args.verbose)

    def hold(record: dict[str, Any]) -> None:
        if record["round"] >= hold_after:
            print(f"holding after round {record['round']}", flush=True)
            threading.Event().wait()

    return cmd_peer(args, make_console(), on_round=hold)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
