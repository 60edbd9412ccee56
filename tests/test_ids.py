"""The session-ID and cookie format: ``<token>.<route>``, signed as ``<token>~<sig>.<route>``."""

from __future__ import annotations

import base64
import math
import re

import itsdangerous
import pytest

from clustersess import ids

ROUTE = "node_1"


def test_token_has_at_least_128_bits_from_url_safe_alphabet() -> None:
    tokens = {ids.new_token() for _ in range(2000)}
    assert len(tokens) == 2000  # no collisions
    for token in tokens:
        assert ids.TOKEN_RE.fullmatch(token)
        assert "." not in token and "~" not in token
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert len(raw) * 8 >= 128
    # The tokens really vary: every position takes many of the 64 symbols.
    for pos in range(len(next(iter(tokens)))):
        assert len({t[pos] for t in tokens}) > 40
    assert ids.TOKEN_BYTES * 8 >= 128
    assert math.log2(64) * len(next(iter(tokens))) >= 128


def test_make_and_parse_id_round_trip() -> None:
    token = ids.new_token()
    sid = ids.make_id(token, ROUTE)
    assert sid == f"{token}.{ROUTE}"
    assert sid.count(".") == 1 and sid.rsplit(".", 1)[1] == ROUTE
    parsed = ids.parse_id(sid)
    assert parsed == (token, ROUTE)
    assert str(parsed) == sid


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "nodot" * 6,
        "short.node1",
        f"{'A' * 24}.",
        f"{'A' * 24}.bad-route",
        f"{'A' * 24}.a.b",
        f"{'A' * 24}.{'r' * 33}",
        f"{'A' * 23}!.node1",
        f"{'A' * 25}.node1",
    ],
)
def test_parse_id_rejects_malformed(bad: str) -> None:
    assert ids.parse_id(bad) is None


def test_cookie_value_format_one_dot_route_last_signature_before_dot() -> None:
    signer = ids.CookieSigner(("secret",))
    token = ids.new_token()
    value = signer.cookie_value(token, ROUTE)
    assert value.count(".") == 1
    signed, route = value.split(".")
    assert route == ROUTE
    tok, sep, sig = signed.partition(ids.SIGN_SEP)
    assert (tok, sep) == (token, "~")
    assert sig and re.fullmatch(r"[A-Za-z0-9_-]+", sig)
    # What every load balancer does: split on the dot, take the last field.
    assert value.split(".")[-1] == ROUTE
    # Legal cookie-octets only (RFC 6265): no quote, comma, semicolon, backslash, space.
    assert re.fullmatch(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]+", value)
    assert signer.verify(value) == (token, ROUTE, False)


def test_signature_is_an_itsdangerous_hmac_of_the_token() -> None:
    signer = ids.CookieSigner(("k1",))
    token = ids.new_token()
    value = signer.cookie_value(token, ROUTE)
    import hashlib

    reference = itsdangerous.Signer("k1", salt="clustersess.cookie", sep="~", digest_method=hashlib.sha256)
    assert reference.unsign(value.split(".")[0]) == token.encode()


def _flip(ch: str) -> str:
    return "B" if ch != "B" else "C"


def test_tampered_cookies_are_rejected() -> None:
    signer = ids.CookieSigner(("secret",))
    token = ids.new_token()
    value = signer.cookie_value(token, ROUTE)
    signed, route = value.split(".")
    tok, sig = signed.split("~")
    other = ids.new_token()
    forged = [
        f"{other}~{sig}.{route}",  # someone else's signature on a chosen token
        f"{tok[:-1]}{_flip(tok[-1])}~{sig}.{route}",  # token edited
        f"{tok}~{sig[:-1]}{_flip(sig[-1])}.{route}",  # signature edited
        f"{tok}~{sig[:10]}.{route}",  # signature truncated
        f"{tok}.{route}",  # unsigned bare ID
        f"{tok}~.{route}",
        f"{tok}~{sig}",  # no route
        f"{tok}~{sig}.{route}.{route}",  # two dots
        f"{tok}.{sig}.{route}",  # itsdangerous' default separator
        ids.CookieSigner(("other secret",)).cookie_value(token, ROUTE),  # wrong key
        value + "x" * 5000,
        "",
    ]
    for bad in forged:
        assert signer.verify(bad) is None, bad


def test_route_is_a_routing_hint_not_part_of_the_signature() -> None:
    # Documented design: a client that edits the route asks another node to take the
    # session over; the token stays authenticated.
    signer = ids.CookieSigner(("secret",))
    token = ids.new_token()
    value = signer.cookie_value(token, "node1")
    moved = value.rsplit(".", 1)[0] + ".node2"
    assert signer.verify(moved) == (token, "node2", False)


def test_key_rotation_old_key_accepted_and_flagged_for_resign() -> None:
    token = ids.new_token()
    old_cookie = ids.CookieSigner(("old",)).cookie_value(token, ROUTE)
    rotated = ids.CookieSigner(("old", "new"))
    result = rotated.verify(old_cookie)
    assert result is not None and result.resign is True and result.token == token
    fresh = rotated.cookie_value(token, ROUTE)
    assert fresh != old_cookie
    assert rotated.verify(fresh) == (token, ROUTE, False)
    # A node that dropped the old key no longer accepts it.
    assert ids.CookieSigner(("new",)).verify(old_cookie) is None
    # A node that only knows the old key does not accept the new signature.
    assert ids.CookieSigner(("old",)).verify(fresh) is None


def test_verify_cache_never_admits_a_failed_value() -> None:
    signer = ids.CookieSigner(("secret",))
    token = ids.new_token()
    bad = f"{token}~{'A' * 43}.{ROUTE}"
    for _ in range(3):
        assert signer.verify(bad) is None
    good = signer.cookie_value(token, ROUTE)
    for _ in range(3):
        assert signer.verify(good) == (token, ROUTE, False)


def test_current_token_answers_only_for_cookies_this_node_would_issue() -> None:
    token = ids.new_token()
    signer = ids.CookieSigner(("old", "new"), route="node1")
    mine = signer.cookie_value(token, "node1")
    assert signer.current_token(mine) == token  # issued here: known at once
    other = ids.CookieSigner(("new",), route="node2").cookie_value(token, "node2")
    assert signer.verify(other) is not None and signer.current_token(other) is None  # another route
    stale = ids.CookieSigner(("old",)).cookie_value(token, "node1")
    assert signer.verify(stale) is not None and signer.current_token(stale) is None  # needs re-signing
    fresh = ids.CookieSigner(("new",), route="node1").cookie_value(ids.new_token(), "node1")
    assert signer.current_token(fresh) is None  # valid, but never verified here yet
    assert signer.verify(fresh) is not None and signer.current_token(fresh) is not None
    assert signer.current_token("garbage") is None and signer.verify("garbage") is None


def test_current_token_forgets_with_the_bounded_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_CACHE_SIZE", 4)
    signer = ids.CookieSigner(("k",), route="node1")
    cookies = [signer.cookie_value(ids.new_token(), "node1") for _ in range(9)]
    known = [c for c in cookies if signer.current_token(c) is not None]
    assert 0 < len(known) <= 4 and known == cookies[-len(known) :]  # the newest survive
    assert all(signer.verify(c) is not None for c in cookies)  # evicted ones verify again
