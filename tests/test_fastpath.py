"""The synchronous fast path (open_local / close_local) never hides a change."""

from __future__ import annotations

from typing import Any

import pytest

from clustersess import Config, SessionManager, codec
from clustersess.cookies import DELETE, KEEP, SET
from tests.utils import cookie_after


async def _stored(manager: SessionManager, **data: Any) -> str:
    handle = await manager.open(None)
    handle.session.update(data)
    cookie = await cookie_after(manager, handle)
    assert cookie
    return cookie


@pytest.fixture
def manager() -> SessionManager:
    return SessionManager(Config(secret_key=("k",)))


async def test_read_of_a_scalar_session_takes_the_fast_path_without_encoding(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    cookie = await _stored(manager, user="ann", n=1, ratio=0.5, ok=True, none=None)

    def no_encode(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("an unchanged scalar session must not be re-encoded")

    monkeypatch.setattr(codec, "encode", no_encode)
    handle = manager.open_local(cookie)
    assert handle is not None and handle.session["user"] == "ann"
    assert manager.close_local(handle)
    assert handle.closed and handle.session._entry.inflight == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.__setitem__("n", 2),
        lambda s: s.__delitem__("n"),
        lambda s: s.pop("n"),
        lambda s: s.popitem(),
        lambda s: s.update(m=3),
        lambda s: s.setdefault("new", 1),
        lambda s: s.__ior__({"m": 4}),
    ],
    ids=["setitem", "delitem", "pop", "popitem", "update", "setdefault", "ior"],
)
async def test_every_mutation_leaves_the_fast_path(manager: SessionManager, mutate: Any) -> None:
    cookie = await _stored(manager, n=1, keep="x")
    handle = manager.open_local(cookie)
    assert handle is not None
    before = handle.session._entry.version
    mutate(handle.session)
    assert not manager.close_local(handle)
    await cookie_after(manager, handle)
    assert handle.session._entry.version == before + 1


@pytest.mark.parametrize("end", [lambda s: s.clear(), lambda s: [s.pop(k) for k in list(s)]], ids=["clear", "emptied"])
async def test_clearing_or_emptying_leaves_the_fast_path_and_ends_the_session(
    manager: SessionManager, end: Any
) -> None:
    cookie = await _stored(manager, n=1, keep="x")
    handle = manager.open_local(cookie)
    assert handle is not None
    end(handle.session)
    assert not manager.close_local(handle)
    assert await manager.close(handle) is DELETE
    assert manager.open_local(cookie) is None and not manager.store.owned


async def test_nested_values_are_always_compared(manager: SessionManager) -> None:
    cookie = await _stored(manager, cart=[1])
    handle = manager.open_local(cookie)
    assert handle is not None
    assert not manager.close_local(handle)  # a list could have been changed in place
    await cookie_after(manager, handle)
    handle = manager.open_local(cookie)
    assert handle is not None
    handle.session["cart"].append(2)
    await cookie_after(manager, handle)
    handle = await manager.open(cookie)
    assert handle.session["cart"] == [1, 2] and handle.session._entry.version == 2
    await cookie_after(manager, handle)


async def test_unknown_or_foreign_cookies_take_the_full_path(manager: SessionManager) -> None:
    cookie = await _stored(manager, n=1)
    assert manager.open_local(cookie.rsplit(".", 1)[0] + ".node9") is None  # another owner
    assert manager.open_local("garbage") is None  # never verified
    other = SessionManager(Config(secret_key=("k",)))
    assert other.open_local(cookie) is None  # verified there, unknown here


async def test_a_session_is_fast_again_once_its_nested_values_are_gone(manager: SessionManager) -> None:
    cookie = await _stored(manager, n=1)
    handle = manager.open_local(cookie)
    assert handle is not None
    handle.session["cart"] = ["apple"]  # no longer provably immutable
    assert await cookie_after(manager, handle) is None
    handle = manager.open_local(cookie)
    assert handle is not None
    assert not manager.close_local(handle)
    del handle.session["cart"]
    await cookie_after(manager, handle)  # the commit recounts: scalars only again
    handle = manager.open_local(cookie)
    assert handle is not None
    assert manager.close_local(handle)
    assert dict(handle.session) == {"n": 1}


async def test_a_write_keeps_the_cookie_it_came_with(manager: SessionManager) -> None:
    cookie = await _stored(manager, n=1)
    handle = manager.open_local(cookie)
    assert handle is not None
    handle.session["n"] = 2
    assert manager.close_nowait(handle) is KEEP  # stored, and the cookie is still right
    handle = manager.open_local(cookie)
    assert handle is not None and handle.session["n"] == 2
    handle.session.rotate()
    assert manager.close_nowait(handle) is SET
    new = manager.cookie_value(handle)
    assert new != cookie  # rotated: the new ID must reach the client
    assert manager.open_local(cookie) is None
    stale = await manager.open(cookie)  # the old ID is dead: a fresh, empty session
    assert stale.session.is_new and not stale.session
    manager.abandon(stale)


async def test_close_nowait_is_refused_on_a_clustered_node() -> None:
    from clustersess.cluster import MemoryBus

    manager = SessionManager(Config(secret_key=("k",)), transport=MemoryBus().transport())
    handle = await manager.open(None)
    with pytest.raises(RuntimeError, match="await close"):
        manager.close_nowait(handle)
