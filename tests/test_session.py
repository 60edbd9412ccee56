"""The framework-free core: SessionManager and Session, driven directly with a FakeClock."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from typing import Any

import pytest

from clustersess import (
    Config,
    FakeClock,
    SessionEvent,
    SessionListener,
    SessionManager,
    SessionTooLarge,
    SessionValueError,
    ids,
)
from clustersess.session import Session
from tests.listeners import Recorder
from tests.utils import DELETED, cookie_after

SECRET = "core-test-secret"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def manager(clock: FakeClock, recorder: Recorder) -> SessionManager:
    return SessionManager(
        Config(secret_key=SECRET, node_name="node1", max_inactive=600), clock=clock, listeners=[recorder]
    )


async def req(
    manager: SessionManager, cookie: str | None, action: Callable[[Session], Any] | None = None
) -> tuple[str | None, Session]:
    """One request: open, run ``action`` on the session, close. Returns (cookie out, session)."""
    handle = await manager.open(cookie)
    if action is not None:
        action(handle.session)
    out = await cookie_after(manager, handle)
    return out, handle.session


def _set(**values: Any) -> Callable[[Session], None]:
    return lambda s: s.update(values)


async def test_new_session_stores_nothing_until_written(manager: SessionManager) -> None:
    out, s = await req(manager, None, lambda s: s.get("anything"))
    assert out is None
    assert s.is_new
    assert manager.status()["sessions_owned"] == 0
    parsed = ids.parse_id(s.id)
    assert parsed is not None and parsed.route == "node1"


async def test_written_session_gets_a_signed_cookie_and_is_found_again(
    manager: SessionManager, clock: FakeClock
) -> None:
    out, s = await req(manager, None, _set(user="ann"))
    assert out is not None and out != DELETED
    assert manager.signer.verify(out) is not None
    assert out.count(".") == 1 and out.endswith(".node1")
    assert out.split("~")[0] == s.id.split(".")[0]
    assert s.created == clock.time()
    assert manager.status()["sessions_owned"] == 1

    clock.advance(5)
    out2, s2 = await req(manager, out, lambda s: s["user"])
    assert out2 is None  # nothing changed, cookie unchanged: no Set-Cookie
    assert s2.id == s.id and not s2.is_new
    assert dict(s2) == {"user": "ann"}
    assert s2.last_accessed == clock.time() and s2.created == clock.time() - 5


async def test_one_live_object_per_session(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(a=1))
    h1 = await manager.open(out)
    h2 = await manager.open(out)
    assert h1.session is h2.session
    await cookie_after(manager, h1)
    await cookie_after(manager, h2)


@pytest.mark.parametrize(
    "make_cookie",
    [
        pytest.param(lambda m: m.signer.cookie_value(ids.new_token(), "node1"), id="unknown-but-signed"),
        pytest.param(lambda m: f"{ids.new_token()}~{'A' * 43}.node1", id="bad-signature"),
        pytest.param(lambda m: ids.CookieSigner(("other",)).cookie_value(ids.new_token(), "node1"), id="other-key"),
        pytest.param(lambda m: f"{ids.new_token()}.node1", id="unsigned-id"),
        pytest.param(lambda m: "garbage", id="garbage"),
    ],
)
async def test_strict_mode_never_adopts_a_presented_id(
    manager: SessionManager, make_cookie: Callable[[SessionManager], str]
) -> None:
    cookie = make_cookie(manager)
    presented = cookie.split("~")[0].split(".")[0]
    out, s = await req(manager, cookie, lambda s: s.get("x"))
    assert s.is_new and presented not in s.id
    assert out is None  # read only: nothing stored, no cookie
    assert manager.status()["sessions_owned"] == 0
    out, s = await req(manager, cookie, _set(x=1))
    assert out is not None and presented not in out and presented not in s.id
    assert manager.status()["sessions_owned"] == 1


async def test_rejected_cookies_are_counted(manager: SessionManager) -> None:
    await req(manager, "garbage")
    await req(manager, manager.signer.cookie_value(ids.new_token(), "node1"))
    stats = manager.status()["stats"]
    assert stats["rejected_cookies"] == 1
    assert stats["unknown_sessions"] == 1


async def test_key_rotation_accepts_old_key_and_resigns(clock: FakeClock) -> None:
    old = SessionManager(Config(secret_key=("k-old",)), clock=clock)
    out, s = await req(old, None, _set(n=1))
    assert out is not None
    # The node restarts with a new signing key appended; the stored session is the same.
    new = SessionManager(Config(secret_key=("k-old", "k-new")), clock=clock)
    new.store = old.store
    out2, s2 = await req(new, out, lambda s: s["n"])
    assert s2.id == s.id and dict(s2) == {"n": 1}
    assert out2 is not None and out2 != out  # re-signed although nothing changed
    assert out2 == ids.CookieSigner(("k-new",)).cookie_value(s.id.split(".")[0], "node1")
    out3, _ = await req(new, out2, lambda s: s["n"])
    assert out3 is None


async def test_rotate_new_token_same_data_old_id_dead(manager: SessionManager, recorder: Recorder) -> None:
    out, s = await req(manager, None, _set(user="ann", cart=[1]))
    old_id = s.id
    out2, s2 = await req(manager, out, lambda s: s.rotate())
    assert out2 is not None and out2 != out
    assert s2.id != old_id and s2.id.endswith(".node1")
    assert dict(s2) == {"user": "ann", "cart": [1]}
    # The old cookie is dead: strict mode gives a fresh, empty session.
    _, s3 = await req(manager, out, lambda s: s.get("user"))
    assert s3.is_new and dict(s3) == {} and s3.id not in (old_id, s2.id)
    # The new cookie carries the data.
    out4, s4 = await req(manager, out2, lambda s: s.get("user"))
    assert out4 is None and s4.id == s2.id and s4["user"] == "ann"
    assert manager.status()["sessions_owned"] == 1
    assert manager.status()["stats"]["sessions_rotated"] == 1


async def test_rotate_then_write_in_same_request(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(a=1))

    def login(s: Session) -> None:
        s.rotate()
        s["user"] = "bob"

    out2, _ = await req(manager, out, login)
    assert out2 is not None and out2 != out
    _, s3 = await req(manager, out2)
    assert dict(s3) == {"a": 1, "user": "bob"}


async def test_invalidate_kills_old_id_and_deletes_cookie(manager: SessionManager, recorder: Recorder) -> None:
    out, s = await req(manager, None, _set(user="ann"))
    old_id = s.id
    out2, s2 = await req(manager, out, lambda s: s.invalidate())
    assert out2 == DELETED
    assert dict(s2) == {} and s2.id != old_id
    assert manager.status()["sessions_owned"] == 0
    _, s3 = await req(manager, out)
    assert s3.is_new and s3.id != old_id and dict(s3) == {}
    destroyed = [(e, r) for k, e, r in recorder.events if k == "destroyed"]
    assert len(destroyed) == 1
    event, reason = destroyed[0]
    assert reason == "invalidated" and event.session_id == old_id and event.data == {"user": "ann"}
    assert not event.replicated and event.node == "node1"


async def test_invalidate_then_write_starts_a_new_session(manager: SessionManager) -> None:
    out, s = await req(manager, None, _set(user="ann"))
    old_id = s.id

    def relogin(s: Session) -> None:
        s.invalidate()
        s["user"] = "bob"

    out2, s2 = await req(manager, out, relogin)
    assert out2 not in (None, DELETED, out)
    assert s2.id != old_id
    _, s3 = await req(manager, out2)
    assert dict(s3) == {"user": "bob"}
    _, s4 = await req(manager, out)
    assert s4.is_new


async def test_invalidate_of_a_new_session_sends_no_cookie(manager: SessionManager) -> None:
    out, _ = await req(manager, None, lambda s: s.invalidate())
    assert out is None


async def test_expiry_on_access(manager: SessionManager, clock: FakeClock, recorder: Recorder) -> None:
    out, s = await req(manager, None, _set(a=1))
    clock.advance(599)
    _, s2 = await req(manager, out)
    assert s2.id == s.id  # still alive, and the access slid the window
    clock.advance(599)
    _, s3 = await req(manager, out)
    assert s3.id == s.id
    clock.advance(601)
    _, s4 = await req(manager, out)
    assert s4.is_new and s4.id != s.id and dict(s4) == {}
    assert manager.status()["sessions_owned"] == 0
    assert ("destroyed:expired") in recorder.kinds()
    assert manager.status()["stats"]["sessions_expired"] == 1


async def test_expiry_by_sweep(manager: SessionManager, clock: FakeClock, recorder: Recorder) -> None:
    idle, s_idle = await req(manager, None, _set(a=1))
    busy, s_busy = await req(manager, None, _set(b=2))
    clock.advance(400)
    await req(manager, busy)  # touched
    clock.advance(300)
    manager.sweep()
    assert manager.status()["sessions_owned"] == 1
    destroyed = [(e.session_id, r, e.data) for k, e, r in recorder.events if k == "destroyed"]
    assert destroyed == [(s_idle.id, "expired", {"a": 1})]
    _, s = await req(manager, idle)
    assert s.is_new
    _, s = await req(manager, busy)
    assert s.id == s_busy.id


async def test_a_sweep_pass_tells_its_listeners_in_slices(
    manager: SessionManager, clock: FakeClock, recorder: Recorder
) -> None:
    """A listener decodes each expiring session for its event: 50,000 told in one piece
    held the event loop for 1.8 s. The pass gives the loop back between slices."""
    from clustersess import pacing

    n = 3 * pacing.CAP + 10
    for i in range(n):
        await req(manager, None, _set(i=i))
    clock.advance(10_000)
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(sum(1 for k, _, r in recorder.events if k == "destroyed"))
            await asyncio.sleep(0)

    watcher = asyncio.get_running_loop().create_task(watch())
    await manager.sweep_pass()
    watcher.cancel()
    destroyed = [e.data["i"] for k, e, r in recorder.events if k == "destroyed" and r == "expired"]
    assert sorted(destroyed) == list(range(n))
    assert any(0 < c < n for c in seen), "every event was delivered in one turn of the loop"
    assert manager.status()["sessions_owned"] == 0


async def test_sweep_spares_sessions_in_use(manager: SessionManager, clock: FakeClock) -> None:
    out, _ = await req(manager, None, _set(a=1))
    handle = await manager.open(out)
    clock.advance(10_000)
    manager.sweep()
    assert manager.status()["sessions_owned"] == 1
    handle.session["a"] = 2
    await cookie_after(manager, handle)


async def test_background_sweeper_runs_between_start_and_stop(clock: FakeClock, recorder: Recorder) -> None:
    manager = SessionManager(
        Config(secret_key=SECRET, max_inactive=60, sweep_interval=0.01), clock=clock, listeners=[recorder]
    )
    await manager.start()
    try:
        _, _ = await req(manager, None, _set(a=1))
        clock.advance(61)
        for _ in range(200):
            if manager.status()["sessions_owned"] == 0:
                break
            await asyncio.sleep(0.01)
        assert manager.status()["sessions_owned"] == 0
        assert "destroyed:expired" in recorder.kinds()
    finally:
        await manager.stop()
    await manager.stop()  # idempotent


async def test_nested_in_place_mutation_is_detected(manager: SessionManager, recorder: Recorder) -> None:
    out, _ = await req(manager, None, _set(cart=[], prefs={"theme": "dark"}))
    out2, _ = await req(manager, out, lambda s: s["cart"].append("apple"))
    assert out2 is None  # same cookie; the change is stored server side
    out3, _ = await req(manager, out, lambda s: s["prefs"].__setitem__("theme", "light"))
    assert out3 is None
    # A fresh manager view of the stored JSON shows both changes.
    entry = next(iter(manager.store.owned.values()))
    from clustersess import codec

    assert codec.decode(entry.payload) == {"cart": ["apple"], "prefs": {"theme": "light"}}
    assert recorder.kinds() == ["created", "changed", "changed"]
    assert recorder.events[1][1].data["cart"] == ["apple"]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s.pop("a"), id="pop"),
        pytest.param(lambda s: s.__delitem__("a"), id="del"),
        pytest.param(lambda s: s.clear(), id="clear"),
        pytest.param(lambda s: s.popitem(), id="popitem"),
        pytest.param(lambda s: s.setdefault("z", 0), id="setdefault"),
        pytest.param(lambda s: s.__ior__({"y": 1}), id="ior"),
    ],
)
async def test_every_dict_mutation_is_detected(manager: SessionManager, mutate: Callable[[Session], Any]) -> None:
    out, _ = await req(manager, None, _set(a=1))
    _, s = await req(manager, out, mutate)
    expected = dict(s)
    entry = manager.store.owned.get(s.id.split(".")[0])
    from clustersess import codec

    stored = codec.decode(entry.payload) if entry is not None else {}
    assert stored == expected and stored != {"a": 1}


async def test_read_only_request_writes_nothing(manager: SessionManager, recorder: Recorder) -> None:
    out, _ = await req(manager, None, _set(a={"b": [1, 2]}))
    entry = next(iter(manager.store.owned.values()))
    version, commits = entry.version, manager.stats.commits
    out2, _ = await req(manager, out, lambda s: (s["a"]["b"][0], list(s.items()), s.get("missing")))
    assert out2 is None
    assert entry.version == version and manager.stats.commits == commits
    assert recorder.kinds() == ["created"]


async def test_bad_value_raises_type_error_naming_key_at_assignment(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(a=1))
    handle = await manager.open(out)
    with pytest.raises(TypeError, match="'when'") as info:
        handle.session["when"] = datetime.datetime.now()
    assert isinstance(info.value, SessionValueError) and info.value.key == "when"
    assert "JSON" in str(info.value)
    with pytest.raises(TypeError, match="'s'"):
        handle.session.update(s={1, 2})
    with pytest.raises(TypeError, match="'f'"):
        handle.session.setdefault("f", float("nan"))
    with pytest.raises(TypeError):
        handle.session[1] = "x"  # type: ignore[index]
    assert "when" not in handle.session
    assert await cookie_after(manager, handle) is None


async def test_nested_bad_value_fails_the_commit_and_keeps_last_good_state(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(cart=["ok"], n=1))
    handle = await manager.open(out)
    handle.session["n"] = 2
    handle.session["cart"].append(object())
    with pytest.raises(TypeError, match="'cart'"):
        await cookie_after(manager, handle)
    _, s = await req(manager, out)
    assert dict(s) == {"cart": ["ok"], "n": 1}
    assert manager.status()["stats"]["bad_values"] == 1


async def test_a_login_whose_value_cannot_be_stored_keeps_the_old_id_and_its_session(
    manager: SessionManager,
) -> None:
    out, s = await req(manager, None, _set(user="ann", cart=[]))
    handle = await manager.open(out)
    handle.session.rotate()
    handle.session["cart"].append(object())  # found only at commit
    with pytest.raises(TypeError, match="'cart'"):
        await cookie_after(manager, handle)
    # Nothing was stored, the rotation included: the cookie the client holds still works.
    out2, s2 = await req(manager, out)
    assert out2 is None and s2.id == s.id and dict(s2) == {"user": "ann", "cart": []}
    assert not manager.store.tombstones and not manager.store.rotating
    assert manager.status()["stats"]["sessions_rotated"] == 0


async def test_size_limit(clock: FakeClock) -> None:
    manager = SessionManager(Config(secret_key=SECRET, max_session_size=200), clock=clock)
    out, _ = await req(manager, None, _set(small="x"))
    handle = await manager.open(out)
    handle.session["big"] = "y" * 500
    with pytest.raises(SessionTooLarge) as info:
        await cookie_after(manager, handle)
    assert info.value.limit == 200 and info.value.size > 500
    assert "max_session_size" in str(info.value)
    _, s = await req(manager, out)
    assert dict(s) == {"small": "x"}
    # A brand-new session that is too big is not stored at all.
    handle = await manager.open(None)
    handle.session["big"] = "y" * 500
    with pytest.raises(SessionTooLarge):
        await cookie_after(manager, handle)
    assert manager.status()["sessions_owned"] == 1


async def test_abandoned_request_drops_its_changes(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(a=1))
    handle = await manager.open(out)
    handle.session["a"] = 99
    manager.abandon(handle)
    manager.abandon(handle)  # idempotent
    _, s = await req(manager, out)
    assert dict(s) == {"a": 1}


async def test_64_concurrent_increments_on_one_session(manager: SessionManager) -> None:
    out, _ = await req(manager, None, _set(n=0))

    async def incr() -> None:
        handle = await manager.open(out)
        await asyncio.sleep(0)
        value = handle.session["n"]
        handle.session["n"] = value + 1
        await asyncio.sleep(0)
        await cookie_after(manager, handle)

    await asyncio.gather(*(incr() for _ in range(64)))
    _, s = await req(manager, out)
    assert s["n"] == 64


async def test_listeners_fire_and_a_failing_listener_breaks_nothing(clock: FakeClock) -> None:
    recorder = Recorder()

    class Broken(SessionListener):
        def created(self, event: SessionEvent) -> None:
            raise RuntimeError("listener bug")

    manager = SessionManager(Config(secret_key=SECRET), clock=clock, listeners=[Broken(), recorder])
    out, s = await req(manager, None, _set(a=1))
    sid = s.id
    await req(manager, out, _set(a=2))
    await req(manager, out, lambda s: s.invalidate())
    assert recorder.kinds() == ["created", "changed", "destroyed:invalidated"]
    assert [e.data for _, e, _ in recorder.events] == [{"a": 1}, {"a": 2}, {"a": 2}]
    assert [e.session_id for _, e, _ in recorder.events] == [sid, sid, sid]
    assert manager.status()["stats"]["listener_errors"] == 1


def test_status_is_json_able(manager: SessionManager) -> None:
    import json

    status = json.loads(json.dumps(manager.status()))
    assert status["node"] == "node1" and status["clustered"] is False and status["members"] == []
    assert "stats" in status
