"""The pure end-to-end channel: key agreement and the chunked secretstream."""

from __future__ import annotations

import os

import pytest

from node.core.channel import (
    HEADER_SIZE,
    MAX_MESSAGE,
    ChannelError,
    EphemeralKey,
    StreamDecryptor,
    StreamEncryptor,
    open_sealed,
    receiver_session,
    seal,
    sender_session,
)
from node.core.keys import NodeIdentity

TOKEN_ID = bytes(range(32))


def _pair() -> tuple[NodeIdentity, NodeIdentity, EphemeralKey, EphemeralKey]:
    return (
        NodeIdentity.generate("a.example/imageshare"),
        NodeIdentity.generate("b.example/imageshare"),
        EphemeralKey.generate(),
        EphemeralKey.generate(),
    )


def _keys() -> tuple[bytes, bytes]:
    """(sender's instance key, receiver's instance key) for one fresh transfer."""
    a, b, ea, eb = _pair()
    sent = sender_session(a.seed, ea, b.public_key, eb.public, TOKEN_ID)
    got = receiver_session(b.seed, eb, a.public_key, ea.public, TOKEN_ID)
    return sent.instances, got.instances


def _encrypt(key: bytes, messages: list[bytes]) -> bytes:
    encryptor = StreamEncryptor(key)
    out = [encryptor.header]
    out += [encryptor.push(m, final=i == len(messages) - 1) for i, m in enumerate(messages)]
    return b"".join(out)


def _decrypt(key: bytes, wire: bytes, piece: int = 7000) -> list[bytes]:
    decryptor = StreamDecryptor(key)
    plain: list[bytes] = []
    for start in range(0, len(wire), piece):
        plain += [m for m, _final in decryptor.feed(wire[start : start + piece])]
    decryptor.close()
    return plain


class TestKeyAgreement:
    def test_both_sides_derive_the_same_distinct_keys(self) -> None:
        a, b, ea, eb = _pair()
        sent = sender_session(a.seed, ea, b.public_key, eb.public, TOKEN_ID)
        got = receiver_session(b.seed, eb, a.public_key, ea.public, TOKEN_ID)
        assert sent == got
        assert sent.manifest != sent.instances

    def test_fresh_ephemerals_give_fresh_keys(self) -> None:
        a, b, ea, eb = _pair()
        first = sender_session(a.seed, ea, b.public_key, eb.public, TOKEN_ID)
        second = sender_session(a.seed, EphemeralKey.generate(), b.public_key, eb.public, TOKEN_ID)
        assert first.instances != second.instances

    def test_token_id_is_bound_into_the_keys(self) -> None:
        a, b, ea, eb = _pair()
        sent = sender_session(a.seed, ea, b.public_key, eb.public, TOKEN_ID)
        got = receiver_session(b.seed, eb, a.public_key, ea.public, bytes(32))
        assert sent.instances != got.instances

    def test_impostor_without_the_senders_key_derives_other_keys(self) -> None:
        a, b, ea, eb = _pair()
        mallory = NodeIdentity.generate("a.example/imageshare")
        sent = sender_session(mallory.seed, ea, b.public_key, eb.public, TOKEN_ID)
        got = receiver_session(b.seed, eb, a.public_key, ea.public, TOKEN_ID)
        assert sent.instances != got.instances

    def test_low_order_ephemeral_is_refused(self) -> None:
        a, b, _ea, eb = _pair()
        with pytest.raises(ChannelError):
            receiver_session(b.seed, eb, a.public_key, bytes(32), TOKEN_ID)


class TestStream:
    def test_round_trip_of_many_messages_in_odd_pieces(self) -> None:
        send_key, receive_key = _keys()
        messages = [os.urandom(n) for n in (0, 1, 65536, MAX_MESSAGE, 12345)]
        assert _decrypt(receive_key, _encrypt(send_key, messages)) == messages

    def test_ciphertext_holds_no_plaintext(self) -> None:
        send_key, _ = _keys()
        secret = b"DICM" + b"Doe^Jane" * 1000
        wire = _encrypt(send_key, [secret])
        assert b"DICM" not in wire and b"Doe^Jane" not in wire

    def test_flipped_bit_fails_authentication(self) -> None:
        send_key, receive_key = _keys()
        wire = bytearray(_encrypt(send_key, [b"x" * 1000, b"y" * 1000]))
        wire[HEADER_SIZE + 50] ^= 1
        with pytest.raises(ChannelError, match="authentication"):
            _decrypt(receive_key, bytes(wire))

    def test_truncation_before_the_final_message_is_detected(self) -> None:
        send_key, receive_key = _keys()
        encryptor = StreamEncryptor(send_key)
        wire = encryptor.header + encryptor.push(b"a" * 100) + encryptor.push(b"b" * 100)
        with pytest.raises(ChannelError, match="cut short"):
            _decrypt(receive_key, wire)

    def test_dropping_a_message_is_detected(self) -> None:
        send_key, receive_key = _keys()
        encryptor = StreamEncryptor(send_key)
        first = encryptor.push(b"a" * 100)
        second = encryptor.push(b"b" * 100, final=True)
        assert first
        with pytest.raises(ChannelError):
            _decrypt(receive_key, encryptor.header + second)

    def test_cut_inside_a_message_is_detected(self) -> None:
        send_key, receive_key = _keys()
        wire = _encrypt(send_key, [b"a" * 1000])
        with pytest.raises(ChannelError, match="cut short"):
            _decrypt(receive_key, wire[:-10])

    def test_wrong_key_fails(self) -> None:
        send_key, _ = _keys()
        _, other_key = _keys()
        with pytest.raises(ChannelError):
            _decrypt(other_key, _encrypt(send_key, [b"hello"]))

    def test_data_after_final_is_refused(self) -> None:
        send_key, receive_key = _keys()
        wire = _encrypt(send_key, [b"hello"])
        with pytest.raises(ChannelError, match="after the final"):
            _decrypt(receive_key, wire + b"\x00\x00\x00\x20" + bytes(32))

    def test_impossible_length_is_refused(self) -> None:
        _, receive_key = _keys()
        with pytest.raises(ChannelError, match="length"):
            _decrypt(receive_key, bytes(HEADER_SIZE) + b"\xff\xff\xff\xff")


class TestSeal:
    def test_seal_round_trip_large_and_empty(self) -> None:
        send_key, receive_key = _keys()
        big = os.urandom(MAX_MESSAGE * 2 + 5)
        assert open_sealed(receive_key, seal(send_key, big)) == big
        assert open_sealed(receive_key, seal(send_key, b"")) == b""

    def test_sealed_message_tampered_is_refused(self) -> None:
        send_key, receive_key = _keys()
        sealed = bytearray(seal(send_key, b"manifest"))
        sealed[-1] ^= 0x80
        with pytest.raises(ChannelError):
            open_sealed(receive_key, bytes(sealed))
