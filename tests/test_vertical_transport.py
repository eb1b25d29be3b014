"""Vertical FL's party transport: message bounds, slot identities, refused replies."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedloom.vertical.party import FeatureWorker
from fedloom.vertical.transport import (
    HubSettings,
    LabelConnection,
    LabelRefusedError,
    PartyDroppedError,
    PartyHub,
    PartyLink,
)
from fedloom.vertical.wire import (
    MAGIC,
    Message,
    RejectedMessageError,
    Rejections,
    decode,
    encode,
    require,
    require_indices,
)

from .deploy_helpers import dev_certs


def test_messages_round_trip_exactly() -> None:
    h = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    rows = np.array([4, 0, 2], dtype=np.int32)
    msg = decode(encode("forward", {"n": 3}, {"h": h, "rows": rows}), limit=1 << 20)
    assert msg.kind == "forward" and msg.fields == {"n": 3}
    np.testing.assert_array_equal(msg.arrays["h"], h)
    assert msg.arrays["h"].dtype == np.float32
    np.testing.assert_array_equal(require_indices(msg, "rows", below=5), rows)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode("x", arrays={"h": np.array([1.0, np.nan], np.float32)}), "non_finite"),
        (encode("x", arrays={"h": np.array([np.inf], np.float32)}), "non_finite"),
        (encode("x", arrays={"h": np.zeros(10, np.float32)})[:-4], "malformed"),
        (encode("x", arrays={"h": np.zeros(1, np.float32)}) + b"\0", "malformed"),
        (b"garbage", "malformed"),
        (MAGIC + struct.pack(">I", 5) + b"{not}", "malformed"),
        (MAGIC + struct.pack(">I", 1 << 30), "malformed"),
        (encode("x", arrays={"h": np.zeros(300_000, np.uint8)}), "too_large"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RejectedMessageError) as err:
        decode(data, limit=1 << 18)
    assert err.value.reason == reason


def test_a_header_with_a_foreign_dtype_or_shape_is_rejected() -> None:
    import json

    for entry, reason in (
        (["h", "float64", [1]], "bad_dtype"),
        (["h", "object", [1]], "bad_dtype"),
        (["h", "float32", [-1]], "bad_shape"),
        (["h", "float32", [1, 1, 1, 1]], "bad_shape"),
        (["h", "float32", [True]], "bad_shape"),
    ):
        head = json.dumps({"kind": "x", "fields": {}, "arrays": [entry]}).encode()
        data = MAGIC + struct.pack(">I", len(head)) + head + b"\0" * 8
        with pytest.raises(RejectedMessageError) as err:
            decode(data, limit=1 << 20)
        assert err.value.reason == reason, entry


def test_require_checks_dtype_shape_and_index_range() -> None:
    msg = Message("activations", {}, {"h": np.zeros((4, 8), np.float32)})
    require(msg, "h", "float32", (4, 8))
    for shape in ((3, 8), (4, 7), (4,)):
        with pytest.raises(RejectedMessageError, match="shape"):
            require(msg, "h", "float32", shape)
    with pytest.raises(RejectedMessageError, match="int32"):
        require(msg, "h", "int32", (4, 8))
    with pytest.raises(RejectedMessageError, match="without array"):
        require(msg, "g", "float32", (4, 8))
    rows = Message("forward", {}, {"rows": np.array([0, 5], np.int32)})
    with pytest.raises(RejectedMessageError, match="outside"):
        require_indices(rows, "rows", below=5)
    dup = Message("align", {}, {"rows": np.array([1, 1], np.int32)})
    with pytest.raises(RejectedMessageError, match="repeats"):
        require_indices(dup, "rows", below=5, unique=True)


def test_a_bad_reply_ends_the_step_naming_the_party_and_is_counted() -> None:
    rejections = Rejections()
    link = PartyLink(1, "party-1", limit=1 << 20, rejections=rejections)
    link.inbox.put(encode("activations", arrays={"h": np.full((2, 8), np.nan, np.float32)}))
    with pytest.raises(PartyDroppedError, match=r"feature party 1 \('party-1'\).*NaN"):
        link.receive("activations", timeout=5)
    assert rejections.counts == {"non_finite": 1}
    link.close("the connection closed")
    with pytest.raises(PartyDroppedError, match="dropped: the connection closed"):
        link.receive("activations", timeout=5)
    silent = PartyLink(0, "", limit=1 << 20, rejections=rejections)
    with pytest.raises(PartyDroppedError, match=r"feature party 0 sent no reply within 0\.01 s"):
        silent.receive("activations", timeout=0.01)


def test_a_feature_party_refuses_commands_out_of_order_or_out_of_bounds() -> None:
    worker = FeatureWorker(0, None, None)
    reply, last = worker.answer(Message("forward", {}, {"rows": np.array([0], np.int32)}))
    assert last and decode(reply, limit=1 << 20).kind == "error"
    assert worker.failure is not None and "before the welcome" in worker.failure


def _tls_hub(tmp_path: Path) -> tuple[PartyHub, int, Path]:
    certs = dev_certs(tmp_path / "certs", ["party-0", "party-1", "party-2"])

    def authenticate(context: grpc.ServicerContext) -> str | None:
        names = context.auth_context().get("x509_common_name") or []
        return names[0].decode() if names else None

    hub = PartyHub(
        HubSettings(
            parties=2,
            welcome=lambda k: {"party": k},
            authenticate=authenticate,
            pinned={},
            book=tmp_path / "parties.json",
        )
    )
    creds = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    return hub, hub.start("127.0.0.1:0", creds), certs


def _connect(certs: Path, port: int, name: str) -> LabelConnection:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{name}.key").read_bytes(),
        certificate_chain=(certs / f"{name}.pem").read_bytes(),
    )
    conn = LabelConnection(f"localhost:{port}", creds)
    conn.wait_ready(30)
    return conn


def test_one_identity_per_party_slot_and_one_process_per_slot(tmp_path: Path) -> None:
    hub, port, certs = _tls_hub(tmp_path)
    welcomed = threading.Event()
    ended: list[BaseException] = []

    def answer(msg: Message) -> tuple[bytes, bool]:
        assert msg.kind == "welcome" and msg.fields == {"party": 0}
        welcomed.set()
        return encode("joined", {"ids": 0}), False

    def first() -> None:
        try:
            _connect(certs, port, "party-0").serve(0, "a", answer)
        except ConnectionError as err:  # the hub closes at the end of the test
            ended.append(err)

    holder = threading.Thread(target=first, daemon=True)
    holder.start()
    try:
        assert welcomed.wait(60)

        def refusal(name: str, party: int) -> str:
            conn = _connect(certs, port, name)
            try:
                with pytest.raises(LabelRefusedError) as err:
                    conn.serve(party, name, answer)
            finally:
                conn.close()
            return str(err.value)

        # A second process with the same identity claiming the same slot.
        assert "already connected; a second process cannot claim it" in refusal("party-0", 0)
        # Another identity claiming a slot someone holds; one identity, one slot.
        assert "is identity 'party-0''s in this run" in refusal("party-1", 0)
        assert "identity 'party-0' is feature party 0" in refusal("party-0", 1)
        assert "not 5" in refusal("party-2", 5)
        assert hub.rejections.total == 0  # refusals of claims are not malformed messages
    finally:
        hub.close()
        holder.join(30)
    assert ended and "ended the stream" in str(ended[0])
