"""The math-verify worker process: killed past its limit, replaced, never able to stall the
caller (vlreason.rewards.math_worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vlreason.rewards import math_worker

SLOW_PRED = "$" + "{" * 40 + "1" + "}" * 40 + "$"  # sympy: minutes of nested-set evalf
SLOW_GOLD = "$10^{10^{10}}$"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture()
def zygote_with(tmp_path, monkeypatch):
    """A zygote whose checkers run a function from a module written into ``tmp_path``."""
    started: list[math_worker._Zygote] = []

    def start(source: str, name: str) -> math_worker._Zygote:
        (tmp_path / "hostile_checks.py").write_text(textwrap.dedent(source))
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
        zygote = math_worker._Zygote(check=f"hostile_checks:{name}")
        started.append(zygote)
        zygote.wait_ready()
        return zygote

    yield start
    for zygote in started:
        zygote.kill()


def test_equal_and_unequal_answers():
    assert math_worker.verify("$\\frac{1}{2}$", "$0.5$") is True
    assert math_worker.verify("$2^{10}$", "$1024$") is True
    assert math_worker.verify("$3$", "$4$") is False


def test_past_the_limit_the_checker_is_killed_and_the_next_check_works():
    math_worker.warm_up()
    pool = math_worker._current_pool()
    zygote = pool.take()
    try:
        start = time.monotonic()
        assert zygote.ask(SLOW_PRED, SLOW_GOLD, False, 0.3) is None
        assert time.monotonic() - start < 0.3 + math_worker.ZYGOTE_GRACE_S
        killed = zygote.last_killed
        assert killed is not None and _gone(killed)
        assert zygote.ask("$2^{10}$", "$1024$", False, 5.0) is True
    finally:
        pool.give_back(zygote)


def test_a_check_holding_the_gil_in_c_cannot_stall_the_caller(zygote_with):
    """``sum(range(10**12))`` runs in one C loop that neither releases the GIL nor looks at
    signals (the shape of sympy computing ``10 ** 10**10``): in-process, no timer could
    stop it. In the checker it costs the caller only the limit."""
    zygote = zygote_with(
        """
        def hold_the_gil(pred, gt, free_text):
            return sum(range(10**12)) == 0
        """,
        "hold_the_gil",
    )
    for _ in range(2):  # the replacement checker is stuck too, and is killed too
        start = time.monotonic()
        assert zygote.ask("1", "1", False, 0.5) is None
        assert time.monotonic() - start < 0.5 + math_worker.ZYGOTE_GRACE_S
        assert _gone(zygote.last_killed)


def test_a_checker_that_dies_scores_no_match_and_is_replaced(zygote_with):
    zygote = zygote_with(
        """
        import os

        def die_on_x(pred, gt, free_text):
            if pred == "x":
                os._exit(3)
            return pred == gt
        """,
        "die_on_x",
    )
    assert zygote.ask("x", "1", False, 5.0) is False
    assert zygote.ask("1", "1", False, 5.0) is True


def test_memory_is_limited_in_the_checker(zygote_with):
    zygote = zygote_with(
        """
        import mmap

        def allocate(pred, gt, free_text):
            try:  # address space only: no page is touched, so unlimited it succeeds at once
                mmap.mmap(-1, 8 * 2**30)
            except (MemoryError, OSError):
                return True
            return False
        """,
        "allocate",
    )
    assert math_worker.CHECKER_MEMORY_BYTES < 8 * 2**30
    assert zygote.ask("1", "1", False, 30.0) is True


def test_a_stuck_zygote_is_dropped_and_the_next_call_starts_a_new_one(monkeypatch):
    math_worker.shutdown()
    math_worker.warm_up()
    pids = math_worker.idle_worker_pids()
    assert len(pids) == 1
    monkeypatch.setattr(math_worker, "ZYGOTE_GRACE_S", 0.2)
    # SIGSTOP: the zygote cannot answer at all; the caller gives up after limit + grace
    os.kill(pids[0], signal.SIGSTOP)
    start = time.monotonic()
    assert math_worker.verify("$1$", "$1$", timeout_s=0.3) is None
    assert time.monotonic() - start < 2.0
    monkeypatch.undo()
    assert math_worker.verify("$2^{10}$", "$1024$") is True
    assert not set(pids) & set(math_worker.idle_worker_pids())


def test_a_forked_child_uses_workers_of_its_own():
    math_worker.warm_up()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not talk to the parent's zygote over shared pipes
        try:
            ok = math_worker.verify("$\\frac{1}{2}$", "$0.5$") is True
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0
    os.close(read)
    assert math_worker.verify("$2^{10}$", "$1024$") is True


def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(math_worker.sys, "executable", "/bin/false")
    zygote = math_worker._Zygote()
    with pytest.raises(math_worker.MathWorkerError, match="did not start"):
        zygote.wait_ready()


def test_workers_end_with_their_caller():
    code = (
        "from vlreason.rewards import math_worker\n"
        "math_worker.warm_up()\n"
        "print(math_worker.idle_worker_pids()[0], flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid)
