"""The serving loop: long polls hold no thread, mailboxes wake across threads, silent
result streams end after the idle bound."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from fedloom.engine.grpc import PROTOCOL_VERSION
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.client import _Stub
from fedloom.engine.grpc.server import DeployOptions, GrpcExecutor, Registry
from fedloom.engine.grpc.serving import BlockingReader, StreamEnded, TaskMailbox
from fedloom.messages import GLOBAL, FitTask

from .deploy_helpers import serving


def test_mailbox_put_from_a_thread_wakes_the_waiting_coroutine() -> None:
    box: TaskMailbox[str] = TaskMailbox()

    async def scenario() -> tuple[str | None, str | None]:
        waiting = asyncio.ensure_future(box.get(timeout=600))
        await asyncio.sleep(0)  # the get registers as the waiter
        threading.Thread(target=box.put, args=("task",)).start()
        first = await waiting  # returns long before the 600 s bound: put woke it
        empty = await box.get(timeout=0.01)  # nothing queued: None after the timeout
        return first, empty

    assert asyncio.run(asyncio.wait_for(scenario(), 120)) == ("task", None)


def test_mailbox_wake_returns_none_and_keeps_queued_items_in_order() -> None:
    box: TaskMailbox[int] = TaskMailbox()

    async def scenario() -> list[int | None]:
        waiting = asyncio.ensure_future(box.get(timeout=600))
        await asyncio.sleep(0)
        threading.Thread(target=box.wake).start()
        woken = await waiting
        box.put(1)
        box.put(2)
        return [woken, await box.get(timeout=1), await box.get(timeout=1), len(box)]

    assert asyncio.run(asyncio.wait_for(scenario(), 120)) == [None, 1, 2, 0]


def test_blocking_reader_returns_messages_then_ends_a_silent_stream_once() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    forever = asyncio.Event()
    idle_calls: list[int] = []

    async def messages() -> AsyncIterator[bytes]:
        yield b"header"
        yield b"chunk"
        await forever.wait()  # then silent
        yield b"never"

    try:
        reader = BlockingReader(
            messages(), loop, idle_s=lambda: 0.2, on_idle=lambda: idle_calls.append(1)
        )
        assert next(reader) == b"header"
        assert next(reader) == b"chunk"
        with pytest.raises(StreamEnded):
            next(reader)
        with pytest.raises(StreamEnded):  # ended for good, counted once
            next(reader)
        assert idle_calls == [1]

        async def short() -> AsyncIterator[bytes]:
            yield b"only"

        assert list(BlockingReader(short(), loop, idle_s=lambda: 60.0, on_idle=list)) == [b"only"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _register(stub: _Stub, partition: int) -> pb.RegisterReply:
    request = pb.RegisterRequest(
        protocol_version=PROTOCOL_VERSION, partition=partition, name=f"c{partition}"
    )
    return pb.RegisterReply.FromString(stub.register(request.SerializeToString(), timeout=120))


def test_forty_open_long_polls_on_four_threads_leave_the_server_answering() -> None:
    """On a thread-per-call server four workers would be taken by the first four polls;
    here 40 clients hold a long poll each and the server still registers, answers every
    heartbeat and hands a task to the one client it is for."""
    n = 40
    options = DeployOptions(poll_timeout_s=600, heartbeat_timeout_s=3600)
    registry = Registry(n + 1, 4, "{}", options=options)
    with serving(registry, options, max_workers=4) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = _Stub(channel)
        executor = GrpcExecutor(registry, options)
        polls = []
        try:
            sessions = [_register(stub, c) for c in range(n)]
            assert all(r.accepted for r in sessions)
            for r in sessions:
                stub.session = r.session_id
                call = stub.pull(pb.PullRequest(session_id=r.session_id).SerializeToString())
                polls.append(call)
            # Every poll is open on the server at once: none has come back.
            while sum(s.streams for s in registry.sessions.values()) < n:
                threading.Event().wait(0.01)
            stub.session = ""
            late = _register(stub, n)
            assert late.accepted, late.reason
            for r in sessions:
                stub.session = r.session_id
                beat = pb.HeartbeatRequest(session_id=r.session_id).SerializeToString()
                assert pb.HeartbeatReply.FromString(stub.heartbeat(beat, timeout=120)).known
            # A task for client 7 reaches its waiting poll (and only that one).
            results: list[object] = []
            fit = threading.Thread(
                target=lambda: results.extend(
                    executor.fit(
                        [FitTask(client_id=7, round=1, model_version=0)],
                        {GLOBAL: np.zeros(4, dtype=np.float32)},
                    )
                ),
                daemon=True,
            )
            fit.start()
            header = pb.TaskMessage.FromString(next(iter(polls[7]))).header
            assert header.kind == pb.TASK_FIT and header.client_id == 7
            assert sum(s.streams for s in registry.sessions.values()) >= n - 1
            # Client 7 leaves before answering: the round records its failure at once.
            seven = registry.live(sessions[7].session_id)
            assert seven is not None
            registry.deregister(seven, "test: leaves mid-task")
            fit.join(120)
            assert [type(o).__name__ for o in results] == ["ClientFailure"]
        finally:
            executor.close()  # wakes every poll: each hears the run is over
            for i, call in enumerate(polls):
                if i != 7:
                    first = pb.TaskMessage.FromString(next(iter(call))).header
                    assert first.kind == pb.TASK_STOP
            channel.close()
