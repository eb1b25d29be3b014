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
    assert bytes(buf[:4]) == np.float32(5.0).tobytes()


def test_messages_protobuf_accepts_in_another_form_read_alike() -> None:
    """The reader's own parse takes only the exact one-field form; any other encoding
    protobuf accepts (an over-long length varint, an unknown field, the field twice) is
    read as protobuf reads it, and what protobuf refuses is refused."""
    data = bytes(range(200))
    overlong = b"\x12\xc8\x81\x00" + data  # 200 in three varint bytes (two suffice)
    unknown = b"\x12\x02ab" + b"\x18\x05" + b"\x12\x64" + data[:100]
    assert pb.ResultMessage.FromString(overlong).chunk == data
    for raw in (overlong, unknown):
        expected = pb.ResultMessage.FromString(raw).chunk
        assert bytes(read_chunks(iter([raw]), len(expected))) == expected
    for bad in (b"\x12\x05abc", b"\x12", b"\x12" + b"\xff" * 11 + b"a"):
        with pytest.raises(ChunkError) as err:
            read_chunks(iter([bad]), 3)
        assert err.value.reason == "malformed"
    # A chunk longer than announced is refused before it is copied anywhere.
    with pytest.raises(ChunkError) as err:
        read_chunks(iter(list(encode_chunks(data, 64))), 150)
    assert err.value.reason == "oversized"


def test_receive_buffers_are_reused_only_once_released() -> None:
    """A buffer comes back only when no array, view or memoryview of it is alive, so a
    new round never writes into an update someone still holds."""
    from fedloom.engine.grpc.chunks import BufferPool

    pool = BufferPool(keep=2)
    size = 2 << 20
    first = pool.take(size)
    view = first[10:20]
    address = first.ctypes.data
    del first
    second = pool.take(size)
    assert second.ctypes.data != address  # a view of the first is alive
    np.frombuffer(second, dtype=np.float32)[:] = 1.0
    del view
    third = pool.take(size)
    assert third.ctypes.data == address  # nothing refers to the first any more
    mv = memoryview(third)
    del third
    assert pool.take(size).ctypes.data not in (address, second.ctypes.data)
    del mv
    assert pool.take(size // 2).size == size // 2  # another size: a new buffer
    # Small buffers are not kept: every call returns a new one.
    small = pool.take(100)
    small_address = small.ctypes.data
    other = pool.take(100)
    assert other.ctypes.data != small_address
