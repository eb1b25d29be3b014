"""The gRPC server's event loop: long polls that hold no thread.

A deployed client keeps one PullTask call open almost all the time (the long poll that
hands it its next task). On gRPC's threaded server each open call holds a worker thread,
so a server of N clients needed N threads (about 8 MiB of address space and a scheduler
entry each) just to wait. This server runs on ``grpc.aio``: waiting calls are coroutines
on one event loop, and the handlers that compute (registration, heartbeats, reading and
checking a result) still run as ordinary functions on a bounded thread pool, so their
code and their locks are the same as before. Only the long poll is a coroutine.

Three small pieces make that work:

* :class:`TaskMailbox`: a session's queue of tasks. The round loop (a thread) puts; the
  long poll (a coroutine) awaits; :meth:`TaskMailbox.put` wakes it across threads.
* :class:`BlockingReader`: a call's incoming message stream, read from a worker thread,
  with every wait bounded by the idle-stream timeout. A client that opens a result
  stream and stops sending so loses its call after that bound, and the thread is free.
* :class:`AioServer`: the loop's thread, the ``grpc.aio`` server on it, and a ``stop``
  that returns an event like the threaded server's did.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from typing import Any, Generic, TypeVar

import grpc

T = TypeVar("T")


class TaskMailbox(Generic[T]):
    """Items put from any thread, taken by one coroutine at a time on the serving loop."""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        #: The waiting coroutine's loop and future, while one waits.
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def put(self, item: T) -> None:
        with self._lock:
            self._items.append(item)
        self.wake()

    def wake(self) -> None:
        """Wake the waiting coroutine (if any) so that it looks again: a stop, an item."""
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut)

    def get_nowait(self) -> T | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    async def get(self, timeout: float) -> T | None:
        """The next item, or None after ``timeout`` seconds or an early :meth:`wake`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._items:
                return self._items.popleft()
            self._waiter = (loop, fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if self._waiter is not None and self._waiter[1] is fut:
                    self._waiter = None
        return self.get_nowait()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StreamEnded(Exception):  # noqa: N818 (an end, not an error of ours)
    """The stream stopped: the peer sent nothing for the idle bound, or the call ended."""


class BlockingReader:
    """An incoming message stream, read from a worker thread, each wait bounded.

    Each ``next`` schedules one read on the serving loop and waits for it, looking every
    second whether it has waited longer than ``idle_s()`` (read afresh, so an operator's
    change applies to streams already open); past that the read is cancelled,
    ``on_idle`` runs once, and the reader raises :class:`StreamEnded`. After
    :meth:`close` (the call was cancelled) it raises within a second, so a worker never
    waits long on a call that is gone.
    """

    def __init__(
        self,
        messages: AsyncIterator[bytes],
        loop: asyncio.AbstractEventLoop,
        *,
        idle_s: Callable[[], float],
        on_idle: Callable[[], None],
    ) -> None:
        self._messages = messages
        self._loop = loop
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def __iter__(self) -> BlockingReader:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StreamEnded
        read = asyncio.run_coroutine_threadsafe(_next_message(self._messages), self._loop)
        since = time.monotonic()
        while True:
            left = self._idle_s() - (time.monotonic() - since)
            try:
                message = read.result(timeout=max(0.01, min(1.0, left)))
            except futures.TimeoutError:
                if read.done():  # the read itself raised it
                    self._closed = True
                    raise StreamEnded from None
                if not self._closed and time.monotonic() - since < self._idle_s():
                    continue
                read.cancel()
                if not self._closed:
                    self._closed = True
                    self._on_idle()
                raise StreamEnded from None
            except (futures.CancelledError, Exception):  # the call was cancelled or broke
                self._closed = True
                raise StreamEnded from None
            if message is None:
                raise StopIteration
            return message


async def _next_message(messages: AsyncIterator[bytes]) -> bytes | None:
    """The stream's next message, or None at its end."""
    try:
        return await anext(messages)
    except StopAsyncIteration:
        return None


class AioServer:
    """A ``grpc.aio`` server on its own event-loop thread.

    ``max_workers`` threads run the synchronous handlers (and the work a coroutine hands
    to the loop's default executor); ``max_calls`` bounds the calls in progress at once,
    long polls included, beyond which a call is refused (RESOURCE_EXHAUSTED).
    """

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        address: str,
        credentials: grpc.ServerCredentials | None,
        *,
        max_workers: int,
        max_calls: int,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="fedloom-rpc")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)
        self.port = 0
        self._stopped = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self.loop.run_forever, name="fedloom-serve")
        self._thread.daemon = True
        self._thread.start()
        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(
                self._start(handlers, address, credentials, max_calls, options), self.loop
            ).result()
        except BaseException:
            self._close_loop()
            raise

    async def _start(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        address: str,
        credentials: grpc.ServerCredentials | None,
        max_calls: int,
        options: Sequence[tuple[str, Any]],
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=self.pool,
            handlers=list(handlers),
            options=list(options),
            maximum_concurrent_rpcs=max_calls,
        )
        try:  # grpcio >= 1.70 raises RuntimeError on a failed bind; older ones returned 0
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            await server.stop(None)
            raise OSError(f"cannot listen on {address}; is the address valid and the port free?")
        await server.start()
        return server, port

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the serving loop (from any thread); a no-op once it has stopped."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn)

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving: calls in progress get ``grace`` seconds, then are cancelled.

        Returns an event set once the server, its loop and its threads have ended.
        """
        if self._stopping:
            return self._stopped
        self._stopping = True
        stopped = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self.loop)

        def finish() -> None:
            with contextlib.suppress(Exception):
                stopped.result()
            self._close_loop()

        threading.Thread(target=finish, name="fedloom-serve-stop", daemon=True).start()
        return self._stopped

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
