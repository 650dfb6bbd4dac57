"""The gather tracker: who was asked, who answered, and when a broadcast is over.

Theory of operation
-------------------
A broadcast fans out issuer -> local master -> (local members, remote
masters -> their members). The issuer cannot know the pool's membership in
advance, so the set it waits for is built from what the masters report:

1. The local master answers first with ``hosts``: every host it forwarded the
   broadcast to (itself included) and the hosts it knows of but could not
   reach. Until that arrives nothing is expected, so nothing can be complete.
2. Each forwarded-to master answers with ``expect``: the members it queued
   the request for. A host is *settled* once its ``expect`` arrived or it was
   declared lost.
3. Each expected member ends in exactly one outcome: replied, failed,
   timed out or undeliverable. ``WORKING`` keeps a member pending and is
   remembered only as evidence.

The gather is complete when the host list arrived, every host is settled and
every expected member has an outcome. With a quorum it is *done* earlier, as
soon as that many members replied; the rest are then reported pending.
Reaching the deadline settles everything still open: pending members become
timed out, hosts that never listed their members become unreachable.

The tracker is a plain object: events and ``now`` (a ``time.monotonic()``
value) go in, the state comes out. It opens no sockets and never sleeps.
Events for another broadcast id are dropped, and the first outcome of a
member wins, so late and duplicate replies can neither leak into a later
broadcast nor be counted twice.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "BroadcastResult",
    "GatherTracker",
    "MemberInfo",
    "MemberOutcome",
    "Outcome",
    "UnreachableHost",
]


@dataclasses.dataclass(frozen=True, order=True)
class MemberInfo:
    """One pool member: a unique id, the host address it runs on, its pid."""

    id: str
    host: str
    pid: int

    def to_wire(self) -> dict[str, object]:
        return {"id": self.id, "host": self.host, "pid": self.pid}

    @classmethod
    def from_wire(cls, data: Mapping[str, object]) -> MemberInfo:
        pid = data["pid"]
        if not isinstance(pid, int):
            raise ValueError(f"member pid {pid!r} is not an integer")
        return cls(id=str(data["id"]), host=str(data["host"]), pid=pid)


class Outcome(enum.Enum):
    """What became of one member's copy of a broadcast."""

    REPLIED = "replied"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    UNDELIVERABLE = "undeliverable"
    #: Only in a result returned early for a quorum: no outcome yet.
    PENDING = "pending"


@dataclasses.dataclass(frozen=True)
class MemberOutcome:
    member: MemberInfo
    outcome: Outcome
    reply: bytes | None = None
    #: Why it failed or could not be delivered; empty when it replied.
    reason: str = ""
    #: True when the member reported WORKING at least once.
    worked: bool = False


@dataclasses.dataclass(frozen=True)
class UnreachableHost:
    host: str
    reason: str


@dataclasses.dataclass(frozen=True)
class BroadcastResult:
    """Every member a broadcast was meant for, with its outcome.

    ``complete`` is true when every expected member has a final outcome;
    a quorum result may be returned before that, with the rest ``PENDING``.
    """

    broadcast_id: str
    members: tuple[MemberOutcome, ...]
    unreachable_hosts: tuple[UnreachableHost, ...]
    complete: bool
    quorum: int | None = None

    def with_outcome(self, outcome: Outcome) -> list[MemberOutcome]:
        return [m for m in self.members if m.outcome is outcome]

    @property
    def replies(self) -> dict[MemberInfo, bytes]:
        """Each replying member's reply."""
        return {
            m.member: m.reply
            for m in self.members
            if m.outcome is Outcome.REPLIED and m.reply is not None
        }

    @property
    def counts(self) -> dict[Outcome, int]:
        counts = dict.fromkeys(Outcome, 0)
        for m in self.members:
            counts[m.outcome] += 1
        return counts


@dataclasses.dataclass
class _Member:
    info: MemberInfo
    outcome: Outcome = Outcome.PENDING
    reply: bytes | None = None
    reason: str = ""
    worked: bool = False
    last_heard: float = 0.0


class GatherTracker:
    """Tracks one broadcast from the issuer's side.

    Every ``on_*`` method takes the broadcast id the event carried; an event
    for another id returns ``False`` and changes nothing.
    """

    def __init__(
        self,
        broadcast_id: str,
        deadline: float,
        quorum: int | None = None,
    ) -> None:
        if quorum is not None and quorum < 1:
            raise ValueError(f"quorum {quorum!r} must be at least 1")
        self.broadcast_id = broadcast_id
        self.deadline = deadline
        self.quorum = quorum
        self._hosts_known = False
        # host -> True once its member list arrived or it was settled otherwise
        self._hosts: dict[str, bool] = {}
        self._unreachable: dict[str, str] = {}
        self._members: dict[str, _Member] = {}
        self._expired = False

    # -- events ---------------------------------------------------------------

    def on_hosts(
        self,
        broadcast_id: str,
        forwarded: Iterable[str],
        unreachable: Mapping[str, str],
        now: float,
    ) -> bool:
        """The local master's answer: the hosts it forwarded to or could not."""
        if not self._accepts(broadcast_id) or self._hosts_known:
            return False
        self._hosts_known = True
        for host in forwarded:
            # An ``expect`` may overtake the host list only in theory; keep it.
            self._hosts.setdefault(host, False)
        for host, reason in unreachable.items():
            if host not in self._hosts:
                self._unreachable[host] = reason
        return True

    def on_expect(
        self, broadcast_id: str, host: str, members: Sequence[MemberInfo], now: float
    ) -> bool:
        """A master lists the members of ``host`` it queued the request for."""
        if not self._accepts(broadcast_id) or self._hosts.get(host):
            return False
        self._hosts[host] = True
        self._unreachable.pop(host, None)
        for info in members:
            # The same member listed twice (a stale route) still counts once.
            self._members.setdefault(info.id, _Member(info, last_heard=now))
        return True

    def on_working(self, broadcast_id: str, member_id: str, now: float) -> bool:
        member = self._pending(broadcast_id, member_id)
        if member is None:
            return False
        member.worked = True
        member.last_heard = now
        return True

    def on_reply(
        self, broadcast_id: str, member_id: str, reply: bytes, now: float
    ) -> bool:
        return self._settle(broadcast_id, member_id, Outcome.REPLIED, "", reply, now)

    def on_failed(
        self, broadcast_id: str, member_id: str, reason: str, now: float
    ) -> bool:
        return self._settle(broadcast_id, member_id, Outcome.FAILED, reason, None, now)

    def on_undeliverable(
        self, broadcast_id: str, member_id: str, reason: str, now: float
    ) -> bool:
        return self._settle(
            broadcast_id, member_id, Outcome.UNDELIVERABLE, reason, None, now
        )

    def on_host_lost(
        self, broadcast_id: str, host: str, reason: str, now: float
    ) -> bool:
        """The master of ``host`` is gone: settle everything still open there."""
        if not self._accepts(broadcast_id):
            return False
        changed = False
        if host in self._hosts and not self._hosts[host]:
            # It never listed its members: the whole host was out of reach.
            self._hosts[host] = True
            self._unreachable[host] = reason
            changed = True
        for member in self._members.values():
            if member.info.host == host and member.outcome is Outcome.PENDING:
                member.outcome = Outcome.FAILED
                member.reason = reason
                changed = True
        return changed

    def on_master_lost(self, broadcast_id: str, reason: str, now: float) -> bool:
        """The issuer's own master is gone: nothing more can arrive."""
        if not self._accepts(broadcast_id):
            return False
        if not self._hosts_known:
            self._hosts_known = True
        for host, listed in self._hosts.items():
            if not listed:
                self._hosts[host] = True
                self._unreachable[host] = reason
        for member in self._members.values():
            if member.outcome is Outcome.PENDING:
                member.outcome = Outcome.FAILED
                member.reason = reason
        return True

    def tick(self, now: float) -> None:
        """Apply the deadline; call whenever time may have passed."""
        if self._expired or now < self.deadline:
            return
        self._expired = True
        if self.complete:
            return
        if not self._hosts_known:
            self._hosts_known = True
            self._unreachable.setdefault("", "local master did not answer in time")
        for host, listed in self._hosts.items():
            if not listed:
                self._hosts[host] = True
                self._unreachable[host] = "no member list before the deadline"
        for member in self._members.values():
            if member.outcome is Outcome.PENDING:
                member.outcome = Outcome.TIMED_OUT
                member.reason = (
                    "still working at the deadline"
                    if member.worked
                    else "no reply before the deadline"
                )

    # -- state ------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every host settled and every expected member has an outcome."""
        return (
            self._hosts_known
            and all(self._hosts.values())
            and all(m.outcome is not Outcome.PENDING for m in self._members.values())
        )

    @property
    def replied(self) -> int:
        return sum(m.outcome is Outcome.REPLIED for m in self._members.values())

    @property
    def done(self) -> bool:
        """Complete, or the quorum of replies reached: the caller may return."""
        if self.complete:
            return True
        return self.quorum is not None and self.replied >= self.quorum

    @property
    def pending_members(self) -> list[MemberInfo]:
        return [m.info for m in self._members.values() if m.outcome is Outcome.PENDING]

    def timeout(self, now: float) -> float:
        """Seconds until the tracker needs ``tick`` again (0 when done)."""
        if self.done or self._expired:
            return 0.0
        return max(0.0, self.deadline - now)

    def result(self) -> BroadcastResult:
        members = tuple(
            MemberOutcome(m.info, m.outcome, m.reply, m.reason, m.worked)
            for m in sorted(self._members.values(), key=lambda m: m.info)
        )
        unreachable = tuple(
            UnreachableHost(host, reason)
            for host, reason in sorted(self._unreachable.items())
        )
        return BroadcastResult(
            self.broadcast_id, members, unreachable, self.complete, self.quorum
        )

    # -- helpers ----------------------------------------------------------------

    def _accepts(self, broadcast_id: str) -> bool:
        return broadcast_id == self.broadcast_id and not self._expired

    def _pending(self, broadcast_id: str, member_id: str) -> _Member | None:
        if not self._accepts(broadcast_id):
            return None
        member = self._members.get(member_id)
        if member is None or member.outcome is not Outcome.PENDING:
            return None
        return member

    def _settle(
        self,
        broadcast_id: str,
        member_id: str,
        outcome: Outcome,
        reason: str,
        reply: bytes | None,
        now: float,
    ) -> bool:
        member = self._pending(broadcast_id, member_id)
        if member is None:
            # Unknown member, duplicate or a second outcome: the first one wins.
            return False
        member.outcome = outcome
        member.reason = reason
        member.reply = reply
        member.last_heard = now
        return True
