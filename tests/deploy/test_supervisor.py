import sys
import time

from mesh.deploy import ProcessSpec, Supervisor


def _wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_crashed_process_is_restarted_with_backoff_and_stop_is_reverse() -> None:
    sup = Supervisor(stop_timeout=2.0)
    sleeper = sup.start(
        ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    )
    crasher = sup.start(
        ProcessSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    )
    first_pid = crasher.pid
    try:

        def restarted() -> bool:
            sup.poll()
            proc = sup.processes()["crasher"]
            return proc is not None and proc.pid != first_pid

        _wait_for(restarted)
        assert sup.restarts()["crasher"] >= 1
        assert sup.processes()["sleeper"] is sleeper
    finally:
        sup.stop()
    assert sleeper.returncode is not None
    assert all(p is None or p.poll() is not None for p in sup.processes().values())


def test_process_ignoring_sigterm_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    sup = Supervisor(stop_timeout=0.5)
    proc = sup.start(ProcessSpec("stubborn", [sys.executable, "-c", code, str(ready)]))
    _wait_for(ready.exists)
    sup.stop()
    assert proc.returncode == -9
