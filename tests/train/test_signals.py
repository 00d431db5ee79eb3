"""GracefulStop: first signal sets a flag, second SIGINT aborts, handlers restored."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vlreason.train.signals import GracefulStop


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary


def test_sigterm_sets_flag_and_handlers_are_restored():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.should_stop
        _deliver(signal.SIGTERM)
        assert stop.should_stop and stop.received == signal.SIGTERM
        _deliver(signal.SIGTERM)  # a repeated SIGTERM does not abort
        assert stop.should_stop
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term


def test_second_sigint_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop() as stop:
            _deliver(signal.SIGINT)
            assert stop.should_stop and stop.received == signal.SIGINT
            _deliver(signal.SIGINT)
            pytest.fail("second SIGINT should have raised")


def test_noop_outside_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen: dict[str, object] = {}

    def worker() -> None:
        with GracefulStop() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["should_stop"] = stop.should_stop

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "should_stop": False}
