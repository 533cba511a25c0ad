"""One C2SP key-name rule and one verifier-key parser, for node keys and cosigner keys."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest

from node.core.keys import NodeIdentity, check_key_name, key_id, parse_verifier_key
from node.core.notes import cosigner_vkey_string, parse_note, parse_vkey, sign_note
from node.errors import BadInput

PUBLIC_KEY = NodeIdentity.generate("x.example").public_key
# C2SP signed-note: a key name is non-empty and has no Unicode space and no "+".
ACCEPTED_NAMES = [
    "a.example/imageshare",
    "x",
    "ünïcödé.example/log",  # non-ASCII is allowed
    "10.0.0.7:8600/x_y~z-1",
    "zero\u200bwidth",  # U+200B is not a Unicode space (White_Space)
]
REFUSED_NAMES = [
    "",
    "has space",
    "tab\there",
    "no\u00a0break",  # U+00A0, a Unicode space
    "em\u2003space",
    "ideographic\u3000space",
    "line\u2028separator",
    "nul\x00byte",  # a control character: no signed note can carry it
    "delete\x7f",
    "escape\x1b[0m",
]


def vkey_named(name: str) -> str:
    """A vkey string for ``name`` with a correct key ID (built by hand: the name may be bad)."""
    encoded = base64.b64encode(b"\x01" + PUBLIC_KEY).decode()
    return f"{name}+{key_id(name, PUBLIC_KEY).hex()}+{encoded}"


class TestKeyName:
    @pytest.mark.parametrize("name", ACCEPTED_NAMES)
    def test_c2sp_names_are_accepted_by_every_parser(self, name: str) -> None:
        check_key_name(name)
        assert parse_verifier_key(vkey_named(name)).name == name
        assert parse_vkey(vkey_named(name)).name == name
        note = sign_note("text\n", NodeIdentity(name, os.urandom(32)))
        assert parse_note(note)[1][0].name == name

    @pytest.mark.parametrize("name", REFUSED_NAMES)
    def test_other_names_are_refused_by_every_parser(self, name: str) -> None:
        with pytest.raises(BadInput):
            check_key_name(name)
        # Both vkey parsers once had their own name rule; the node-key one let control
        # characters through.
        with pytest.raises(BadInput):
            parse_verifier_key(vkey_named(name))
        with pytest.raises(BadInput):
            parse_vkey(vkey_named(name))
        with pytest.raises(BadInput):
            sign_note("text\n", NodeIdentity(name, os.urandom(32)))

    def test_plus_is_refused_in_a_name(self) -> None:
        with pytest.raises(BadInput):
            check_key_name("plus+sign")


class TestVerifierKey:
    def test_node_key_round_trips(self) -> None:
        identity = NodeIdentity.generate("a.example/imageshare")
        key = parse_verifier_key(identity.vkey)
        assert (key.name, key.key_id, key.public_key) == (
            identity.origin,
            identity.key_id,
            identity.public_key,
        )
        assert str(key) == identity.vkey

    def test_cosigner_key_is_taken_only_where_asked_for(self) -> None:
        cosigner = cosigner_vkey_string("w.example/imageshare", PUBLIC_KEY)
        assert parse_vkey(cosigner).public_key == PUBLIC_KEY
        with pytest.raises(BadInput, match="not an Ed25519 key"):
            parse_verifier_key(cosigner)

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda v: v.replace("+", "-", 1),  # no separator
            lambda v: v[: v.index("+") + 1] + "0000" + v[v.index("+") + 9 :],  # wrong key ID
            lambda v: v[: v.index("+") + 1] + "zz" + v[v.index("+") + 3 :],  # not hex
            lambda v: v[:-4],  # key cut short
            lambda v: v + "AAAA",  # key too long
        ],
    )
    def test_malformed_vkey_is_refused(self, mangle: Callable[[str], str]) -> None:
        vkey = NodeIdentity.generate("a.example/imageshare").vkey
        with pytest.raises(BadInput):
            parse_verifier_key(mangle(vkey))
        with pytest.raises(BadInput):
            parse_vkey(mangle(vkey))
