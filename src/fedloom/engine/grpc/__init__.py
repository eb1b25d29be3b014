"""The real deployment: a gRPC server that runs the rounds and client processes that train.

``fedloom_pb2.py/.pyi`` are generated from ``fedloom.proto`` and committed. They are
generated with grpcio-tools 1.62.3 (protobuf 4.25 gencode) on purpose: that code runs on
every protobuf runtime from 4.25 to 7.x, so fedloom installs next to packages that pin
an older protobuf (Flower needs < 7). Regenerate after changing the protocol with, in a
scratch venv: ``pip install grpcio-tools==1.62.3`` then ``python -m grpc_tools.protoc
-I src --python_out=src --pyi_out=src src/fedloom/engine/grpc/fedloom.proto``.
"""

PROTOCOL_VERSION = 1
#: The gRPC service. Its methods are registered with raw-bytes handlers (no serializer),
#: so each side parses the messages itself.
SERVICE = "fedloom.v1.Federation"


def max_message_bytes(chunk_bytes: int) -> int:
    """The gRPC message size limit for ``chunk_bytes`` chunks: a chunk plus its header."""
    return max(8 << 20, 2 * chunk_bytes)


def secagg_message_limit(vector_length: int) -> int:
    """The largest SecAgg+ stage message either side accepts; larger ones are refused unread.

    A masked vector of up to 64-bit integers, plus framing.
    """
    return 8 * vector_length + (1 << 20)
