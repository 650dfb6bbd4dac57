"""Several hosts on one machine: loopback addresses, one runtime dir each.

Every member is its own ``python -m mesh.pool.member`` process; the test
process joins host 2 as one more (ineligible) member so it can broadcast.
The cluster kills everything it started, always.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mesh.config import Settings
from mesh.pool.directory import FileDirectory, MasterDirectory
from mesh.pool.member import PoolMember, demo_handler
from mesh.pool.tracker import BroadcastResult, Outcome

POOL = "p"
REPO = Path(__file__).resolve().parents[2]


class Cluster:
    def __init__(
        self,
        root: Path,
        hosts: Sequence[str],
        per_host: int,
        issuer_host: str,
        extra_args: Sequence[str] = (),
        settings: Settings | None = None,
        member_argv: Callable[[str], list[str]] | None = None,
        directory_args: Sequence[str] | None = None,
        issuer_directory: MasterDirectory | None = None,
    ) -> None:
        self.root = root
        self.hosts = list(hosts)
        self.per_host = per_host
        self.issuer_host = issuer_host
        self.extra_args = list(extra_args)
        self.directory = root / "directory"
        self.member_argv = member_argv
        self.directory_args = (
            list(directory_args)
            if directory_args is not None
            else ["--directory-dir", str(self.directory)]
        )
        self.issuer_directory = issuer_directory or FileDirectory(self.directory)
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {h: [] for h in hosts}
        self.settings = settings or Settings(runtime_dir=self.runtime_dir(issuer_host))
        self.issuer: PoolMember | None = None

    def runtime_dir(self, host: str) -> Path:
        return self.root / f"run-{host}"

    def spawn(self, host: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"member-{host}-{len(self.procs[host])}.log", "wb")
        argv = (
            self.member_argv(host)
            if self.member_argv is not None
            else [
                sys.executable,
                "-m",
                "mesh.pool.member",
                "--pool",
                POOL,
                "--host",
                host,
                "--runtime-dir",
                str(self.runtime_dir(host)),
                *self.directory_args,
            ]
        )
        proc = subprocess.Popen(
            argv + self.extra_args,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[host].append(proc)
        return proc

    def start(self) -> None:
        for host in self.hosts:
            for _ in range(self.wanted(host)):
                self.spawn(host)
        # Let the subprocesses elect first, so the test process never does.
        self.issuer = PoolMember(
            POOL,
            self.settings,
            demo_handler(self.issuer_host),
            self.issuer_host,
            directory=self.issuer_directory,
            eligible=False,
        )
        self.issuer.start()

    def wanted(self, host: str) -> int:
        return self.per_host - (1 if host == self.issuer_host else 0)

    def live(self, host: str) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs[host] if p.poll() is None]

    def heal(self) -> None:
        """Replace dead members, so each host has ``per_host`` again."""
        for host in self.hosts:
            for proc in self.live(host):
                if _stopped(proc.pid):
                    kill(proc)
            for _ in range(self.wanted(host) - len(self.live(host))):
                self.spawn(host)

    def master_record(self, host: str) -> dict[str, object] | None:
        try:
            data = json.loads((self.runtime_dir(host) / f"{POOL}.master").read_text())
        except (FileNotFoundError, ValueError):
            return None
        assert isinstance(data, dict)
        return data

    def master_proc(self, host: str) -> subprocess.Popen[bytes]:
        record = self.master_record(host)
        assert record is not None
        return next(p for p in self.live(host) if p.pid == record["pid"])

    def member_proc(self, host: str) -> subprocess.Popen[bytes]:
        """A live member of ``host`` that is not its master."""
        record = self.master_record(host)
        master_pid = record["pid"] if record else None
        return next(p for p in self.live(host) if p.pid != master_pid)

    def broadcast(self, payload: bytes, timeout: float = 10.0) -> BroadcastResult:
        assert self.issuer is not None
        return self.issuer.broadcast(payload, timeout=timeout)

    def converge(self, budget: float = 60.0) -> float:
        """Broadcast until every member replies; returns the seconds it took."""
        started = time.monotonic()
        expected = self.per_host * len(self.hosts)
        last = None
        while time.monotonic() - started < budget:
            with contextlib.suppress(Exception):
                last = self.broadcast(b"ping", timeout=3.0)
                if (
                    last.complete
                    and last.counts[Outcome.REPLIED] == expected
                    and not last.unreachable_hosts
                ):
                    return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"pool did not converge to {expected} replies: {last}")

    def close(self) -> None:
        if self.issuer is not None:
            self.issuer.close()
        for procs in self.procs.values():
            for proc in procs:
                kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGCONT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _stopped(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].startswith(b"T")


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started
