"""Where mail waits and who delivers it: the state directory, the journal cursor kept
there, the outbox lock, and the :class:`Postman` that posts messages into the outbox and
delivers it with backoff while the SMTP server is down.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from mstm.alert.compose import Templates, compose, readable
from mstm.alert.mailer import Delivery, Mailer, Outbox, write_atomic
from mstm.config import EmailConfig, GlobalConfig
from mstm.errors import EXIT_CONFIG, die

log = logging.getLogger("mstm.alert")

DEFAULT_STATE_DIR = Path("/var/lib/mstm")
CURSOR_FILE = "alert.cursor"
RETRY_MAX = 900.0  # seconds between attempts at most, when the SMTP server is down


def state_dir(email: EmailConfig) -> Path:
    """[email] state_dir, else $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/mstm."""
    if email.state_dir is not None:
        return email.state_dir
    env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(env) if env else DEFAULT_STATE_DIR


class CursorStore:
    """The journal cursor of the last entry fully handled, kept on disk."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / CURSOR_FILE

    def load(self) -> str | None:
        try:
            text = self.path.read_text("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            log.error("cannot read %s (%s): starting at the end of the journal", self.path, e)
            return None
        return text or None

    def save(self, cursor: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_atomic(self.path, (cursor + "\n").encode("ascii"))


@contextlib.contextmanager
def outbox_lock(directory: Path, *, wait: bool) -> Iterator[bool]:
    """Only one process delivers the outbox at a time (the OnFailure handler and the
    --follow service share it); yields False if another holds it and *wait* is False."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(directory / "outbox.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Postman:
    """The outbox, its delivery with backoff, and the mail settings."""

    def __init__(self, gcfg: GlobalConfig, mailer: Mailer | None, *, dry_run: bool = False,
                 out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.email = gcfg.email
        self.config_path = gcfg.path
        self.state = state_dir(gcfg.email)
        self.outbox = Outbox(self.state)
        self.mailer = mailer
        self.templates = Templates(gcfg.email.template_dir)
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.clock = clock
        self.initial_delay = min(max(gcfg.email.email_timer, 1.0), 60.0)
        self.delay = self.initial_delay
        self.next_try = 0.0

    def post(self, kind: str, context: Mapping[str, Any]) -> int:
        """One message per recipient into the outbox (or, with --dry-run, to stdout)."""
        for recipient in self.email.recipient:
            msg = compose(self.templates, kind, context, self.email.sender, recipient)
            if self.dry_run:
                self.out.write(readable(msg))
                continue
            try:
                self.outbox.put(self.email.sender, recipient, msg)
            except OSError as e:
                die(f"cannot write to the outbox {self.outbox.dir}: {e.strerror}",
                    hint="set [email] state_dir to a writable directory, or run under"
                    " systemd with StateDirectory=", code=EXIT_CONFIG)
        return len(self.email.recipient)

    @property
    def waiting(self) -> int:
        return len(self.outbox.pending())

    def due(self) -> bool:
        return self.clock() >= self.next_try and bool(self.outbox.pending())

    def deliver(self, *, wait_for_lock: bool = False) -> Delivery | None:
        """Try to send what waits; None if another process is delivering it right now."""
        if self.dry_run or self.mailer is None:
            return Delivery(0, 0, 0, None)
        try:
            with outbox_lock(self.state, wait=wait_for_lock) as mine:
                if not mine:
                    return None
                result = self.outbox.deliver(self.mailer)
        except OSError as e:
            die(f"cannot use the state directory {self.state}: {e.strerror}",
                hint="set [email] state_dir to a writable directory", code=EXIT_CONFIG)
        if result.sent:
            log.info("%d mail(s) sent through %s", result.sent, self.email.smarthost)
        if result.error is not None and result.left:
            self.next_try = self.clock() + self.delay
            log.warning("mail server %s:%d: %s; %d mail(s) kept, next try in %.0f s",
                        self.email.smarthost, self.email.port, result.error, result.left,
                        self.delay)
            self.delay = min(self.delay * 2, RETRY_MAX)
        else:
            self.delay = self.initial_delay
            self.next_try = 0.0
        return result


def deliver_with_retries(postman: Postman, retry_for: float,
                         sleep: Callable[[float], None] = time.sleep) -> int:
    """Deliver the outbox, trying again with backoff for up to *retry_for* seconds;
    the number of mails still waiting (they stay in the outbox for a later run)."""
    deadline = time.monotonic() + retry_for
    while True:
        result = postman.deliver(wait_for_lock=True)
        if result is None or result.error is None or not result.left:
            return postman.waiting
        pause = postman.next_try - time.monotonic()
        if time.monotonic() + pause > deadline:
            return postman.waiting
        sleep(max(pause, 0.0))
