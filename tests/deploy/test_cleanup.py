"""`mesh up` leaves no election files behind, and never pulls them from a user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mesh.cli import log_level
from mesh.deploy import child_log_level, clean_runtime_dirs
from mesh.pool.election import Election, process_start_time


def _used_dir(path: Path, member: str = "m1") -> Election:
    election = Election(path, "blobstore", member)
    election.join(os.getpid(), process_start_time(os.getpid()) or 0)
    assert election.try_acquire()
    election.vote(1)
    election.release()
    election.leave()
    return election


def test_unused_dirs_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _used_dir(root / "host-a")
    (root / "host-a" / "blobstore.master").write_text("{}")
    clean_runtime_dirs([root / "host-a", root, root / "never-made"])
    assert not root.exists()


def test_a_dir_whose_lock_is_held_elsewhere_stays(tmp_path: Path) -> None:
    folder = tmp_path / "host-a"
    _used_dir(folder)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
            str(folder / "blobstore.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        clean_runtime_dirs([folder])
        assert (folder / "blobstore.lock").exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    clean_runtime_dirs([folder])
    assert not folder.exists()


def test_a_dir_with_a_live_member_stays(tmp_path: Path) -> None:
    folder = tmp_path / "host-a"
    _used_dir(folder)
    (folder / "blobstore.members" / "live").write_text(
        json.dumps({"pid": os.getpid(), "start_time": process_start_time(os.getpid())})
    )
    clean_runtime_dirs([folder])
    assert (folder / "blobstore.members" / "live").exists()


def test_log_levels() -> None:
    assert child_log_level(0) == "WARNING"
    assert child_log_level(1) == "INFO"
    assert child_log_level(5) == "DEBUG"
    assert log_level(0, {}) == 20
    assert log_level(1, {}) == 10
    assert log_level(0, {"MESH_LOG_LEVEL": "warning"}) == 30
    assert log_level(1, {"MESH_LOG_LEVEL": "WARNING"}) == 20
    assert log_level(0, {"MESH_LOG_LEVEL": "bogus"}) == 20
