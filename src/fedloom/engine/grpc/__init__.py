"""The real deployment: a gRPC server that runs the rounds and client processes that train.

``fedloom_pb2*.py`` are generated from ``fedloom.proto`` and committed; regenerate with
``python -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src
--pyi_out=src src/fedloom/engine/grpc/fedloom.proto`` after changing the protocol.
"""

PROTOCOL_VERSION = 1
