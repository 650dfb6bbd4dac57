"""GatherTracker: events and numbers in, decisions out; no sockets, no sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.pool.tracker import GatherTracker, MemberInfo, Outcome

A1 = MemberInfo("a1", "10.0.0.1", 11)
A2 = MemberInfo("a2", "10.0.0.1", 12)
B1 = MemberInfo("b1", "10.0.0.2", 21)
B2 = MemberInfo("b2", "10.0.0.2", 22)
BID = "bid-1"


def two_hosts(quorum: int | None = None) -> GatherTracker:
    t = GatherTracker(BID, deadline=10.0, quorum=quorum)
    t.on_hosts(BID, ["10.0.0.1", "10.0.0.2"], {}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1, A2], 0.0)
    t.on_expect(BID, "10.0.0.2", [B1, B2], 0.1)
    return t


def outcomes(t: GatherTracker) -> dict[str, Outcome]:
    return {m.member.id: m.outcome for m in t.result().members}


def test_nothing_is_complete_before_the_host_list() -> None:
    t = GatherTracker(BID, deadline=10.0)
    assert not t.complete
    assert not t.done
    assert t.timeout(4.0) == 6.0


def test_complete_when_every_member_replied() -> None:
    t = two_hosts()
    for i, m in enumerate([A1, A2, B1, B2]):
        assert not t.complete
        assert t.on_reply(BID, m.id, f"r{i}".encode(), 1.0)
    assert t.complete and t.done
    result = t.result()
    assert result.complete
    assert result.replies[B2] == b"r3"
    assert result.counts[Outcome.REPLIED] == 4
    assert result.unreachable_hosts == ()


def test_host_without_member_list_keeps_the_gather_open() -> None:
    t = GatherTracker(BID, deadline=10.0)
    t.on_hosts(BID, ["10.0.0.1", "10.0.0.2"], {}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1], 0.0)
    t.on_reply(BID, "a1", b"x", 0.5)
    assert not t.complete
    t.on_expect(BID, "10.0.0.2", [], 0.6)
    assert t.complete


def test_duplicate_reply_counts_once_and_first_wins() -> None:
    t = two_hosts()
    assert t.on_reply(BID, "a1", b"first", 1.0)
    assert not t.on_reply(BID, "a1", b"second", 1.1)
    assert not t.on_failed(BID, "a1", "late failure", 1.2)
    assert t.result().replies[A1] == b"first"
    assert t.replied == 1


def test_member_listed_twice_counts_once() -> None:
    t = GatherTracker(BID, deadline=10.0)
    t.on_hosts(BID, ["10.0.0.1"], {}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1, A1, A2], 0.0)
    assert len(t.result().members) == 2


def test_event_for_another_broadcast_is_dropped() -> None:
    t = two_hosts()
    assert not t.on_reply("bid-0", "a1", b"late", 1.0)
    assert not t.on_failed("bid-0", "a2", "x", 1.0)
    assert not t.on_host_lost("bid-0", "10.0.0.2", "x", 1.0)
    assert set(outcomes(t).values()) == {Outcome.PENDING}


def test_reply_from_unexpected_member_is_dropped() -> None:
    t = two_hosts()
    assert not t.on_reply(BID, "stranger", b"x", 1.0)
    assert len(t.result().members) == 4


def test_failed_and_undeliverable_settle_members() -> None:
    t = two_hosts()
    t.on_reply(BID, "a1", b"x", 1.0)
    t.on_failed(BID, "a2", "heartbeats stopped", 1.0)
    t.on_undeliverable(BID, "b1", "not connected", 1.0)
    t.on_reply(BID, "b2", b"y", 1.0)
    assert t.complete
    assert outcomes(t) == {
        "a1": Outcome.REPLIED,
        "a2": Outcome.FAILED,
        "b1": Outcome.UNDELIVERABLE,
        "b2": Outcome.REPLIED,
    }
    reasons = {m.member.id: m.reason for m in t.result().members}
    assert reasons["a2"] == "heartbeats stopped"


def test_deadline_times_out_pending_members_and_names_working_ones() -> None:
    t = two_hosts()
    t.on_reply(BID, "a1", b"x", 1.0)
    t.on_working(BID, "a2", 2.0)
    t.tick(9.99)
    assert not t.complete
    t.tick(10.0)
    assert t.complete
    result = t.result()
    timed_out = {m.member.id: m for m in result.with_outcome(Outcome.TIMED_OUT)}
    assert set(timed_out) == {"a2", "b1", "b2"}
    assert timed_out["a2"].worked and "working" in timed_out["a2"].reason
    assert not timed_out["b1"].worked
    # Nothing changes after the deadline, not even a reply in the same tick.
    assert not t.on_reply(BID, "b1", b"late", 10.1)


def test_deadline_with_silent_local_master() -> None:
    t = GatherTracker(BID, deadline=1.0)
    t.tick(1.0)
    assert t.complete
    assert t.result().unreachable_hosts[0].reason.startswith("local master")


def test_host_that_never_lists_members_is_unreachable_at_deadline() -> None:
    t = GatherTracker(BID, deadline=5.0)
    t.on_hosts(BID, ["10.0.0.1", "10.0.0.2"], {"10.0.0.3": "no live master"}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1], 0.0)
    t.on_reply(BID, "a1", b"x", 0.1)
    t.tick(5.0)
    hosts = {u.host: u.reason for u in t.result().unreachable_hosts}
    assert set(hosts) == {"10.0.0.2", "10.0.0.3"}
    assert hosts["10.0.0.3"] == "no live master"


def test_host_lost_before_listing_is_unreachable_after_fails_members() -> None:
    t = GatherTracker(BID, deadline=10.0)
    t.on_hosts(BID, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], {}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1], 0.0)
    t.on_expect(BID, "10.0.0.2", [B1, B2], 0.0)
    t.on_reply(BID, "b1", b"x", 0.5)
    t.on_host_lost(BID, "10.0.0.2", "master lost", 1.0)
    t.on_host_lost(BID, "10.0.0.3", "master lost", 1.0)
    assert outcomes(t)["b1"] is Outcome.REPLIED
    assert outcomes(t)["b2"] is Outcome.FAILED
    assert [u.host for u in t.result().unreachable_hosts] == ["10.0.0.3"]
    t.on_reply(BID, "a1", b"y", 1.1)
    assert t.complete


def test_master_lost_settles_everything() -> None:
    t = GatherTracker(BID, deadline=10.0)
    t.on_hosts(BID, ["10.0.0.1", "10.0.0.2"], {}, 0.0)
    t.on_expect(BID, "10.0.0.1", [A1, A2], 0.0)
    t.on_reply(BID, "a1", b"x", 0.1)
    t.on_master_lost(BID, "local master changed", 0.2)
    assert t.complete
    assert outcomes(t) == {"a1": Outcome.REPLIED, "a2": Outcome.FAILED}
    assert t.result().unreachable_hosts[0].host == "10.0.0.2"


def test_quorum_returns_early_naming_the_rest_pending() -> None:
    t = two_hosts(quorum=2)
    t.on_reply(BID, "a1", b"x", 1.0)
    assert not t.done
    t.on_reply(BID, "b2", b"y", 1.0)
    assert t.done and not t.complete
    result = t.result()
    assert not result.complete and result.quorum == 2
    assert {m.member.id for m in result.with_outcome(Outcome.PENDING)} == {"a2", "b1"}
    assert t.timeout(1.0) == 0.0


def test_quorum_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GatherTracker(BID, 1.0, quorum=0)


def test_duplicate_host_list_is_ignored() -> None:
    t = two_hosts()
    assert not t.on_hosts(BID, ["10.0.0.9"], {}, 0.5)
    assert "10.0.0.9" not in {u.host for u in t.result().unreachable_hosts}


_events = st.lists(
    st.tuples(
        st.sampled_from(["reply", "failed", "undeliverable", "working", "lost"]),
        st.sampled_from(["a1", "a2", "b1", "b2", "zz"]),
        st.sampled_from([BID, "other"]),
    ),
    max_size=30,
)


@given(_events)
def test_every_member_ends_in_exactly_one_outcome(
    events: list[tuple[str, str, str]],
) -> None:
    t = two_hosts()
    first: dict[str, Outcome] = {}
    for kind, member, bid in events:
        if kind == "reply":
            t.on_reply(bid, member, member.encode(), 1.0)
        elif kind == "failed":
            t.on_failed(bid, member, "f", 1.0)
        elif kind == "undeliverable":
            t.on_undeliverable(bid, member, "u", 1.0)
        elif kind == "working":
            t.on_working(bid, member, 1.0)
        else:
            t.on_host_lost(bid, "10.0.0.2", "lost", 1.0)
        for m in t.result().members:
            if m.outcome is not Outcome.PENDING:
                first.setdefault(m.member.id, m.outcome)
    t.tick(10.0)
    assert t.complete
    result = t.result()
    assert len(result.members) == 4
    for m in result.members:
        assert m.outcome is not Outcome.PENDING
        if m.member.id in first:
            assert m.outcome is first[m.member.id]
        if m.outcome is Outcome.REPLIED:
            assert m.reply == m.member.id.encode()
