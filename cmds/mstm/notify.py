"""sd_notify: READY, STATUS, WATCHDOG and STOPPING, quietly absent outside systemd."""

from __future__ import annotations

import os
import time


class Notifier:
    """Talks to the service manager when $NOTIFY_SOCKET is set; does nothing otherwise."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notify = None
        if self._enabled:
            try:
                from systemd import daemon

                self._notify = daemon.notify
            except ImportError:
                self._enabled = False
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if self._enabled and usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval = int(usec) / 1e6 / 2  # ping twice per period
            except ValueError:
                self.watchdog_interval = None
        self._last_ping = 0.0
        self._status = ""

    def _send(self, text: str) -> None:
        if self._notify is not None:
            self._notify(text)

    def ready(self, status: str) -> None:
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog, at most twice per WatchdogSec period."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    @property
    def max_sleep(self) -> float | None:
        """The longest a main loop may block without starving the watchdog."""
        return None if self.watchdog_interval is None else self.watchdog_interval / 2
