"""Vertical FL's own gRPC service: one bidirectional stream per feature party.

The label party serves (:class:`PartyHub`); each feature party dials it
(:class:`LabelConnection`), as deployed clients dial ``fedloom server``: only the label
party needs a reachable port. The service is registered with gRPC's generic handlers
and moves raw bytes (``fedloom.vertical.wire`` messages); it shares nothing with the
horizontal deployment's protocol. On a stream the label party sends a command and the
feature party answers it before the next one, so a party's steps run in the label
party's order.

Who may take a party slot: the caller's identity is its client certificate's common
name (mutual TLS) or its bearer token's name, checked by the callable the command line
passes in (``fedloom.cli.party``; this package imports nothing of ``fedloom.engine``).
The first identity to take slot K holds it for the run (``parties.json`` in the run
directory), or only the identity pinned to K may take it; one identity holds one slot;
and a slot with a live stream refuses a second process claiming it. Without
authentication (loopback trials) only the last rule applies.

A feature party's stream that ends (the process died, the network dropped it, keepalive
pings went unanswered) closes its :class:`PartyLink` at once: the label party's wait
for that party's reply ends with :class:`PartyDroppedError`, naming the party.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedloom.vertical.wire import Message, RejectedMessageError, Rejections, decode, encode

log = logging.getLogger("fedloom.vertical")

SERVICE = "fedloom.vertical.v1.Parties"
METHOD = "Session"
#: Version of the command/reply protocol below (``fedloom.vertical.party``).
PROTOCOL = 1
#: Keepalive pings both ways, so a peer behind a dead network path is noticed.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
#: The command/reply size bound both ways (the party commands chunk PSI lists to fit).
DEFAULT_MAX_MESSAGE_BYTES = 32 << 20

#: The caller's identity from a call's context: a name, None (no valid credentials), or
#: "" when the hub authenticates no one (a loopback trial).
Authenticate = Callable[[grpc.ServicerContext], str | None]


class PartyDroppedError(RuntimeError):
    """A feature party's stream ended or it stopped answering; the run cannot go on."""

    def __init__(self, party: int, identity: str, why: str) -> None:
        who = f"feature party {party}" + (f" ('{identity}')" if identity else "")
        super().__init__(f"{who} {why}")
        self.party, self.identity, self.why = party, identity, why


class _Closed:
    def __init__(self, why: str) -> None:
        self.why = why


class PartyLink:
    """The label party's end of one feature party's stream."""

    def __init__(self, party: int, identity: str, *, limit: int, rejections: Rejections) -> None:
        self.party, self.identity = party, identity
        self.limit, self.rejections = limit, rejections
        self.outbox: queue.Queue[bytes | None] = queue.Queue()
        self.inbox: queue.Queue[bytes | _Closed] = queue.Queue()
        self.closed = threading.Event()
        self.bytes_sent = self.bytes_received = 0

    def close(self, why: str) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.inbox.put(_Closed(why))
            self.outbox.put(None)

    def send(
        self,
        kind: str,
        fields: Mapping[str, Any] | None = None,
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if self.closed.is_set():
            raise self._dropped("dropped (its stream is closed)")
        data = encode(kind, fields, arrays)
        self.bytes_sent += len(data)
        self.outbox.put(data)

    def receive(self, expect: str, *, timeout: float) -> Message:
        """The party's reply, of kind ``expect``; :class:`PartyDroppedError` if none comes."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise self._dropped(f"sent no reply within {timeout:g} s") from None
        if isinstance(item, _Closed):
            self.inbox.put(item)  # later receives see it too
            raise self._dropped(f"dropped: {item.why}")
        self.bytes_received += len(item)
        try:
            msg = decode(item, limit=self.limit)
            if msg.kind == "error":
                raise self._dropped(f"stopped: {msg.fields.get('error', 'an error')}")
            if msg.kind != expect:
                raise RejectedMessageError(
                    "protocol", f"a '{msg.kind}' reply where '{expect}' was due"
                )
        except RejectedMessageError as err:
            self.rejections.add(err, f"feature party {self.party}")
            raise self._dropped(f"sent a message the protocol refuses ({err.detail})") from None
        return msg

    def _dropped(self, why: str) -> PartyDroppedError:
        return PartyDroppedError(self.party, self.identity, why)


class PartySlots:
    """Which identity holds which feature-party slot, and which slots are live."""

    def __init__(self, parties: int, *, pinned: Mapping[int, str], path: Path | None) -> None:
        self.parties, self.pinned, self.path = parties, dict(pinned), path
        self.bound: dict[int, str] = {}
        if path is not None and path.is_file():
            self.bound = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
        self.live: dict[int, PartyLink] = {}

    def refusal(self, party: int, identity: str) -> str | None:
        """Why ``identity`` may not take slot ``party`` now (None: it may)."""
        if not 0 <= party < self.parties:
            return f"this run has feature parties 0 to {self.parties - 1}, not {party}"
        if identity:
            want = self.pinned.get(party)
            if want is not None and want != identity:
                return f"feature party {party} is reserved for identity '{want}'"
            holder = self.bound.get(party)
            if holder is not None and holder != identity:
                return f"feature party {party} is identity '{holder}''s in this run"
            other = [k for k, name in self.bound.items() if name == identity and k != party]
            if other:
                return f"identity '{identity}' is feature party {other[0]} of this run"
        link = self.live.get(party)
        if link is not None and not link.closed.is_set():
            return f"feature party {party} is already connected; a second process cannot claim it"
        return None

    def take(self, party: int, identity: str, link: PartyLink) -> None:
        self.live[party] = link
        if identity and party not in self.bound:
            self.bound[party] = identity
            if self.path is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.bound.items())}))
                tmp.replace(self.path)


@dataclass(frozen=True, kw_only=True)
class HubSettings:
    parties: int
    #: The welcome each accepted party gets: the run's config and its party index.
    welcome: Callable[[int], dict[str, Any]]
    authenticate: Authenticate
    pinned: Mapping[int, str]
    book: Path | None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class PartyHub:
    """The label party's server: admits feature parties, one stream each."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.slots = PartySlots(settings.parties, pinned=settings.pinned, path=settings.book)
        self.rejections = Rejections()
        self._cond = threading.Condition()
        self._accepting = True
        self._server: grpc.Server | None = None

    def start(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        limit = self.settings.max_message_bytes
        workers = self.settings.parties + 4
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                *KEEPALIVE,
            ],
            maximum_concurrent_rpcs=workers,
        )
        handler = grpc.stream_stream_rpc_method_handler(self._session)  # bytes in, bytes out
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )
        try:
            port = (
                server.add_insecure_port(address)
                if credentials is None
                else server.add_secure_port(address, credentials)
            )
        except RuntimeError:
            port = 0
        if port == 0:
            server.stop(None)
            raise OSError(f"cannot listen on {address}; is the address valid and the port free?")
        server.start()
        self._server = server
        return port

    def wait_for_parties(self, timeout: float) -> list[PartyLink]:
        """Every feature party's link once all are connected; then admit no one else."""
        n = self.settings.parties
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.slots.live) == n, timeout=timeout)
            if not ok:
                missing = [k for k in range(n) if k not in self.slots.live]
                raise TimeoutError(
                    f"feature parties {missing} did not connect within {timeout:g} s; start "
                    "them with 'fedloom party --role features --party K ...'"
                )
            self._accepting = False
            return [self.slots.live[k] for k in range(n)]

    def links(self) -> list[PartyLink]:
        with self._cond:
            return list(self.slots.live.values())

    def close(self) -> None:
        for link in self.links():
            link.close("the label party closed the run")
        if self._server is not None:
            self._server.stop(grace=2).wait(5)

    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        limit = self.settings.max_message_bytes
        identity = self.settings.authenticate(context)
        if identity is None:
            self.rejections.add(
                RejectedMessageError("unauthenticated", "no valid credentials"), "a caller"
            )
            yield encode("refused", {"reason": "no valid client certificate or token"})
            return
        try:
            hello = decode(next(requests), limit=limit)
            party = hello.fields.get("party")
            if hello.kind != "hello" or not isinstance(party, int) or isinstance(party, bool):
                raise RejectedMessageError(
                    "protocol", "the first message is not a hello with a party"
                )
            if hello.fields.get("protocol") != PROTOCOL:
                raise RejectedMessageError(
                    "protocol",
                    f"protocol {hello.fields.get('protocol')}, this party speaks {PROTOCOL}",
                )
        except (StopIteration, grpc.RpcError):
            return
        except RejectedMessageError as err:
            self.rejections.add(err, identity or "an anonymous caller")
            yield encode("refused", {"reason": err.detail})
            return
        link = PartyLink(party, identity, limit=limit, rejections=self.rejections)
        if not context.add_callback(lambda: link.close("the connection closed")):
            return  # the call already ended
        with self._cond:
            why = (
                self.slots.refusal(party, identity)
                if self._accepting
                else "the run has started; it admits no party now"
            )
            if why is None:
                link.send("welcome", self.settings.welcome(party))  # answered by "joined"
                self.slots.take(party, identity, link)
                self._cond.notify_all()
        if why is not None:
            log.warning("refused %s as feature party %s: %s", identity or "a caller", party, why)
            yield encode("refused", {"reason": why})
            return
        log.info("feature party %d connected%s", party, f" as '{identity}'" if identity else "")
        while True:
            out = link.outbox.get()
            if out is None:
                return
            yield out
            try:
                reply = next(requests)
            except StopIteration:
                link.close("the party ended its stream")
                return
            except Exception:  # grpc.RpcError (cancelled, connection lost) and the like
                link.close("the connection was lost")
                return
            link.inbox.put(reply)


class LabelRefusedError(RuntimeError):
    """The label party refused this feature party (the reason is the message)."""


class LabelConnection:
    """A feature party's end: dial the label party, then answer its commands in order."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        *,
        token: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address, self.limit = address, max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *KEEPALIVE,
        ]
        self.channel = (
            grpc.insecure_channel(address, options=options)
            if credentials is None
            else grpc.secure_channel(address, credentials, options=options)
        )
        self.metadata: Sequence[tuple[str, str]] = (
            [("authorization", f"Bearer {token}")] if token else []
        )
        self.rejections = Rejections()
        self.bytes_sent = self.bytes_received = 0

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(
                f"could not reach the label party at {self.address} within {timeout:g} s "
                "(is it running there, and does --root-cert name the CA that signed its "
                "certificate?)"
            ) from None

    def serve(self, party: int, name: str, answer: Callable[[Message], tuple[bytes, bool]]) -> None:
        """Say hello as ``party``, then answer every command in order; ``answer`` returns
        the reply and whether it was the last (then the label party ends the stream)."""
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                self.bytes_sent += len(item)
                yield item

        outbox.put(encode("hello", {"protocol": PROTOCOL, "party": party, "name": name}))
        call = self.channel.stream_stream(f"/{SERVICE}/{METHOD}")(
            requests(), metadata=self.metadata
        )
        done, first = False, True
        try:
            for raw in call:
                self.bytes_received += len(raw)
                try:
                    msg = decode(raw, limit=self.limit)
                except RejectedMessageError as err:
                    self.rejections.add(err, "the label party")
                    raise ConnectionError(
                        f"the label party sent a message this party refuses: {err.detail}"
                    ) from None
                if first and msg.kind == "refused":
                    raise LabelRefusedError(str(msg.fields.get("reason", "no reason given")))
                first = False
                reply, last = answer(msg)
                outbox.put(reply)
                done = done or last
        except grpc.RpcError as err:
            if done:
                return
            code = err.code() if isinstance(err, grpc.Call) else None
            raise ConnectionError(
                f"the connection to the label party at {self.address} was lost ({code})"
            ) from None
        finally:
            outbox.put(None)
            call.cancel()
        if not done:
            raise ConnectionError("the label party ended the stream before the run was over")

    def close(self) -> None:
        self.channel.close()
