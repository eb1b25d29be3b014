"""The real deployment: a gRPC server that runs the rounds and client processes that train.

``fedloom_pb2.py/.pyi`` are generated from ``fedloom.proto`` and committed. They are
generated with grpcio-tools 1.62.3 (protobuf 4.25 gencode) on purpose: that code runs on
every protobuf runtime from 4.25 to 7.x, so fedloom installs next to packages that pin
an older protobuf (Flower needs < 7). Regenerate after changing the protocol with, in a
scratch venv: ``pip install grpcio-tools==1.62.3`` then ``python -m grpc_tools.protoc
-I src --python_out=src --pyi_out=src src/fedloom/engine/grpc/fedloom.proto``.
"""

#: Version 2: named vectors (VectorInfo), task config as JSON, generic exchange tasks.
#: Version 3: credentials and session in every call's metadata, Deregister, TASK_PAUSE.
PROTOCOL_VERSION = 3
#: Call metadata: the bearer token ("Bearer TOKEN") and the session a call belongs to.
AUTH_HEADER = "authorization"
SESSION_HEADER = "fedloom-session"
#: Settings ``fedloom server --resume DIR --set KEY=VALUE`` may change mid-run: how long
#: the run lasts and how patient the server is. Everything else defines the experiment
#: (and a client's privacy ledger, see ``client_state.config_digest``) and is refused.
RESUMABLE_SETTINGS = frozenset(
    {
        "rounds",
        "checkpoint_every",
        "eval.every",
        "deploy.round_timeout_s",
        "deploy.heartbeat_interval_s",
        "deploy.heartbeat_timeout_s",
        "deploy.poll_timeout_s",
        "deploy.wait_for_clients_s",
        "deploy.idle_stream_timeout_s",
    }
)
#: The gRPC service. Its methods are registered with raw-bytes handlers (no serializer),
#: so each side parses the messages itself.
SERVICE = "fedloom.v1.Federation"


def max_message_bytes(chunk_bytes: int) -> int:
    """The gRPC message size limit for ``chunk_bytes`` chunks: a chunk plus its header."""
    return max(8 << 20, 2 * chunk_bytes)


def exchange_message_limit(dimension: int) -> int:
    """The largest protocol message a client accepts from the server, unread beyond it.

    The transport knows no protocol, so one bound covers every built-in one: a CKKS
    public context (up to 32 MiB) or aggregate (up to ~450 bytes per value with the
    largest parameters), a SecAgg+ message (a masked vector of up to 8-byte integers plus
    framing). The server bounds each *reply* by the protocol's own limit
    (:attr:`fedloom.exchange.ExchangeRequest.reply_limit`).
    """
    return (1 << 26) + 512 * max(dimension, 1)
