"""Electing one master per pool and host, and replacing a hung one.

Theory of operation
-------------------
The members of a pool on one host share a runtime directory (host-local,
``Settings.runtime_dir``). In it, per pool:

``<pool>.lock``
    Whoever holds an exclusive ``flock`` on it is the master. The kernel
    drops the lock when the holder dies, so a crashed master frees the seat
    without anybody having to notice first.
``<pool>.master``
    The master record: endpoints, pid, process start time and epoch, written
    by the winner with temp file + ``os.replace`` so readers never see half
    of it. Epochs only grow: a new master takes the last record's epoch + 1.
``<pool>.members/<member id>``
    One file per live member (pid and start time), so voters know how many
    live members there are without asking the possibly hung master.
``<pool>.votes/<epoch>/<member id>``
    Votes that the master of ``epoch`` is hung (alive, lock held, silent).

A hung master keeps its lock, so the election cannot move on by itself.
Each member that has heard nothing from its master for the liveness window
votes. When the votes reach a majority of the live members other than the
master, the first voter to create ``<epoch>/kill.0`` (an exclusive link, so
exactly one) checks that the record's pid still has the recorded start time
(the pid was not reused by another process) and sends it SIGKILL. The lock
is freed and the ordinary election runs with epoch + 1. The claim names its
claimant (pid, start time) and when it was made; should the claimant die or
stall before the kill, any voter may claim again with ``kill.<n + 1>``, once
the claimant is gone or the liveness window has passed.

The decision rules are in :class:`MasterWatch` and :func:`kill_quorum`, pure
functions of what was observed and ``now``; the rest of this module is the
file system half.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import signal
import tempfile
from pathlib import Path

__all__ = [
    "Election",
    "MasterRecord",
    "MasterState",
    "MasterWatch",
    "kill_quorum",
    "process_start_time",
]

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot), or None.

    Together with the pid it names one process for good: a pid can be reused,
    the pair cannot.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after
    # the last ')' so field 3 is at index 0 and field 22 at index 19.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        # A zombie has exited and freed its locks; only its parent keeps it.
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_time``."""
    return process_start_time(pid) == start_time


@dataclasses.dataclass(frozen=True)
class MasterRecord:
    """What a master writes beside the lock for the members of its host."""

    host: str
    endpoint: str
    peer_endpoint: str
    pid: int
    start_time: int
    epoch: int
    member_id: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MasterRecord:
        data = json.loads(text)
        return cls(
            host=str(data["host"]),
            endpoint=str(data["endpoint"]),
            peer_endpoint=str(data["peer_endpoint"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            epoch=int(data["epoch"]),
            member_id=str(data["member_id"]),
        )


class MasterState(enum.Enum):
    """What a member believes about its host's master."""

    #: No record, or a record whose process is gone: try to take the lock.
    NONE = "none"
    #: Heard from within the liveness window.
    HEALTHY = "healthy"
    #: Not heard from yet, but recently (re)connected: give it the window.
    CONNECTING = "connecting"
    #: Process alive, silent for the liveness window: vote it hung.
    HUNG = "hung"


class MasterWatch:
    """A member's view of its master: pure, fed with observations and ``now``."""

    def __init__(self, liveness_timeout: float) -> None:
        self.liveness_timeout = liveness_timeout
        self.record: MasterRecord | None = None
        self._since = 0.0
        self._last_heard: float | None = None

    def observe_record(self, record: MasterRecord | None, now: float) -> bool:
        """A (possibly) new record; True when it names a different master."""
        if record == self.record:
            return False
        self.record = record
        self._since = now
        self._last_heard = None
        return True

    def heard(self, now: float) -> None:
        self._last_heard = now

    def silent_for(self, now: float) -> float:
        last = self._last_heard if self._last_heard is not None else self._since
        return now - last

    def state(self, now: float, process_alive: bool) -> MasterState:
        if self.record is None or not process_alive:
            return MasterState.NONE
        if self.silent_for(now) < self.liveness_timeout:
            if self._last_heard is None:
                return MasterState.CONNECTING
            return MasterState.HEALTHY
        return MasterState.HUNG


def kill_quorum(voters: set[str], live_members: set[str], master_id: str) -> bool:
    """True when live voters are a majority of the live members but the master."""
    electorate = live_members - {master_id}
    if not electorate:
        return False
    return len(voters & electorate) * 2 > len(electorate)


class Election:
    """The file-system side of one member's election in one pool.

    Used from the member's own thread only; the lock's file descriptor is
    held for as long as this member is master.
    """

    def __init__(self, runtime_dir: Path, pool: str, member_id: str) -> None:
        self.dir = Path(runtime_dir)
        self.pool = pool
        self.member_id = member_id
        self.lock_path = self.dir / f"{pool}.lock"
        self.record_path = self.dir / f"{pool}.master"
        self.members_dir = self.dir / f"{pool}.members"
        self.votes_dir = self.dir / f"{pool}.votes"
        self._lock_fd: int | None = None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.members_dir.mkdir(exist_ok=True)
        self.votes_dir.mkdir(exist_ok=True)

    # -- membership -------------------------------------------------------------

    def join(self, pid: int, start_time: int) -> None:
        _atomic_write(
            self.members_dir / self.member_id,
            json.dumps({"pid": pid, "start_time": start_time}),
        )

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.members_dir / self.member_id).unlink()

    def live_members(self) -> set[str]:
        """Ids of members whose process is alive; stale files are removed."""
        live = set()
        for path in self.members_dir.iterdir():
            if path.name.startswith("."):
                continue
            try:
                data = json.loads(path.read_text())
                alive = process_alive(int(data["pid"]), int(data["start_time"]))
            except (OSError, ValueError, KeyError):
                continue
            if alive:
                live.add(path.name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return live

    # -- the lock and the record -----------------------------------------------

    @property
    def is_master(self) -> bool:
        return self._lock_fd is not None

    def try_acquire(self) -> bool:
        """Take the lock without blocking; True when we are now the master."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._lock_fd = fd
        return True

    def lock_held_elsewhere(self) -> bool:
        """True when some other process holds the lock right now."""
        if self._lock_fd is not None:
            return False
        if self.try_acquire():
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read_record(self) -> MasterRecord | None:
        try:
            return MasterRecord.from_json(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as exc:
            log.warning("unreadable master record %s: %s", self.record_path, exc)
            return None

    def next_epoch(self) -> int:
        record = self.read_record()
        return 1 if record is None else record.epoch + 1

    def write_record(self, record: MasterRecord) -> None:
        if not self.is_master:
            raise RuntimeError(f"member {self.member_id!r} does not hold the lock")
        _atomic_write(self.record_path, record.to_json())

    # -- votes against a hung master -----------------------------------------

    def vote(self, epoch: int) -> None:
        path = self.votes_dir / str(epoch)
        path.mkdir(exist_ok=True)
        (path / self.member_id).touch()

    def votes(self, epoch: int) -> set[str]:
        path = self.votes_dir / str(epoch)
        try:
            names = [p.name for p in path.iterdir()]
        except FileNotFoundError:
            return set()
        # Kill claims and their temp files share the directory with the votes.
        return {n for n in names if not n.startswith((".", "kill."))}

    def claim_kill(self, epoch: int, now: float, stale_after: float) -> bool:
        """True for exactly one voter at a time, who then does the killing.

        ``now`` is a ``time.monotonic()`` value, comparable between the
        processes of one host. A claim older than ``stale_after`` seconds,
        or whose claimant has died, may be taken over: otherwise a voter
        that died between claiming and killing would leave the hung master
        in place for good.
        """
        path = self.votes_dir / str(epoch)
        path.mkdir(exist_ok=True)
        claims = sorted(
            int(p.name[5:])
            for p in path.iterdir()
            if p.name.startswith("kill.") and p.name[5:].isdigit()
        )
        if claims:
            latest = claims[-1]
            if not _claim_stale(path / f"kill.{latest}", now, stale_after):
                return False
            generation = latest + 1
        else:
            generation = 0
        pid = os.getpid()
        claim = json.dumps(
            {"pid": pid, "start_time": process_start_time(pid), "claimed_at": now}
        )
        # Written whole before it gets its name, so no reader sees half a claim;
        # link() fails if the name exists, so one of two racing voters wins.
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".claim.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(claim)
            os.link(tmp, path / f"kill.{generation}")
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def kill_master(self, record: MasterRecord) -> bool:
        """SIGKILL the recorded master if it is still that very process."""
        if not process_alive(record.pid, record.start_time):
            log.info("hung master pid %d already gone", record.pid)
            return False
        log.info(
            "killing hung master of pool %r: pid %d, epoch %d",
            self.pool,
            record.pid,
            record.epoch,
        )
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        except OSError as exc:
            # EPERM (another user's process, a sandbox) must not end the
            # member thread; the claim goes stale and another voter tries.
            log.warning("cannot kill hung master pid %d: %s", record.pid, exc)
            return False
        return True

    def prune_votes(self, below_epoch: int) -> None:
        """Remove vote directories of epochs older than ``below_epoch``."""
        for path in self.votes_dir.iterdir():
            if path.name.isdigit() and int(path.name) < below_epoch:
                for child in path.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        child.unlink()
                with contextlib.suppress(OSError):
                    path.rmdir()


def _claim_stale(path: Path, now: float, stale_after: float) -> bool:
    try:
        data = json.loads(path.read_text())
        pid, start_time = int(data["pid"]), data["start_time"]
        claimed_at = float(data["claimed_at"])
    except FileNotFoundError:
        # Pruned under us: the epoch is over, nothing to take over.
        return False
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("unreadable kill claim %s; taking it over", path)
        return True
    if start_time is None or not process_alive(pid, int(start_time)):
        return True
    return now - claimed_at > stale_after


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
