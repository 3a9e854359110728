"""Alerts by email: journal events gathered into one mail, and the OnFailure= mail.

``mstm-alert --follow`` reads the journal for mstm's entries (those with an MSTM_STREAM
field, or from an ``mstm-*`` program or unit; mstm-alert's own are left out, so that a
mail server that is down cannot feed alerts about itself) at or above ``[email]
threshold``.  The first such entry opens a batch; ``[logging] email_timer`` seconds
later the batch becomes one message per recipient.  Repeats (the same program, stream,
event and message, numbers and the item's name aside) are shown once, with "N more like
this" and the items they were about.

Nothing is mailed twice and nothing is skipped:

* a closed batch is written to the outbox (see :mod:`mstm.alert.mailer`) *before* the journal
  cursor is saved (``<state_dir>/alert.cursor``, written atomically);
* the cursor saved is that of the last entry read, and it is saved only when every entry
  up to it is either in the outbox or below the threshold; after a restart reading
  resumes right after it (an open batch is simply gathered again);
* mail leaves the outbox only when the SMTP server has taken it; when it is down the
  outbox is tried again with exponential backoff, and meanwhile new batches queue up.

The one window left: a crash between writing the outbox and saving the cursor mails that
batch twice after the restart.  On the first start (no cursor) reading begins at the end
of the journal: old history is not mailed.

``mstm-alert UNIT`` (``mstm-alert@UNIT.service``, started by ``OnFailure=``) mails that
UNIT failed, with the last lines logged by the failed run: its invocation ID comes from
``systemctl show`` (system manager, then the user's) or, failing that, from the newest
``_SYSTEMD_INVOCATION_ID`` in the journal.

``mstm-alert --stdin`` reads events as JSON lines (``journalctl -o json`` output, or
objects with ``message``, ``priority``/``level``, ``stream``, ``item``, ``event``,
``identifier``, ``time``) or plain log lines (``tool: level: text``) from stdin, for
shell pipelines and cron; what it could not send waits in the outbox for the next run.

Messages are rendered from Jinja2 templates, text and HTML: ``alert.subject``,
``alert.txt``, ``alert.html``, ``failure.subject``, ``failure.txt``, ``failure.html``.
A file of the same name in ``[email] template_dir`` replaces the built-in one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import IO, Any, Protocol
from uuid import UUID

import jinja2

from mstm.alert.mailer import Delivery, Mailer, Outbox, write_atomic
from mstm.config import EmailConfig, GlobalConfig
from mstm.errors import EXIT_CONFIG, die
from mstm.notify import Notifier

log = logging.getLogger("mstm.alert")

DEFAULT_STATE_DIR = Path("/var/lib/mstm")
CURSOR_FILE = "alert.cursor"
SELF = "mstm-alert"
MAX_GROUPS = 100  # distinct kinds of event shown in one mail; the rest are counted
MAX_ITEMS = 10  # item names listed per group
RETRY_MAX = 900.0  # seconds between attempts at most, when the SMTP server is down

PRIORITY_NAMES = ("EMERG", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
_PRIORITY_WORDS = {"emerg": 0, "emergency": 0, "panic": 0, "alert": 1, "crit": 2,
                   "critical": 2, "err": 3, "error": 3, "warn": 4, "warning": 4, "notice": 5,
                   "info": 6, "debug": 7}
_LINE = re.compile(r"(?P<tool>[\w.@-]+): (?:(?P<level>[a-z]+): )?(?P<text>.*)")


def threshold_priority(level: str) -> int:
    """A [logging]-style level name (DEBUG .. CRITICAL) as a syslog priority (7 .. 2)."""
    return _PRIORITY_WORDS[level.lower()]


def priority_name(priority: int) -> str:
    return PRIORITY_NAMES[min(max(priority, 0), 7)]


def state_dir(email: EmailConfig) -> Path:
    """[email] state_dir, else $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/mstm."""
    if email.state_dir is not None:
        return email.state_dir
    env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(env) if env else DEFAULT_STATE_DIR


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Alert:
    """One event worth mailing (or not): what mattered of one journal entry."""

    time: float
    priority: int
    message: str
    identifier: str
    host: str = ""
    unit: str | None = None
    stream: str | None = None
    item: str | None = None
    event: str | None = None
    message_id: str | None = None
    reason: str | None = None

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.time).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")

    @property
    def priority_name(self) -> str:
        return priority_name(self.priority)


def _text(value: Any) -> str | None:
    """A journal field value as text (python-systemd converts some; -o json may give lists)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, list):  # binary field in journalctl -o json: a list of byte values
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / (1e6 if value > 1e12 else 1)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            return number / (1e6 if number > 1e12 else 1)
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).timestamp()
    return None


def _priority(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), 7)
    text = _text(value)
    if text is None:
        return default
    text = text.strip().lower()
    if text.isdigit():
        return min(int(text), 7)
    return _PRIORITY_WORDS.get(text, default)


def from_entry(entry: Mapping[str, Any]) -> Alert:
    """An Alert from a journal entry (python-systemd's dict, or journalctl -o json)."""
    def get(*names: str) -> str | None:
        for name in names:
            value = _text(entry.get(name))
            if value:
                return value
        return None

    when = _timestamp(entry.get("__REALTIME_TIMESTAMP")) or time.time()
    return Alert(
        time=when,
        priority=_priority(entry.get("PRIORITY"), 6),
        message=get("MESSAGE") or "",
        identifier=get("SYSLOG_IDENTIFIER", "_COMM") or "?",
        host=get("_HOSTNAME") or "",
        unit=get("_SYSTEMD_UNIT", "UNIT", "_SYSTEMD_USER_UNIT", "USER_UNIT"),
        stream=get("MSTM_STREAM"),
        item=get("MSTM_ITEM"),
        event=get("MSTM_EVENT"),
        message_id=get("MESSAGE_ID"),
        reason=get("MSTM_REASON"),
    )


def from_simple(obj: Mapping[str, Any]) -> Alert:
    """An Alert from a plain JSON object: message, priority/level, stream, item, ..."""
    if any(k.isupper() for k in obj):  # journalctl -o json (or export-like) fields
        return from_entry(obj)
    return Alert(
        time=_timestamp(obj.get("time")) or time.time(),
        priority=_priority(obj.get("priority", obj.get("level")), 3),
        message=_text(obj.get("message")) or "",
        identifier=_text(obj.get("identifier", obj.get("tool"))) or "stdin",
        host=_text(obj.get("host")) or "",
        unit=_text(obj.get("unit")),
        stream=_text(obj.get("stream")),
        item=_text(obj.get("item")),
        event=_text(obj.get("event")),
        message_id=_text(obj.get("message_id")),
        reason=_text(obj.get("reason")),
    )


def from_line(line: str) -> Alert | None:
    """An Alert from one line of stdin: a JSON object, or a plain "tool: level: text"."""
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return from_simple(obj)
    m = _LINE.fullmatch(line)
    if m and (m.group("level") is None or m.group("level") in _PRIORITY_WORDS):
        level = m.group("level")
        return Alert(time.time(), _PRIORITY_WORDS[level] if level else 6, m.group("text"),
                     m.group("tool"))
    return Alert(time.time(), 6, line, "stdin")


def is_mstm(entry: Mapping[str, Any]) -> bool:
    """An entry of an mstm program or unit (but not mstm-alert's own)."""
    ident = _text(entry.get("SYSLOG_IDENTIFIER")) or ""
    units = [_text(entry.get(k)) or "" for k in
             ("_SYSTEMD_UNIT", "UNIT", "_SYSTEMD_USER_UNIT", "USER_UNIT")]
    if ident == SELF or any(u.startswith(SELF) for u in units):
        return False
    return ("MSTM_STREAM" in entry or ident.startswith("mstm-")
            or any(u.startswith("mstm-") for u in units))


# --------------------------------------------------------------------------- batches


def dedup_key(a: Alert) -> tuple[str, ...]:
    """What makes two events "alike": program, stream, event, priority and the message
    with the item's name and every number blanked out."""
    text = a.reason or a.message
    if a.item:
        text = text.replace(a.item, "\0")
    text = re.sub(r"\d+", "#", text)
    return (a.identifier, a.stream or "", a.event or a.message_id or "", str(a.priority), text)


@dataclass
class Group:
    first: Alert
    last: Alert
    count: int = 1
    items: list[str] = field(default_factory=list)
    more_items: int = 0

    @property
    def more(self) -> int:
        return self.count - 1

    @property
    def priority_name(self) -> str:
        return self.first.priority_name


@dataclass
class Batch:
    """Events gathered for one mail."""

    groups: dict[tuple[str, ...], Group] = field(default_factory=dict)
    total: int = 0
    overflow: int = 0
    opened: float = 0.0  # clock() when the first event came
    clock: Callable[[], float] = time.monotonic

    def __bool__(self) -> bool:
        return self.total > 0

    def add(self, a: Alert) -> None:
        if not self.total:
            self.opened = self.clock()
        self.total += 1
        key = dedup_key(a)
        g = self.groups.get(key)
        if g is None:
            if len(self.groups) >= MAX_GROUPS:
                self.overflow += 1
                return
            g = self.groups[key] = Group(a, a, 0)
        g.count += 1
        g.last = a
        if a.item and a.item not in g.items:
            if len(g.items) < MAX_ITEMS:
                g.items.append(a.item)
            else:
                g.more_items += 1

    def ordered(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: (g.first.priority, g.first.time))


# --------------------------------------------------------------------------- templates


class Templates:
    """The built-in templates, each replaceable by a file of the same name in template_dir."""

    NAMES = ("alert.subject", "alert.txt", "alert.html",
             "failure.subject", "failure.txt", "failure.html")

    def __init__(self, template_dir: Path | None) -> None:
        options: dict[str, Any] = {"trim_blocks": True, "lstrip_blocks": True,
                                   "keep_trailing_newline": True,
                                   "autoescape": jinja2.select_autoescape(["html"])}
        self.builtin = jinja2.Environment(loader=jinja2.PackageLoader("mstm.alert", "templates"),
                                          undefined=jinja2.StrictUndefined, **options)
        self.admin = (jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)),
                                         **options) if template_dir else None)

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        if self.admin is not None:
            try:
                return self.admin.get_template(name).render(context)
            except jinja2.TemplateNotFound:
                pass
            except jinja2.TemplateError as e:
                log.error("template %s in template_dir is broken (%s); using the built-in one",
                          name, e)
        return self.builtin.get_template(name).render(context)


def compose(templates: Templates, kind: str, context: Mapping[str, Any], sender: str,
            recipient: str) -> EmailMessage:
    """One message, text and HTML, from the templates kind.subject/.txt/.html."""
    subject = " ".join(templates.render(f"{kind}.subject", context).split())
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("mstm-alert")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(templates.render(f"{kind}.txt", context))
    msg.add_alternative(templates.render(f"{kind}.html", context), subtype="html")
    return msg


def readable(msg: EmailMessage) -> str:
    """A message as a person reads it (--dry-run): headers, then each part decoded."""
    head = "".join(f"{k}: {v}\n" for k, v in msg.items()
                   if k in ("Subject", "From", "To", "Date"))
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            body = part.get_content()
            parts.append(f"--- {part.get_content_type()}\n{body}")
    return head + "".join(parts) + "\n"


def alert_context(batch: Batch, email: EmailConfig, config_path: Path) -> dict[str, Any]:
    groups = batch.ordered()
    times = [g.first.time for g in groups] + [g.last.time for g in groups]
    fmt = "%Y-%m-%d %H:%M:%S"
    return {
        "subject": email.subject,
        "host": socket.gethostname(),
        "total": batch.total,
        "groups": groups,
        "overflow": batch.overflow,
        "streams": sorted({g.first.stream for g in groups if g.first.stream}),
        "since": datetime.fromtimestamp(min(times)).strftime(fmt) if times else "",
        "until": datetime.fromtimestamp(max(times)).strftime(fmt) if times else "",
        "threshold": email.threshold,
        "threshold_priority": threshold_priority(email.threshold),
        "config": str(config_path),
    }


# --------------------------------------------------------------------------- state


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


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    """Where --follow reads entries: (cursor, entry) pairs, oldest first."""

    def wait(self, timeout: float) -> None: ...

    def read(self) -> list[tuple[str, Mapping[str, Any]]]: ...


class JournalSource:
    """The local journal, from just after *cursor* (or from its end if there is none)."""

    def __init__(self, cursor: str | None, *, path: Path | None = None) -> None:
        from systemd import journal

        self.reader = journal.Reader(path=str(path)) if path else journal.Reader()
        if cursor:
            try:
                self.reader.seek_cursor(cursor)
                first = self.reader.get_next()
                self._pending = [] if not first or self.reader.test_cursor(cursor) else [first]
                return
            except (OSError, ValueError) as e:
                log.warning("journal cursor not usable (%s): starting at the end", e)
        self.reader.seek_tail()
        self.reader.get_previous()
        self._pending = []

    def wait(self, timeout: float) -> None:
        if not self._pending:
            self.reader.wait(timeout)

    def read(self) -> list[tuple[str, Mapping[str, Any]]]:
        entries, self._pending = self._pending, []
        while len(entries) < 10000:
            entry = self.reader.get_next()
            if not entry:
                break
            entries.append(entry)
        return [(str(e["__CURSOR"]), e) for e in entries]


class Follower:
    """--follow: gather, batch, post, save the cursor, deliver with backoff."""

    def __init__(self, gcfg: GlobalConfig, postman: Postman, source: Source,
                 cursors: CursorStore, *, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.email = gcfg.email
        self.gcfg = gcfg
        self.postman = postman
        self.source = source
        self.cursors = cursors
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.threshold = threshold_priority(gcfg.email.threshold)
        self.batch = Batch(clock=clock)
        self.read_cursor: str | None = None  # the last entry read
        self.saved_cursor: str | None = None
        self.saved_at = 0.0
        self.stop = threading.Event()

    def follow(self) -> None:
        self.notifier.ready(self._status())
        self.postman.deliver()  # what an earlier run (or the OnFailure handler) left
        while not self.stop.is_set():
            self.step(self._timeout())
        if not self.batch:
            self._save_cursor()
        self.notifier.stopping()

    def _timeout(self) -> float:
        now = self.clock()
        timeout = 1.0  # signals and the watchdog are served at least this often
        if self.batch:
            timeout = min(timeout, self.batch.opened + self.email.email_timer - now)
        if self.postman.waiting:
            timeout = min(timeout, self.postman.next_try - now)
        return max(timeout, 0.0)

    def step(self, timeout: float) -> None:
        """Wait up to *timeout* for entries, take them in, and do what is due."""
        self.source.wait(timeout)
        for cursor, entry in self.source.read():
            self.read_cursor = cursor
            if is_mstm(entry):
                alert = from_entry(entry)
                if alert.priority <= self.threshold:
                    self.batch.add(alert)
        now = self.clock()
        if self.batch and now >= self.batch.opened + self.email.email_timer:
            self.flush()
        elif not self.batch and now - self.saved_at >= 5.0:
            self._save_cursor()
        if self.postman.due():
            self.postman.deliver()
        self.notifier.status(self._status())
        self.notifier.watchdog()

    def flush(self) -> None:
        """The batch into the outbox (durable), then the cursor past it, then try to send."""
        batch, self.batch = self.batch, Batch(clock=self.clock)
        self.postman.post("alert", alert_context(batch, self.email, self.gcfg.path))
        log.info("%d event(s) in %d kind(s) posted to %s", batch.total, len(batch.groups),
                 ", ".join(self.email.recipient))
        self._save_cursor()
        self.postman.next_try = min(self.postman.next_try, self.clock())
        if self.postman.due():
            self.postman.deliver()

    def _save_cursor(self) -> None:
        self.saved_at = self.clock()
        if self.read_cursor is None or self.read_cursor == self.saved_cursor:
            return
        try:
            self.cursors.save(self.read_cursor)
            self.saved_cursor = self.read_cursor
        except OSError as e:
            log.error("cannot save the journal cursor in %s: %s", self.cursors.path, e)

    def _status(self) -> str:
        waiting = self.postman.waiting
        text = f"{self.batch.total} event(s) gathering" if self.batch else "watching the journal"
        if waiting:
            text += f"; {waiting} mail(s) waiting for {self.email.smarthost}"
        return text


# --------------------------------------------------------------------------- stdin


def read_stdin(stream: IO[str], gcfg: GlobalConfig, postman: Postman,
               clock: Callable[[], float] = time.monotonic) -> int:
    """Gather events from *stream* until EOF; a mail every email_timer and one at the end.

    Returns the number of mails still waiting in the outbox.
    """
    threshold = threshold_priority(gcfg.email.threshold)
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True, name="stdin").start()
    batch = Batch(clock=clock)
    eof = False
    while not eof:
        timeout = batch.opened + gcfg.email.email_timer - clock() if batch else None
        try:
            line = lines.get(timeout=max(timeout, 0.0) if timeout is not None else None)
        except queue.Empty:
            line = ""
        if line is None:
            eof = True
        elif line:
            alert = from_line(line)
            if alert is not None and alert.priority <= threshold:
                batch.add(alert)
        if batch and (eof or clock() >= batch.opened + gcfg.email.email_timer):
            postman.post("alert", alert_context(batch, gcfg.email, gcfg.path))
            batch = Batch(clock=clock)
            postman.deliver(wait_for_lock=True)
    return postman.waiting


# --------------------------------------------------------------------------- OnFailure


@dataclass
class UnitState:
    invocation_id: str | None = None
    result: str | None = None
    exit_status: str | None = None
    manager: str = "system"


def _systemctl_show(unit: str, user: bool) -> dict[str, str]:
    argv = ["systemctl", *(["--user"] if user else []), "show", "-p", "InvocationID",
            "-p", "Result", "-p", "ExecMainStatus", "--", unit]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def unit_state(unit: str) -> UnitState:
    """The failed run of *unit*: what systemd (>= 251) hands an OnFailure= unit in
    $MONITOR_*, else what its service manager says now (system first, then the user's)."""
    env = os.environ
    manager = "user" if env.get("MANAGERPID") else "system"  # set by user managers only
    if env.get("MONITOR_INVOCATION_ID") and env.get("MONITOR_UNIT", unit) == unit:
        return UnitState(env["MONITOR_INVOCATION_ID"], env.get("MONITOR_SERVICE_RESULT"),
                         env.get("MONITOR_EXIT_STATUS"), manager)
    for user in (manager == "user", manager != "user"):
        props = _systemctl_show(unit, user)
        if props.get("InvocationID"):
            return UnitState(props["InvocationID"], props.get("Result") or None,
                             props.get("ExecMainStatus") or None, "user" if user else "system")
    return UnitState(manager=manager)


_UNIT_FIELDS = ("_SYSTEMD_UNIT", "_SYSTEMD_USER_UNIT")
_INVOCATION_FIELDS = ("_SYSTEMD_INVOCATION_ID", "INVOCATION_ID", "USER_INVOCATION_ID")
_INVOCATION_PAIRS = (("_SYSTEMD_UNIT", "_SYSTEMD_INVOCATION_ID"), ("UNIT", "INVOCATION_ID"),
                     ("_SYSTEMD_USER_UNIT", "_SYSTEMD_INVOCATION_ID"),
                     ("USER_UNIT", "USER_INVOCATION_ID"))


def _reader(pairs: Iterable[tuple[str, str | None]]) -> Any:
    """A journal reader matching any of the (field=value[, field=value]) groups."""
    from systemd import journal

    reader = journal.Reader()
    for i, group in enumerate(pairs):
        if i:
            reader.add_disjunction()
        for match in group:
            if match is not None:
                reader.add_match(match)
    return reader


def _unit_reader(unit: str, invocation_id: str | None) -> Any:
    if invocation_id is None:
        return _reader((f"{u}={unit}", None) for u, _ in _INVOCATION_PAIRS)
    return _reader((f"{u}={unit}", f"{i}={invocation_id}") for u, i in _INVOCATION_PAIRS)


def _tail(reader: Any, count: int) -> list[Mapping[str, Any]]:
    reader.seek_tail()
    found: list[Mapping[str, Any]] = []
    while len(found) < count:
        entry = reader.get_previous()
        if not entry:
            break
        found.append(entry)
    return found[::-1]


def newest_invocation(unit: str) -> str | None:
    """The newest invocation ID the journal holds for *unit*."""
    for entry in reversed(_tail(_unit_reader(unit, None), 10000)):
        for key in _INVOCATION_FIELDS:
            value = _text(entry.get(key))
            if value:
                return value
    return None


def _realtime(entry: Mapping[str, Any]) -> float:
    return _timestamp(entry.get("__REALTIME_TIMESTAMP")) or 0.0


_START_SLACK = 5.0  # seconds a service may log before its manager says "Starting"


def _previous_run_end(unit: str, invocation_id: str, before: float) -> float:
    """When the unit's run before *invocation_id* logged last (0 if none is found)."""
    reader = _unit_reader(unit, None)
    reader.seek_realtime(before)
    for _ in range(10000):
        entry = reader.get_previous()
        if not entry:
            break
        ids = {_text(entry.get(k)) for k in _INVOCATION_FIELDS} - {None}
        if ids and invocation_id not in ids:
            return _realtime(entry)
    return 0.0


def last_lines(unit: str, invocation_id: str | None, count: int) -> list[Alert]:
    """The last *count* journal entries of the unit's run *invocation_id*, oldest first.

    journald tags a service's own lines with _SYSTEMD_INVOCATION_ID when it can read the
    ID from the service's cgroup; a user manager (systemd 252) cannot always mark it.
    So the unit's untagged lines are taken too, by time: from the end of the previous
    run (at most a few seconds before the manager's first message about this one, since
    a service may log before its manager does) to the manager's last message about it.
    """
    entries = _tail(_unit_reader(unit, invocation_id), count)
    if invocation_id is not None and entries:
        first, last = _realtime(entries[0]), _realtime(entries[-1])
        lower = max(first - _START_SLACK, _previous_run_end(unit, invocation_id, first))
        reader = _reader((f"{u}={unit}", None) for u in _UNIT_FIELDS)
        reader.seek_realtime(lower)
        seen = {str(e.get("__CURSOR")) for e in entries}
        while True:
            entry = reader.get_next()
            if not entry or _realtime(entry) > last:
                break
            tagged = _text(entry.get("_SYSTEMD_INVOCATION_ID"))
            if (_realtime(entry) > lower and str(entry.get("__CURSOR")) not in seen
                    and tagged in (None, invocation_id)):
                entries.append(entry)
        entries.sort(key=_realtime)
        entries = entries[-count:]
    return [from_entry(e) for e in entries]


def failure_context(unit: str, gcfg: GlobalConfig, lines: int,
                    state: UnitState | None = None,
                    journal_lines: Callable[[str, str | None, int], list[Alert]] = last_lines,
                    invocation: Callable[[str], str | None] = newest_invocation,
                    ) -> dict[str, Any]:
    state = state or unit_state(unit)
    inv = state.invocation_id or invocation(unit)
    flag = "--user " if state.manager == "user" else ""
    command = f"journalctl {flag}-u {unit}" + (f" _SYSTEMD_INVOCATION_ID={inv}" if inv else "")
    return {
        "subject": gcfg.email.subject,
        "host": socket.gethostname(),
        "unit": unit,
        "invocation_id": inv,
        "result": state.result,
        "exit_status": state.exit_status if state.exit_status not in (None, "0") else None,
        "lines": journal_lines(unit, inv, lines),
        "journal_command": command,
        "config": str(gcfg.path),
    }


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

