"""Version vectors: bump, compare, merge, the untrusted-JSON parser, and conflict choice.

``choose`` decides which copy's data survive on every node, so besides the worked
examples it is held to properties over random sets of copies: every node must pick the
same winner whatever order it heard the copies in, the result must dominate every copy
(so no loser can outrank it later), and a copy that only lacks writes is never reported
as a discarded conflict.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersess import versions as v
from clustersess.config import ROUTE_RE
from clustersess.versions import Candidate, Order

PROPS = settings(max_examples=100, deadline=None, database=None)


# -- bump, total, dict form ------------------------------------------------------------------
def test_bump_counts_one_more_write_by_the_writer() -> None:
    assert v.bump(v.EMPTY, "n1") == ("n1", 1)
    assert v.bump(("n1", 1), "n1") == ("n1", 2)  # the one-writer fast path
    assert v.bump(("n1", 4), "n0") == ("n0", 1, "n1", 4)  # names stay sorted
    assert v.bump(("n1", 4), "n2") == ("n1", 4, "n2", 1)
    assert v.bump(("a", 1, "b", 2), "a") == ("a", 2, "b", 2)
    assert v.bump(("a", 1, "b", 2), "b") == ("a", 1, "b", 3)


def test_total_is_the_number_of_writes() -> None:
    assert v.total(v.EMPTY) == 0
    assert v.total(("a", 3)) == 3
    assert v.total(("a", 3, "b", 4)) == 7


def test_dict_form_is_sorted_and_drops_zero_counts() -> None:
    assert v.from_dict({"b": 2, "a": 1, "c": 0}) == ("a", 1, "b", 2)
    assert v.from_dict({}) == v.EMPTY
    assert v.as_dict(("a", 1, "b", 2)) == {"a": 1, "b": 2}
    assert v.as_dict(v.EMPTY) == {}


# -- compare / dominates ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ((), (), Order.EQUAL),
        (("a", 2), ("a", 2), Order.EQUAL),
        (("a", 1, "b", 1), ("a", 1, "b", 1), Order.EQUAL),
        (("a", 1), (), Order.NEWER),
        ((), ("a", 1), Order.OLDER),
        (("a", 2), ("a", 1), Order.NEWER),
        (("a", 1), ("a", 2), Order.OLDER),
        (("a", 1, "b", 1), ("a", 1), Order.NEWER),  # one more writer
        (("a", 1), ("a", 1, "b", 1), Order.OLDER),
        (("a", 2, "b", 1), ("a", 1, "b", 1), Order.NEWER),
        (("a", 1), ("b", 1), Order.CONCURRENT),  # disjoint writers
        (("a", 2, "b", 1), ("a", 1, "b", 2), Order.CONCURRENT),
        (("a", 5), ("a", 1, "b", 1), Order.CONCURRENT),  # more writes is not newer
    ],
)
def test_compare(a: v.VV, b: v.VV, order: Order) -> None:
    assert v.compare(a, b) is order
    assert v.dominates(a, b) is (order in (Order.EQUAL, Order.NEWER))


# -- merge -----------------------------------------------------------------------------------
def test_merge_is_the_element_wise_maximum() -> None:
    assert v.merge([]) == v.EMPTY
    assert v.merge([("a", 1)]) == ("a", 1)
    assert v.merge([("a", 2, "b", 1), ("a", 1, "b", 3), ("c", 1)]) == ("a", 2, "b", 3, "c", 1)
    assert v.merge(iter([("b", 1), ("a", 1)])) == ("a", 1, "b", 1)  # any iterable; sorted result


# -- JSON (untrusted input) ------------------------------------------------------------------
def test_json_form_round_trips_and_parses_to_the_canonical_tuple() -> None:
    vv = ("a", 1, "node_2", 2**53 - 1)
    assert v.to_json(vv) == {"a": 1, "node_2": 2**53 - 1}
    assert v.from_json(v.to_json(vv), ROUTE_RE) == vv
    assert v.from_json({"b": 1, "a": 2}, ROUTE_RE) == ("a", 2, "b", 1)  # sorted whatever the order
    assert v.from_json({}, ROUTE_RE) == v.EMPTY
    widest = {f"n{i}": 1 for i in range(v.MAX_WRITERS)}
    assert len(v.from_json(widest, ROUTE_RE)) == 2 * v.MAX_WRITERS


BAD_VECTORS: dict[str, Any] = {
    "null": None,
    "list": ["a", 1],
    "flat tuple form": ("a", 1),
    "string": "a=1",
    "number": 1,
    "too many names": {f"n{i}": 1 for i in range(v.MAX_WRITERS + 1)},
    "empty name": {"": 1},
    "name with colon": {"a:b": 1},
    "name with dot": {"a.b": 1},
    "name too long": {"a" * 33: 1},
    "name non-ascii": {"é": 1},
    "name with newline": {"a\n": 1},
    "count zero": {"a": 0},
    "count negative": {"a": -1},
    "count bool": {"a": True},
    "count float": {"a": 1.0},
    "count string": {"a": "1"},
    "count null": {"a": None},
    "count 2**53": {"a": 2**53},
    "count huge": {"a": 10**400},
}


@pytest.mark.parametrize("raw", list(BAD_VECTORS.values()), ids=list(BAD_VECTORS))
def test_bad_vectors_raise_value_error(raw: Any) -> None:
    with pytest.raises(ValueError):
        v.from_json(raw, ROUTE_RE)


def test_from_json_uses_the_given_name_pattern() -> None:
    with pytest.raises(ValueError):
        v.from_json({"a": 1}, re.compile("[b-z]+"))


# -- choose: worked examples -----------------------------------------------------------------
def cand(vv: v.VV, epoch: int = 0, owner: str = "n1", payload: bytes = b"{}") -> Candidate:
    return Candidate(vv, epoch, owner, payload, item=object())


def test_choose_one_copy() -> None:
    only = cand(("a", 1))
    assert v.choose([only]) == (only, ("a", 1), [])


def test_choose_the_dominating_copy_without_a_conflict() -> None:
    old, new = cand(("a", 1), epoch=9), cand(("a", 2), epoch=1)
    for order in ([old, new], [new, old]):
        winner, vv, losers = v.choose(order)
        # the epoch (ownership) does not outrank a write: adoption never beats a write
        assert winner is new and vv == ("a", 2) and losers == []


def test_choose_an_adopted_copy_loses_to_the_write_it_lacks() -> None:
    adopted = cand(("a", 3), epoch=5, owner="b")  # epoch moved on, no new write
    written = cand(("a", 4), epoch=4, owner="a")
    assert v.choose([adopted, written])[0] is written


def test_choose_equal_vectors_are_no_conflict() -> None:
    low, high = cand(("a", 1), epoch=1), cand(("a", 1), epoch=2)
    for order in ([low, high], [high, low]):
        winner, vv, losers = v.choose(order)
        assert winner is high and vv == ("a", 1) and losers == []


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # the higher epoch (the owner the cluster chose last), even with fewer writes
        (cand(("a", 1), epoch=2), cand(("b", 3), epoch=1, owner="z", payload=b"z")),
        # same epoch: more writes
        (cand(("a", 1, "b", 3), epoch=1), cand(("a", 2, "b", 1), epoch=1, owner="z", payload=b"z")),
        # then the owner name
        (cand(("a", 2), epoch=1, owner="b"), cand(("b", 2), epoch=1, owner="a", payload=b"z")),
        # then the data
        (cand(("a", 2), epoch=1, payload=b'{"x":2}'), cand(("b", 2), epoch=1, payload=b'{"x":1}')),
    ],
    ids=["epoch", "writes", "owner", "data"],
)
def test_choose_a_conflict_by_the_documented_order(a: Candidate, b: Candidate) -> None:
    for order in ([a, b], [b, a]):
        winner, vv, losers = v.choose(order)
        assert winner is a
        assert losers == [b]
        assert vv == v.merge([a.vv, b.vv])


def test_choose_dominated_copies_are_not_losers() -> None:
    base = cand(("a", 1))
    left, right = cand(("a", 2)), cand(("a", 1, "b", 2))
    stale_left = cand(("a", 2), epoch=0, payload=b"older data, same vector")
    winner, vv, losers = v.choose([base, left, right, stale_left])
    assert winner is right  # three writes against two
    assert losers == [left]  # the copy with the same vector as a loser is not a second loser
    assert vv == ("a", 2, "b", 2)


def test_choose_three_way_conflict() -> None:
    a, b, c = cand(("a", 1)), cand(("b", 2)), cand(("c", 1))
    winner, vv, losers = v.choose([a, b, c])
    assert winner is b
    assert {id(x) for x in losers} == {id(a), id(c)}
    assert vv == ("a", 1, "b", 2, "c", 1)


def test_choose_needs_a_copy() -> None:
    with pytest.raises(AssertionError):
        v.choose([])


# -- properties -------------------------------------------------------------------------------
NAMES = ["a", "b", "c", "d"]
VVS = st.dictionaries(st.sampled_from(NAMES), st.integers(1, 3), max_size=4).map(v.from_dict)
CANDIDATES = st.builds(
    Candidate, VVS, st.integers(0, 3), st.sampled_from(NAMES), st.sampled_from([b"{}", b'{"x":1}', b'{"x":2}'])
)


@PROPS
@given(VVS, VVS)
def test_compare_is_antisymmetric(a: v.VV, b: v.VV) -> None:
    mirror = {Order.EQUAL: Order.EQUAL, Order.NEWER: Order.OLDER, Order.OLDER: Order.NEWER}
    mirror[Order.CONCURRENT] = Order.CONCURRENT
    assert v.compare(b, a) is mirror[v.compare(a, b)]
    assert (v.compare(a, b) is Order.EQUAL) == (a == b)
    assert (v.dominates(a, b) and v.dominates(b, a)) == (a == b)


@PROPS
@given(VVS, VVS, VVS)
def test_dominates_is_a_partial_order(a: v.VV, b: v.VV, c: v.VV) -> None:
    assert v.dominates(a, a)
    if v.dominates(a, b) and v.dominates(b, c):
        assert v.dominates(a, c)


@PROPS
@given(VVS, st.sampled_from(NAMES))
def test_bump_is_newer_by_exactly_one_write(a: v.VV, name: str) -> None:
    bumped = v.bump(a, name)
    assert v.compare(bumped, a) is Order.NEWER
    assert v.total(bumped) == v.total(a) + 1
    assert v.as_dict(bumped)[name] == v.as_dict(a).get(name, 0) + 1
    assert bumped == v.from_dict(v.as_dict(bumped))  # canonical


@PROPS
@given(st.lists(VVS, max_size=5))
def test_merge_is_the_least_upper_bound(vectors: list[v.VV]) -> None:
    merged = v.merge(vectors)
    assert all(v.dominates(merged, x) for x in vectors)
    assert merged == v.merge(reversed(vectors)) == v.merge([*vectors, *vectors])
    assert merged == v.from_dict(v.as_dict(merged))
    # least: every entry comes from one of the inputs
    assert all(any(v.as_dict(x).get(k) == n for x in vectors) for k, n in v.as_dict(merged).items())


@PROPS
@given(VVS)
def test_json_round_trip(a: v.VV) -> None:
    assert v.from_json(v.to_json(a), ROUTE_RE) == a


def outcome(candidates: list[Candidate]) -> tuple[Any, ...]:
    winner, vv, losers = v.choose(candidates)
    return winner.rank(), winner.vv, vv, tuple(sorted(c.rank() for c in losers))


@PROPS
@given(st.lists(CANDIDATES, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_choose_is_deterministic_and_order_independent(candidates: list[Candidate], rnd: Any) -> None:
    expected = outcome(candidates)
    assert outcome(candidates) == expected
    shuffled = list(candidates)
    rnd.shuffle(shuffled)
    assert outcome(shuffled) == expected
    assert outcome(list(reversed(candidates))) == expected


@PROPS
@given(st.lists(CANDIDATES, min_size=1, max_size=5))
def test_choose_results_dominate_and_only_maximal_copies_lose(candidates: list[Candidate]) -> None:
    winner, vv, losers = v.choose(candidates)
    assert any(winner is c for c in candidates)
    assert all(v.dominates(vv, c.vv) for c in candidates), "the result outranks every copy"
    assert not any(v.compare(c.vv, winner.vv) is Order.NEWER for c in candidates), "the winner is maximal"
    for loser in losers:
        assert any(loser is c for c in candidates) and loser is not winner
        assert not any(v.compare(c.vv, loser.vv) is Order.NEWER for c in candidates), "a dominated copy lost"
        assert v.compare(loser.vv, winner.vv) is Order.CONCURRENT
    assert len({lo.vv for lo in losers}) == len(losers), "one loser per distinct vector"
    if not losers:
        assert vv == winner.vv
    # every maximal vector other than the winner's is reported as lost
    maximal = {c.vv for c in candidates if not any(v.compare(o.vv, c.vv) is Order.NEWER for o in candidates)}
    assert maximal == {winner.vv} | {lo.vv for lo in losers}


@PROPS
@given(st.lists(CANDIDATES, min_size=1, max_size=4))
def test_choose_is_final(candidates: list[Candidate]) -> None:
    # The merged result, offered again beside every loser, wins without a new conflict.
    winner, vv, _ = v.choose(candidates)
    result = Candidate(vv, winner.epoch + 1, winner.owner, winner.payload)
    again = v.choose([*candidates, result])
    assert again[0] is result
    assert again[2] == [] and again[1] == vv


def test_choose_order_independence_exhaustively_for_a_split() -> None:
    copies = [cand(("a", 2)), cand(("a", 1, "b", 1), epoch=2), cand(("a", 1)), cand(("b", 1), owner="b")]
    results = {outcome(list(p)) for p in itertools.permutations(copies)}
    assert len(results) == 1


def test_choose_breaks_a_tie_that_only_the_vectors_tell_apart() -> None:
    # Same epoch, owner, data and number of writes, different writers (found by Hypothesis).
    a = Candidate(("a", 1, "b", 1, "c", 1), 0, "a", b'{"x":1}')
    b = Candidate(("a", 1, "b", 1, "d", 1), 0, "a", b'{"x":1}')
    assert outcome([a, b]) == outcome([b, a])
    assert v.choose([a, b])[0].vv == v.choose([b, a])[0].vv == b.vv
