"""Graceful stop on SIGINT / SIGTERM: finish the step, save, exit.

    with GracefulStop() as stop:
        for step in ...:
            ...
            if stop.should_stop:   # with several processes, reduce this flag across them
                save_checkpoint(...)
                break

The first SIGINT or SIGTERM only sets ``should_stop``. A second SIGINT (Ctrl-C twice)
raises ``KeyboardInterrupt`` to abort at once; further SIGTERMs are ignored (schedulers
such as Slurm may resend them). The previous handlers come back on exit. Signal
handlers can only be installed from the main thread; elsewhere the context manager
does nothing and ``should_stop`` stays False unless set by hand.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class GracefulStop:
    """Context manager turning SIGINT / SIGTERM into a ``should_stop`` flag."""

    def __init__(self) -> None:
        self.should_stop: bool = False
        self.received: int | None = None  #: the first signal number received, if any
        self._previous: dict[int, Any] = {}

    @staticmethod
    def _signals() -> list[int]:
        return [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self._signals():
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            # getsignal() gives None for handlers not installed from Python.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.should_stop:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}: aborting without saving")
            logger.warning("received %s again; still stopping after the current step", name)
            return
        self.should_stop = True
        self.received = signum
        logger.warning(
            "received %s: stopping after the current step (and saving a checkpoint); "
            "press Ctrl-C again to abort at once",
            name,
        )
