"""The run loop every long-running command shares: stop, watchdog, sleep, signals.

mstm-scan, mstm-send (push and pull), mstm-receive, mstm-diskwatch and mstm-alert all
run the same way under systemd: they tell it READY once, feed its watchdog while they
work or wait, stop cleanly at SIGTERM or SIGINT (finishing the current step, never in
the middle of one), and never sleep where an event can wake them.  This module is the
one place that behaviour is written:

* :class:`RunLoop` holds the stop event and the :class:`~mstm.notify.Notifier`;
  ``tick()`` feeds the watchdog, ``sleep()`` waits in slices short enough for the
  watchdog and wakes at once on ``stop()``;
* ``on_stop()`` registers a waker (an inotify watcher's ``wake``) so a loop blocked on
  its own event source also wakes at ``stop()``;
* :func:`stop_on_signals` turns SIGTERM and SIGINT into a call of ``stop``, logged once
  with what the command does next.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from mstm.notify import Notifier

log = logging.getLogger("mstm")

#: The longest single wait, whatever the watchdog: a loop looks at its stop event at
#: least this often even when nothing could wake it.
LONGEST_WAIT = 5.0


class RunLoop:
    """A stop event, the systemd notifier, and the waits between them."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self._wakers: list[Callable[[], None]] = []

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def stop(self) -> None:
        """Ask the loop to end after its current step; wakes every registered waiter."""
        self.stop_event.set()
        for wake in list(self._wakers):
            wake()

    def on_stop(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call *wake* at stop(); returns a function that unregisters it."""
        self._wakers.append(wake)
        if self.stop_event.is_set():
            wake()

        def forget() -> None:
            if wake in self._wakers:
                self._wakers.remove(wake)

        return forget

    def tick(self) -> None:
        """Feed the watchdog (at most twice per WatchdogSec period, see Notifier)."""
        self.notifier.watchdog()

    def max_wait(self, *candidates: float | None) -> float:
        """The longest one blocking wait may be: the smallest of *candidates*, the
        watchdog's slice and LONGEST_WAIT, never negative."""
        limits = [c for c in candidates if c is not None]
        limits.append(self.notifier.max_sleep or LONGEST_WAIT)
        limits.append(LONGEST_WAIT)
        return max(0.0, min(limits))

    def sleep(self, seconds: float) -> bool:
        """Wait *seconds*, feeding the watchdog; True if stop() was asked meanwhile."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.tick()
            self.stop_event.wait(self.max_wait(left))
        return True


def stop_on_signals(stop: Callable[[], None], *, doing: str = "finishing the current step",
                    name: str = "", logger: logging.Logger | None = None) -> None:
    """At SIGTERM or SIGINT, log "<name>: SIGTERM received; <doing>" and call *stop*."""
    out = logger or log
    prefix = f"{name}: " if name else ""

    def handler(signum: int, frame: FrameType | None) -> None:
        out.info("%s%s received; %s", prefix, signal.Signals(signum).name, doing)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
