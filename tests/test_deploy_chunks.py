"""Hand-encoded chunks are exactly protobuf's encoding; reassembly is bounded and exact."""

import numpy as np
import pytest

from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.chunks import ChunkError, encode_chunks, read_chunks


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 70000])
def test_hand_encoded_chunks_equal_protobuf(size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    ours = list(encode_chunks(data, 4096))
    theirs = [
        pb.TaskMessage(chunk=data[i : i + 4096]).SerializeToString() for i in range(0, size, 4096)
    ]
    assert ours == theirs
    assert b"".join(pb.ResultMessage.FromString(m).chunk for m in ours) == data


def test_reassembly_is_exact_and_bounded() -> None:
    data = np.arange(10_000, dtype="<f4").tobytes()
    chunks = list(encode_chunks(data, 1000))
    assert bytes(read_chunks(iter(chunks), len(data))) == data
    with pytest.raises(ChunkError) as err:
        read_chunks(iter(chunks), len(data) - 1)
    assert err.value.reason == "oversized"
    with pytest.raises(ChunkError) as err:
        read_chunks(iter(chunks[:-1]), len(data))
    assert err.value.reason == "truncated"
    with pytest.raises(ChunkError) as err:
        read_chunks(iter([b"\xff\xff"]), 4)
    assert err.value.reason == "malformed"


def test_task_streams_reassemble_alike_and_refuse_a_second_header() -> None:
    """A client reads a task's chunks with the same reader the server uses for results."""
    data = np.arange(3000, dtype="<f4").tobytes()
    chunks = list(encode_chunks(data, 1000))
    assert bytes(read_chunks(iter(chunks), len(data), pb.TaskMessage)) == data
    header = pb.TaskMessage(header=pb.TaskHeader(kind=pb.TASK_FIT)).SerializeToString()
    with pytest.raises(ChunkError, match="a second header inside a task stream") as err:
        read_chunks(iter([chunks[0], header, *chunks[1:]]), len(data), pb.TaskMessage)
    assert err.value.reason == "malformed"


def test_named_vectors_stream_back_to_back_and_split_exactly() -> None:
    """Several vectors are chunked one after another (no joint copy) and split by layout."""
    from fedloom.engine.grpc.chunks import encode_buffers
    from fedloom.engine.grpc.wire import payload_bytes, split_vectors, vector_buffers

    vectors = {
        "global": np.arange(1001, dtype=np.float32),
        "control": -np.arange(7, dtype=np.float32),
    }
    order = list(vectors)
    chunks = list(encode_buffers(vector_buffers(vectors, order), 1000))
    assert len(chunks) == 5 + 1  # 4004 bytes: 4 full chunks and 4 bytes; then 28 bytes
    layout = [(n, vectors[n].size) for n in order]
    buf = read_chunks(iter(chunks), payload_bytes(layout), pb.TaskMessage)
    out = split_vectors(buf, layout)
    assert list(out) == order
    for name in order:
        np.testing.assert_array_equal(out[name], vectors[name])
    out["global"][0] = 5.0  # views into one writable buffer, as training needs
    assert buf[:4] == np.float32(5.0).tobytes()
