"""The dashboard's web server: a read-only Starlette app, served by uvicorn in a thread.

Routes (all GET): ``/`` the page, ``/static/<file>`` its script and style (shipped in
the package: the page loads nothing from the internet), ``/api/snapshot`` every run's
snapshot as JSON, and ``/events``, a server-sent-event stream that pushes the snapshot
whenever it changes (the page updates without reloading).

Access: on a loopback address without a token, only requests whose ``Host`` is a
loopback name are served (a web page elsewhere cannot reach the dashboard through DNS
rebinding). Any other address needs a token; a request must carry it as
``Authorization: Bearer``, as ``?token=`` (the page then sets an HttpOnly cookie, so its
script, style and event stream need no token in their URLs) or as that cookie; anything
else gets 401. Tokens are compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fedloom.config import ConfigError
from fedloom.dashboard.data import RunView

__all__ = [
    "TOKEN_ENV",
    "DashboardServer",
    "Snapshots",
    "check_dashboard_address",
    "create_app",
    "is_loopback",
    "read_token",
]

log = logging.getLogger("fedloom.dashboard")

#: Environment variable holding the dashboard's access token (else ``--...token-file``).
TOKEN_ENV = "FEDLOOM_DASHBOARD_TOKEN"
COOKIE = "fedloom_dashboard"
MIN_TOKEN_CHARS = 16
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def is_loopback(host: str) -> bool:
    """Whether a host name or IP is loopback (parsed as an IP, never matched by prefix)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); one line if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"dashboard address '{address}' is not HOST:PORT (e.g. 127.0.0.1:8050)")
    return host.strip("[]"), int(port)


def read_token(token_file: Path | None) -> str | None:
    """The access token: from ``token_file``, else ``$FEDLOOM_DASHBOARD_TOKEN``, else None."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the dashboard token file '{token_file}' ({err.strerror})"
            ) from None
        if not token:
            raise ConfigError(f"the dashboard token file '{token_file}' is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the dashboard token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "random ones (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    return token


def check_dashboard_address(address: str, token: str | None) -> tuple[str, int]:
    """Refuse to serve off loopback without a token (one line); (host, port) to bind."""
    host, port = split_address(address)
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"the dashboard address {address} is not loopback: give it a token with "
            f"--dashboard-token-file FILE (or {TOKEN_ENV}), or bind 127.0.0.1"
        )
    return host, port


class Snapshots:
    """Every run's snapshot, recomputed at most once per ``interval_s`` however many pages
    are open, so the cost to the run does not grow with the number of viewers."""

    def __init__(self, views: Sequence[RunView], interval_s: float = 1.0) -> None:
        self.views = list(views)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._text = ""

    def text(self) -> str:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.interval_s:
                runs = [view.snapshot() for view in self.views]
                self._text = json.dumps({"runs": runs}, separators=(",", ":"), allow_nan=False)
                self._at = now
            return self._text

    def close(self) -> None:
        with self._lock:
            for view in self.views:
                view.close()


def _static(name: str) -> bytes:
    return resources.files("fedloom.dashboard").joinpath("static", name).read_bytes()


def create_app(
    snapshots: Snapshots,
    *,
    token: str | None,
    loopback: bool,
    closing: threading.Event,
) -> Any:
    """The Starlette app. ``closing`` ends every open event stream (server shutdown)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    def refusal(request: Request) -> Response | None:
        if token is None:
            host = request.headers.get("host", "").rsplit(":", 1)[0]
            if not loopback or host in _LOOPBACK_NAMES:
                return None
            return PlainTextResponse(
                "403: a loopback dashboard answers only requests for a loopback host name",
                status_code=403,
                headers=_SECURITY_HEADERS,
            )
        if allowed(request):
            return None
        return PlainTextResponse(
            "401: this dashboard needs its token (?token=...)",
            status_code=401,
            headers=_SECURITY_HEADERS,
        )

    def allowed(request: Request) -> bool:
        assert token is not None
        offered = [
            request.query_params.get("token", ""),
            request.cookies.get(COOKIE, ""),
            request.headers.get("authorization", "").removeprefix("Bearer ").strip(),
        ]
        return any(hmac.compare_digest(t.encode(), token.encode()) for t in offered if t)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            refused = refusal(request)
            if refused is not None:
                return refused
            response = await handler(request)
            response.headers.update(_SECURITY_HEADERS)
            if token is not None and request.query_params.get("token"):
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response

        return wrapped

    async def page(request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return PlainTextResponse("not found", status_code=404)
        return Response(_static(name), media_type=STATIC_FILES[name])

    async def snapshot(request: Request) -> Response:
        text = await asyncio.to_thread(snapshots.text)
        return Response(text, media_type="application/json")

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            sent = ""
            idle = 0.0
            yield "retry: 2000\n\n"
            while not closing.is_set():
                text = await asyncio.to_thread(snapshots.text)
                if text != sent:
                    sent, idle = text, 0.0
                    yield f"data: {text}\n\n"
                elif idle >= 15.0:  # a comment keeps proxies from closing a quiet stream
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(snapshots.interval_s)
                idle += snapshots.interval_s

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    return Starlette(
        routes=[
            Route("/", guarded(page)),
            Route("/static/{name}", guarded(static)),
            Route("/api/snapshot", guarded(snapshot)),
            Route("/events", guarded(events)),
        ]
    )


class DashboardServer:
    """The dashboard on ``address``, served by uvicorn in a daemon thread of this process.

    The socket is bound in the constructor, so a taken port or a bad address fails at
    once with one line (uvicorn would log it in its thread and exit). :meth:`stop` ends
    the event streams and the server and joins the thread.
    """

    def __init__(
        self,
        views: Sequence[RunView],
        address: str,
        *,
        token: str | None,
        interval_s: float = 1.0,
    ) -> None:
        import uvicorn

        host, port = check_dashboard_address(address, token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            raise ConfigError(
                f"the dashboard cannot listen on {address} ({err.strerror}); "
                "choose another --address/--dashboard port (0: any free)"
            ) from None
        self.sock.listen(64)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.token = token
        self.closing = threading.Event()
        self.snapshots = Snapshots(views, interval_s)
        app = create_app(
            self.snapshots, token=token, loopback=is_loopback(host), closing=self.closing
        )
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            log_level="warning",
            ws="none",  # no websocket routes: do not load a websocket stack at all
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            daemon=True,
            name="fedloom-dashboard",
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        """End the streams, stop serving, join the thread; idempotent."""
        self.closing.set()
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.sock.close()
        self.snapshots.close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
