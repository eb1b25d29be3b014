"""``fedloom dashboard RUN_DIR ...`` and the dashboard of ``fedloom server --dashboard``.

Both serve :mod:`fedloom.dashboard` from a thread of this process. The server's
dashboard also shows the deployment's per-client statuses, read through the seam
``run_server(on_registry=...)`` → ``Registry.status_snapshot()``; the rounds never call it.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedloom.config import ConfigError
from fedloom.store import DB_FILE

if TYPE_CHECKING:
    from fedloom.dashboard.app import DashboardServer

DEFAULT_ADDRESS = "127.0.0.1:8050"


def add_dashboard_parser(sub: Any) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve a live web page for finished and running runs (side by side)",
        description="Serve a read-only page that follows the given run directories live: "
        "rounds and ETA, accuracy and loss curves, privacy spent, traffic, clients, "
        "failures. Binds 127.0.0.1 unless given a token.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"HOST:PORT (default {DEFAULT_ADDRESS})"
    )
    add_token_argument(p, "--token-file")


def add_token_argument(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        flag,
        dest="dashboard_token_file",
        type=Path,
        metavar="FILE",
        help="the dashboard's access token (else $FEDLOOM_DASHBOARD_TOKEN); required to "
        "bind an address other than loopback",
    )


def _missing_package() -> str | None:
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def make_dashboard(
    run_dirs: list[Path],
    address: str,
    token_file: Path | None,
    live: Any = None,
) -> DashboardServer:
    """A started dashboard server (one line on stdout says where), or a ConfigError."""
    missing = _missing_package()
    if missing is not None:
        raise ConfigError(
            f"the dashboard needs the package '{missing}': pip install 'fedloom[dashboard]'"
        )
    from fedloom.dashboard import app
    from fedloom.dashboard.data import RunView

    token = app.read_token(token_file)
    views = [
        RunView(path, key=str(i), live=live if i == 0 else None) for i, path in enumerate(run_dirs)
    ]
    server = app.DashboardServer(views, address, token=token).start()
    hint = " (add ?token=YOUR_TOKEN)" if token is not None else ""
    print(f"fedloom dashboard at {server.url}{hint}", flush=True)
    return server


def cmd_dashboard(args: argparse.Namespace) -> int:
    for path in args.run_dirs:
        if not (path / DB_FILE).is_file():
            raise ConfigError(f"{path} is not a fedloom run directory (no {DB_FILE})")
    server = make_dashboard(list(args.run_dirs), args.address, args.dashboard_token_file)
    try:
        threading.Event().wait()  # until Ctrl-C / SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


class ServerDashboard:
    """``fedloom server --dashboard``: started before the run, stopped after it.

    The deployment's registry arrives through ``on_registry`` once the gRPC server
    listens; until then the page shows the run without live client statuses.
    """

    def __init__(self, out_dir: Path, address: str, token_file: Path | None) -> None:
        self._status: Any = None
        self.server = make_dashboard([out_dir], address, token_file, live=self._live)

    def _live(self) -> list[dict[str, Any]]:
        status = self._status
        return [asdict(s) for s in status()] if status is not None else []

    def on_registry(self, registry: Any) -> None:
        self._status = registry.status_snapshot

    def stop(self) -> None:
        self.server.stop()
