"""Configuration: the global file and one file per stream, validated into frozen dataclasses.

MiStaMover's layout and vocabulary (docs/design.md, "Configuration"): a global INI file
names the streams in ``[global] data_stream_list``; each stream has its own file in
``config_dir`` whose values override the global file's, key by key within each section;
``$(section:key)`` refers to another value of the merged view.

``SCHEMA`` below is the single source of every key: its type, default and meaning.  It
drives parsing, validation, the "did you mean" hints, and conf/global.ini documents it.

Every problem raises :class:`mstm.errors.ConfigError` naming the file where the offending
value was written, its section and key, and a short reason; the first problem found wins.
Nothing here looks at file modes (MiStaMover skipped streams whose file was not 0400).
"""

from __future__ import annotations

import configparser
import contextlib
import difflib
import logging
import os
import re
import socket
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

from mstm.errors import ConfigError

log = logging.getLogger("mstm.config")

DEFAULT_CONFIG = Path("/etc/mstm/global.ini")
DEFAULT_RUNTIME_DIR = Path("/run/mstm")
# Where a stream's file is looked for in config_dir, first match wins (MiStaMover names last).
STREAM_FILE_NAMES = ("{}.ini", "ds_{}.ini", "dataset_{}.ini")
STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# [outgoing] target_port when none is written, by transfer_protocol
DEFAULT_PORTS = {"rsync_ssh": 22, "sftp": 22, "rsync_native": 873, "ftp": 21, "ftps": 21,
                 "local": 22}

_REFERENCE = re.compile(r"\$\(([^)]*)(\)?)")

# Limits (stated in conf/global.ini and mstm.conf(5)).  Every value is bounded when it is
# loaded, so that nothing later (time.sleep, select, threading waits, timedelta, a read
# of that many bytes) can overflow or wait for ever on a value the file allowed.
MAX_SECONDS = 365 * 86400  # the longest duration: 1 year
MAX_INT = 10**9  # an integer with no tighter bound of its own
MAX_SIZE = 1 << 50  # 1 PiB (1024T)
MAX_MEGABYTES = 10**12  # a free-space level: 10^12 MB (1 EB)
MAX_STREAM_NAME = 100  # characters (a unit instance name and a file name)
MAX_PATH_BYTES = 4095  # PATH_MAX less its NUL
MAX_NAME_BYTES = 255  # NAME_MAX
MAX_REFERENCE_DEPTH = 32  # $(section:key) nested this deep at most
MAX_VALUE_CHARS = 65536  # a value after every $(section:key) is replaced
MAX_FILE_BYTES = 1 << 20  # a configuration file
MAX_SECRET_BYTES = 4096  # a password file
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# configparser's DEFAULT section would leak its keys into every section; a name that no
# header line can spell turns that feature off, so "[DEFAULT]" is just an unknown section.
_NO_DEFAULT_SECTION = "\n"

T = TypeVar("T")
Ref = tuple[str, str]  # (section, key)


# --------------------------------------------------------------------------- value types


class Invalid(ValueError):
    """A text that does not fit its key's type; the message is the reason shown."""


class Kind:
    """How the text of one key is read.  Plain ``Kind`` accepts any text."""

    empty_ok = True  # False: an empty value means "use the default"

    def describe(self) -> str:
        return "text"

    def parse(self, text: str) -> object:
        return text

    def wrong(self, text: str) -> Invalid:
        return Invalid(f"expected {self.describe()}, got {show(text)}")


def show(text: str, limit: int = 60) -> str:
    """*text* quoted for a message: one line, at most about *limit* characters."""
    quoted = repr(text if len(text) <= limit else text[:limit])
    return quoted if len(text) <= limit else f"{quoted}... ({len(text)} characters)"


def _no_controls(text: str, what: str = "control characters") -> None:
    m = _CONTROL.search(text)
    if m:
        raise Invalid(f"may not contain {what} (found {m.group(0)!r} in {show(text)})")


def _unquoted(text: str) -> None:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        raise Invalid(f"values are not quoted: write it without the quotes, got {show(text)}")


@dataclass(frozen=True)
class Text(Kind):
    """One line of text (no control characters)."""

    empty_ok: bool = True

    def parse(self, text: str) -> str:
        _no_controls(text)
        return text


class Word(Kind):
    """One word that is safe as a command-line argument: host, user or command name."""

    empty_ok = False

    def describe(self) -> str:
        return "one word (no spaces, not starting with '-')"

    def parse(self, text: str) -> str:
        if text.startswith("-") or any(c.isspace() for c in text) or _CONTROL.search(text):
            raise self.wrong(text)
        _unquoted(text)
        return text


class FileName(Kind):
    """A plain file name, no directory part."""

    empty_ok = False

    def describe(self) -> str:
        return "a plain file name (no '/')"

    def parse(self, text: str) -> str:
        if "/" in text or text in (".", ".."):
            raise self.wrong(text)
        _no_controls(text)
        _unquoted(text)
        if len(os.fsencode(text)) > MAX_NAME_BYTES:
            raise Invalid(f"a file name is at most {MAX_NAME_BYTES} bytes, got {show(text)}")
        return text


_INT = re.compile(r"[-+]?[0-9]{1,30}")


@dataclass(frozen=True)
class Int(Kind):
    """A whole number from min to max (default: -MAX_INT to MAX_INT)."""

    min: int = -MAX_INT
    max: int = MAX_INT
    empty_ok = False

    def describe(self) -> str:
        return f"an integer from {self.min} to {self.max}"

    def parse(self, text: str) -> int:
        if not _INT.fullmatch(text):
            raise self.wrong(text)
        value = int(text, 10)
        if not self.min <= value <= self.max:
            raise self.wrong(text)
        return value


_DECIMAL = re.compile(r"[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30}")


@dataclass(frozen=True)
class Number(Kind):
    """A plain decimal number (MiStaMover wrote "1000.")."""

    min: float = 0.0
    max: float = float(MAX_INT)
    empty_ok = False

    def describe(self) -> str:
        return f"a number from {self.min:.0f} to {self.max:.0f}"

    def parse(self, text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise self.wrong(text)
        value = float(text)
        if not self.min <= value <= self.max:  # also rejects inf
            raise self.wrong(text)
        return value


_SECONDS = re.compile(r"([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([smh]?)", re.IGNORECASE)
_SECONDS_PER = {"": 1, "s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Seconds(Kind):
    """A duration: a number of seconds, or with a suffix s, m or h ("90s", "5m")."""

    min: float = 0.0
    positive: bool = False  # must be more than min, not just at least
    max: float = MAX_SECONDS
    empty_ok = False

    def describe(self) -> str:
        bound = "more than" if self.positive else "at least"
        most = "1 year" if self.max == MAX_SECONDS else f"{self.max:g} s"
        return (f"a duration of {bound} {self.min:g} s and at most {most}"
                " (e.g. 30, 90s, 5m, 1h)")

    def parse(self, text: str) -> float:
        m = _SECONDS.fullmatch(text)
        if not m:
            raise self.wrong(text)
        value = float(m.group(1)) * _SECONDS_PER[m.group(2).lower()]
        if value < self.min or (self.positive and value == self.min):
            raise self.wrong(text)
        if value > self.max:
            most = "1 year" if self.max == MAX_SECONDS else f"{self.max:g} s"
            raise Invalid(f"{show(text)} is too long: at most {most} ({self.max:g} s)")
        return value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class Bool(Kind):
    empty_ok = False

    def describe(self) -> str:
        return "true or false (or yes/no, on/off, 1/0)"

    def parse(self, text: str) -> bool:
        word = text.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise self.wrong(text)


_SIZE = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


@dataclass(frozen=True)
class Size(Kind):
    """A size in bytes, with binary multiples: 4096, 10K, 4M, 2G, 1T."""

    max: int = MAX_SIZE
    empty_ok = False

    def describe(self) -> str:
        return f"a size in bytes of at most {_size_text(self.max)} (e.g. 4096, 10K, 4M, 2G, 1T)"

    def parse(self, text: str) -> int:
        m = _SIZE.fullmatch(text)
        if not m:
            raise self.wrong(text)
        # exact arithmetic: no float, so no overflow and no rounding of large sizes
        value = int(Fraction(m.group(1)) * 1024 ** _SIZE_POWER[m.group(2).lower()])
        if value > self.max:
            raise Invalid(f"{show(text)} is too large: at most {_size_text(self.max)}")
        return value


def _size_text(size: int) -> str:
    for suffix, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{suffix}"
    return str(size)


_LEVEL = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*(%?)")


class Level(Kind):
    """A free-space level: megabytes ("1500") or a share of the file system ("10%")."""

    empty_ok = False

    def describe(self) -> str:
        return (f"megabytes (e.g. 1500; at most {MAX_MEGABYTES}) or a percentage"
                " (e.g. 10%)")

    def parse(self, text: str) -> str:
        m = _LEVEL.fullmatch(text)
        if not m or float(m.group(1)) > (100 if m.group(2) else MAX_MEGABYTES):
            raise self.wrong(text)
        return m.group(1) + m.group(2)


def level_value(level: str) -> tuple[float, bool]:
    """A validated level as (number, is_percentage)."""
    if level.endswith("%"):
        return float(level[:-1]), True
    return float(level), False


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few words, case-insensitive; stored as spelled in ``choices``."""

    choices: tuple[str, ...]
    planned: tuple[str, ...] = ()  # known names that are not implemented yet
    planned_reason: str = "'{}' is not implemented yet"
    empty_ok = False

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices + self.planned)

    def parse(self, text: str) -> str:
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice
        for choice in self.planned:
            if text.lower() == choice.lower():
                raise Invalid(self.planned_reason.format(choice))
        raise Invalid(f"expected {self.describe()}, got {show(text)}" + _did_you_mean(
            text, self.choices + self.planned, fold=True))


class AbsPath(Kind):
    """A local absolute path; a leading ~ is expanded."""

    empty_ok = False

    def describe(self) -> str:
        return "an absolute path"

    def parse(self, text: str) -> Path:
        _unquoted(text)
        _no_controls(text)
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~ with no home directory
            raise self.wrong(text) from None
        if not path.is_absolute():
            raise self.wrong(text)
        _path_length(str(path))
        return path


def _path_length(text: str) -> None:
    data = os.fsencode(text)
    if len(data) > MAX_PATH_BYTES:
        raise Invalid(f"a path is at most {MAX_PATH_BYTES} bytes, got {len(data)}")
    longest = max(data.split(b"/"), key=len)
    if len(longest) > MAX_NAME_BYTES:
        raise Invalid(f"a path's component is at most {MAX_NAME_BYTES} bytes, got"
                      f" {show(os.fsdecode(longest))}")


class RemoteDir(Kind):
    """An absolute path on the target host (kept as text, nothing expanded)."""

    empty_ok = False

    def describe(self) -> str:
        return "an absolute path on the target host"

    def parse(self, text: str) -> str:
        _unquoted(text)
        _no_controls(text)
        if not text.startswith("/"):
            raise self.wrong(text)
        if ".." in text.split("/"):
            raise Invalid(f"may not contain '..', got {show(text)}")
        _path_length(text)
        return text


class Words(Kind):
    """A list separated by commas and/or white space (may be empty)."""

    def describe(self) -> str:
        return "a list (separated by commas or spaces)"

    def parse(self, text: str) -> tuple[str, ...]:
        return tuple(word for word in re.split(r"[,\s]+", text) if word)


class StreamNames(Words):
    def describe(self) -> str:
        return "a list of stream names"

    def parse(self, text: str) -> tuple[str, ...]:
        names = super().parse(text)
        for name in names:
            if not STREAM_NAME.fullmatch(name):
                raise Invalid(
                    f"{show(name)} is not a valid stream name (letters, digits, '_', '.', '-';"
                    " starting with a letter or digit)")
            if len(name) > MAX_STREAM_NAME:
                raise Invalid(f"{show(name)} is too long for a stream name (at most"
                              f" {MAX_STREAM_NAME} characters)")
        for i, name in enumerate(names):
            if name in names[:i]:
                raise Invalid(f"stream {name!r} is listed twice")
        return names


class Marker(Kind):
    """A ready-marker file name template: {name} once, and something around it.

    The marker lies next to its item, so it is a plain file name: no '/', no braces
    other than the one {name} (no format fields: {0}, {name.x}, {{ or }}).
    """

    empty_ok = False

    def describe(self) -> str:
        return "a file name containing {name} once (e.g. {name}.done)"

    def parse(self, text: str) -> str:
        rest = text.replace("{name}", "")
        if "{" in rest or "}" in rest:
            raise Invalid(f"only {{name}} may appear in braces (no other field), got"
                          f" {show(text)}")
        if text.count("{name}") != 1:
            raise Invalid(f"expected a file name containing {{name}} exactly once (e.g."
                          f" {{name}}.done), got"
                          f" {show(text)}")
        if "/" in text:
            raise Invalid(f"must be a plain file name next to the item (no '/'), got"
                          f" {show(text)}")
        if not rest:
            raise Invalid("{name} alone is the item itself; add something, e.g. {name}.done")
        _no_controls(text)
        if len(os.fsencode(rest)) > MAX_NAME_BYTES // 2:
            raise Invalid(f"too long (at most {MAX_NAME_BYTES // 2} bytes besides {{name}}),"
                          f" got {show(text)}")
        return text


class Regex(Kind):
    """A Python regular expression (searched for: anchor it with ^ and $ when you mean it)."""

    empty_ok = False

    def describe(self) -> str:
        return "a regular expression"

    def parse(self, text: str) -> str:
        if len(text) > 1000:
            raise Invalid(f"a regular expression is at most 1000 characters, got {len(text)}")
        try:
            re.compile(text)
        except (re.error, OverflowError, RecursionError, ValueError) as err:
            reason = str(err).replace("\n", " ")
            raise Invalid(f"not a valid regular expression ({reason}): {show(text)}") from None
        return text


class PullMap(Kind):
    """Ordered mapping rules, one per line: ``REGEX -> DESTINATION`` (first match wins).

    A relative destination is a folder under [data_stream] directory; it may not climb
    out of it with "..".  Empty: every item goes directly into directory.
    """

    def describe(self) -> str:
        return "lines of 'REGEX -> DESTINATION'"

    def parse(self, text: str) -> tuple[tuple[str, str], ...]:
        rules: list[tuple[str, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            pattern, arrow, dest = line.rpartition("->")
            pattern, dest = pattern.strip(), dest.strip()
            if not arrow or not pattern or not dest:
                raise Invalid(f"expected 'REGEX -> DESTINATION', got {show(line)}")
            Regex().parse(pattern)
            parts = dest.split("/")
            _no_controls(dest)
            if not dest.startswith("/") and ".." in parts:
                raise Invalid(f"a relative destination may not contain '..': {show(line)}")
            _path_length(dest)
            rules.append((pattern, dest))
        return tuple(rules)


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Key:
    """One key: its type, its default (text, may hold $(section:key)) and its meaning."""

    kind: Kind
    default: str | None
    doc: str
    required: bool = False
    ignored: bool = False  # accepted for MiStaMover compatibility, then ignored
    refused: str | None = None  # never accepted; the reason says what to do instead


def _compat(doc: str = "ignored (MiStaMover compatibility)") -> Key:
    return Key(Text(), None, doc, ignored=True)


_LOG_LEVEL = Choice(LOG_LEVELS)

SCHEMA: dict[str, dict[str, Key]] = {
    "global": {
        "data_stream_list": Key(StreamNames(), None, "the names of the streams; may be empty",
                                required=True),
        "config_dir": Key(AbsPath(), None,
                          "where the stream files are (default: the global file's directory)"),
        "general_poll_interval": Key(Seconds(positive=True), "3",
                                     "default poll interval of every stream"),
        "spool_base_dir": Key(AbsPath(), "/var/spool/mstm",
                              "parent of the default spool directory of each stream"),
        "runtime_dir": Key(AbsPath(), None,
                           "runtime state (default: $RUNTIME_DIRECTORY, else /run/mstm)"),
        "base_incoming_dir": _compat(),
        "debug_on": _compat(),
    },
    "data_stream": {
        "name": Key(Word(), None,
                    "the stream's name; if set, must equal its name in data_stream_list"),
        "directory": Key(AbsPath(), None, "the directory to watch and send from",
                         required=True),
        "transfer_unit": Key(Choice(("file", "dir")), "file",
                             "what one item is: each file, or each top-level directory"),
        "status": Key(Choice(("RUNNING", "STOPPED", "COMPLETE")), "RUNNING",
                      "RUNNING sends; STOPPED and COMPLETE send nothing"),
        "priority": Key(Int(), "$(disk_space_monitor:base_priority)",
                        "disk-space priority (default: [disk_space_monitor] base_priority)"),
        "deletion_enabled": Key(Bool(), "false",
                                "the disk-space monitor may delete delivered items"),
        "delete_undelivered": Key(Bool(), "false",
                                  "with deletion_enabled: at VLOW also delete undelivered items"),
        "spool_dir": Key(AbsPath(), "$(global:spool_base_dir)/$(data_stream:name)",
                         "the stream's durable queue (default: <spool_base_dir>/<name>)"),
        "settle_seconds": Key(Seconds(), "5", "an item must be unchanged this long to be ready"),
        "ignore_patterns": Key(Words(), "*.part *.tmp *.swp *~ #*#",
                               "globs of names never sent (dot-files are always ignored)"),
        "ready_marker": Key(Marker(), None,
                            "an item is ready only once this file exists (empty: no marker)"),
        "follow_symlinks": Key(Bool(), "false",
                               "a symbolic link to a regular file is an item, sent and "
                               "verified as that file (transfer_unit = file only); links to "
                               "directories, dangling links, loops and links to a file of "
                               "another owner (unless root owns the link) are skipped; move "
                               "mode deletes only the link"),
        "poll_interval": Key(Seconds(positive=True), "$(global:general_poll_interval)",
                             "how often to rescan (default: [global] general_poll_interval)"),
        "direction": Key(Choice(("push", "pull")), "push",
                         "push sends directory to the target; pull fetches items from it"),
    },
    "outgoing": {
        "target_host": Key(Word(), None,
                           "the host to send to (required unless transfer_protocol is local)"),
        "target_port": Key(Int(1, 65535), None,
                           "port of the target's server (default: 22 for rsync_ssh and sftp,"
                           " 873 for rsync_native, 21 for ftp and ftps)"),
        "target_dir": Key(RemoteDir(), None, "the absolute directory on the target host",
                          required=True),
        "transfer_protocol": Key(
            Choice(("rsync_ssh", "rsync_native", "sftp", "ftp", "ftps", "local")),
            "rsync_ssh", "how items travel"),
        "transfer_mode": Key(Choice(("move", "mirror")), None,
                             "required: move (delete the source once verified) or mirror"),
        "target_uses_arrival_monitor": Key(Bool(), "false",
                                           "the target runs mstm-receive (handshake files)"),
        "target_incoming_dir": Key(RemoteDir(), "$(outgoing:target_dir)/.mstm-incoming",
                                   "with the arrival monitor: the receiver's incoming area"),
        "retry_count": Key(Int(0, 1_000_000), "3",
                           "attempts per item before it is parked as failed"),
        "retry_backoff": Key(Seconds(), "2", "first wait before a retry (doubles each time)"),
        "retry_backoff_max": Key(Seconds(), "600", "longest wait between retries"),
        "batch_max_items": Key(Int(1), "10000", "most items sent in one transfer"),
        "batch_max_bytes": Key(Size(), "64G", "most bytes sent in one transfer"),
        "connect_timeout": Key(Seconds(positive=True), "15", "ssh connection timeout"),
        "stall_seconds": Key(Seconds(positive=True), "120",
                             "a transfer with no progress this long is aborted"),
        "lease_seconds": Key(Seconds(10), "300",
                             "a claim whose owner is silent this long is taken over"),
        "stop_file": Key(FileName(), ".stop",
                         "a file of this name in directory pauses the stream"),
        "stop_file_poll_interval": Key(Seconds(positive=True), "30",
                                       "how often a paused stream checks its stop file"),
        "bwlimit": Key(Int(0), "0", "bandwidth limit in KiB/s (0: none)"),
        "receipt_file_poll_count": Key(Int(1, 1_000_000), "100",
                                       "how many times to look for a receipt"),
        "receipt_file_poll_interval": Key(Seconds(positive=True), "5",
                                          "wait between looks for a receipt"),
        "control_file_extension": Key(FileName(), "mstm-ctrl", "extension of control files"),
        "receipt_file_extension": Key(FileName(), "mstm-rcpt", "extension of receipt files"),
        "thankyou_file_extension": Key(FileName(), "mstm-thanks",
                                       "extension of thank-you files"),
        "always_zip": Key(Bool(), "false",
                          "zip directory items (MiStaMover compatibility; not used yet)"),
        "dir_size_limit": Key(Number(), "1000",
                              "MB; zip directories above it (MiStaMover compat.; not used yet)"),
    },
    "incoming": {
        "require_arrival_monitor": Key(Bool(), "false",
                                       "only accept items that come with a control file"),
        "control_file_extension": Key(FileName(), "mstm-ctrl", "extension of control files"),
        "thankyou_file_extension": Key(FileName(), "mstm-thanks",
                                       "extension of thank-you files"),
        "stop_file": Key(FileName(), ".stop", "a file of this name pauses receiving"),
        "incoming_dir": Key(AbsPath(), "$(data_stream:directory)/.mstm-incoming",
                            "where senders put batches and handshake files for mstm-receive"
                            " (default: <directory>/.mstm-incoming)"),
        "receipt_file_extension": Key(FileName(), "mstm-rcpt", "extension of receipt files"),
        "overwrite": Key(Bool(), "false",
                         "replace a published file whose content differs (else: refused)"),
        "max_control_bytes": Key(Size(1 << 30), "8M",
                                 "larger control files are quarantined unread"),
        "abandoned_batch_seconds": Key(Seconds(), "86400",
                                       "a batch directory without a control file, receipt or"
                                       " thank-you, in which nothing changed for this long,"
                                       " is removed (a sender died mid-transfer; 0: never)"),
    },
    "rsync_ssh": {
        "cmd": Key(Word(), "rsync", "the rsync program"),
        "ssh_cmd": Key(Word(), "ssh", "the ssh program"),
        "username": Key(Word(), None, "user on the target host (empty: the current user)"),
        "identity_file": Key(AbsPath(), None, "ssh private key (must be a readable file)"),
        "known_hosts": Key(AbsPath(), None, "ssh known_hosts file to use (must exist)"),
        "transfer_mode": Key(Choice(("move", "mirror")), None,
                             "MiStaMover's place for transfer_mode; [outgoing] wins"),
        "use_checksum": _compat("ignored (MiStaMover compatibility): mstm compares every"
                                " file's sha256 at the target itself, whatever rsync does"),
        "check_size": _compat("ignored (MiStaMover compatibility): sizes and sha256 are"
                              " always verified"),
    },
    "rsync_native": {
        "cmd": Key(Word(), "rsync", "the rsync program"),
        "module": Key(Word(), None, "the rsync daemon's module (required for rsync_native)"),
        "username": Key(Word(), None, "user of the rsync daemon (empty: no login)"),
        "password_file": Key(AbsPath(), None, "file holding the daemon password (default:"
                             " the systemd credential rsync-password, if there is one)"),
        "password": Key(Text(), None, "refused: use password_file or a systemd credential",
                        refused="passwords are not accepted in configuration files (they get"
                        " logged and copied); use password_file or a systemd credential"),
    },
    "sftp": {
        "username": Key(Word(), None, "user on the target host (empty: the current user)"),
        "identity_file": Key(AbsPath(), None, "ssh private key (must be a readable file)"),
        "known_hosts": Key(AbsPath(), None,
                           "known_hosts file to check the host key against (must exist)"),
        "remote_checksum": Key(Bool(), "true",
                               "ask the target's sha256sum over the same ssh connection"),
        "verify_readback": Key(Bool(), "true",
                               "without a remote checksum, read each file back to hash it"),
    },
    "ftp": {
        "username": Key(Word(), "anonymous", "FTP login"),
        "password_file": Key(AbsPath(), None, "file holding the FTP password (default:"
                             " the systemd credential ftp-password, if there is one)"),
        "tls": Key(Bool(), "false", "use TLS (AUTH TLS, PROT P); ftps always does"),
        "ca_file": Key(AbsPath(), None,
                       "CA certificates the server's certificate is checked against"
                       " (default: the system's)"),
        "passive": Key(Bool(), "true", "passive mode (the client opens data connections)"),
        "verify_readback": Key(Bool(), "true",
                               "read each file back after upload to hash it"),
        "password": Key(Text(), None, "refused: use password_file or a systemd credential",
                        refused="passwords are not accepted in configuration files (they get"
                        " logged and copied); use password_file or a systemd credential"),
    },
    "pull": {
        "source_dir": Key(RemoteDir(), None,
                          "pull: the remote directory whose entries are the items (required)"),
        "item_pattern": Key(Regex(), "^[^.]", "pull: only items whose name matches"),
        "max_age_days": Key(Int(0, 36500), "0",
                            "pull: skip items unchanged for longer than this (0: no limit)"),
        "max_tasks": Key(Int(1, 64), "1", "pull: items fetched at the same time"),
        "ledger": Key(AbsPath(), "$(data_stream:spool_dir)/ledger.jsonl",
                      "pull: the done-ledger (default: <spool_dir>/ledger.jsonl)"),
        "map": Key(PullMap(), "",
                   "pull: 'REGEX -> DESTINATION' lines, first match wins (empty: directory)"),
    },
    "disk_space_monitor": {
        "base_priority": Key(Int(), "100", "streams at or below it are stopped first"),
        "level_good": Key(Level(), "1500", "free space above it is GOOD (MB or N%)"),
        "level_low": Key(Level(), "1000", "free space below it is LOW (MB or N%)"),
        "level_vlow": Key(Level(), "500", "free space below it is VLOW (MB or N%)"),
        "poll_interval": Key(Seconds(positive=True), "60", "how often free space is checked"),
        "hysteresis": Key(Level(), "50",
                          "a level is left upwards only this far above it (MB or N%)"),
    },
    "email": {
        "from": Key(Text(empty_ok=False), None, "sender address (default: mstm@<host name>)"),
        "recipient": Key(Words(), "", "addresses alerts go to (empty: no mail)"),
        "subject": Key(Text(empty_ok=False), "mstm alert", "subject of alert mails"),
        "smarthost": Key(Word(), "localhost", "SMTP server"),
        "port": Key(Int(1, 65535), "25", "SMTP port"),
        "threshold": Key(_LOG_LEVEL, "ERROR", "least severe log level that is mailed"),
        "starttls": Key(Bool(), "false", "upgrade the SMTP connection with STARTTLS"),
        "ssl": Key(Bool(), "false", "connect to the SMTP server over TLS"),
        "username": Key(Word(), None, "SMTP login (empty: none)"),
        "password_file": Key(AbsPath(), None,
                             "file holding the SMTP password (or use a systemd credential)"),
        "password_credential": Key(FileName(), "smtp-password",
                                   "name of the systemd credential holding the SMTP password"),
        "ca_file": Key(AbsPath(), None,
                       "CA certificates for the SMTP server's certificate (default: system's)"),
        "timeout": Key(Seconds(positive=True), "30", "SMTP connection timeout"),
        "template_dir": Key(AbsPath(), None,
                            "directory of mail templates overriding the built-in ones"),
        "state_dir": Key(AbsPath(), None,
                         "mstm-alert's journal cursor and outbox (default: $STATE_DIRECTORY,"
                         " else /var/lib/mstm)"),
        "password": Key(Text(), None, "refused: use password_file or a systemd credential",
                        refused="passwords are not accepted in configuration files (they get"
                        " logged and copied); use password_file or a systemd credential"),
    },
    "logging": {
        "log_level": Key(_LOG_LEVEL, "INFO", "least severe level logged"),
        "email_timer": Key(Seconds(positive=True), "300",
                           "alerts are gathered this long and sent as one mail"),
        "base_log_dir": _compat(),
        "port": _compat(),
    },
}

# Sections whose values make up GlobalConfig; the others belong to streams.
GLOBAL_SECTIONS = ("global", "disk_space_monitor", "email", "logging")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class DiskSpaceConfig:
    base_priority: int
    level_good: str
    level_low: str
    level_vlow: str
    poll_interval: float
    hysteresis: str = "50"


@dataclass(frozen=True)
class EmailConfig:
    sender: str  # [email] from
    recipient: tuple[str, ...]
    subject: str
    smarthost: str
    port: int
    threshold: str
    starttls: bool
    ssl: bool
    username: str | None
    password_file: Path | None
    email_timer: float  # [logging] email_timer
    password_credential: str = "smtp-password"
    ca_file: Path | None = None
    timeout: float = 30.0
    template_dir: Path | None = None
    state_dir: Path | None = None


@dataclass(frozen=True)
class GlobalConfig:
    path: Path
    config_dir: Path
    data_stream_list: tuple[str, ...]
    general_poll_interval: float
    spool_base_dir: Path
    runtime_dir: Path
    log_level: str  # [logging] log_level
    disk_space_monitor: DiskSpaceConfig
    email: EmailConfig


@dataclass(frozen=True)
class OutgoingConfig:
    target_host: str
    target_port: int
    target_dir: str
    transfer_protocol: str
    transfer_mode: str  # "move" | "mirror"
    target_uses_arrival_monitor: bool
    target_incoming_dir: str
    retry_count: int
    retry_backoff: float
    retry_backoff_max: float
    batch_max_items: int
    batch_max_bytes: int
    connect_timeout: float
    stall_seconds: float
    lease_seconds: float
    stop_file: str
    stop_file_poll_interval: float
    bwlimit: int  # KiB/s, 0 = none
    receipt_file_poll_count: int
    receipt_file_poll_interval: float
    control_file_extension: str
    receipt_file_extension: str
    thankyou_file_extension: str


@dataclass(frozen=True)
class RsyncSshConfig:
    cmd: str
    ssh_cmd: str
    username: str | None
    identity_file: Path | None
    known_hosts: Path | None


@dataclass(frozen=True)
class RsyncNativeConfig:
    cmd: str = "rsync"
    module: str | None = None
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class SftpConfig:
    username: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    remote_checksum: bool = True
    verify_readback: bool = True


@dataclass(frozen=True)
class FtpConfig:
    username: str = "anonymous"
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    passive: bool = True
    verify_readback: bool = True


@dataclass(frozen=True)
class IncomingConfig:
    require_arrival_monitor: bool
    control_file_extension: str
    thankyou_file_extension: str
    stop_file: str
    incoming_dir: Path | None = None  # None only when built by hand: <directory>/.mstm-incoming
    receipt_file_extension: str = "mstm-rcpt"
    overwrite: bool = False
    max_control_bytes: int = 8 << 20
    abandoned_batch_seconds: float = 86400.0


@dataclass(frozen=True)
class PullConfig:
    """[pull]: what a pull stream fetches from [outgoing] target_host, and where to."""

    source_dir: str = ""
    item_pattern: str = "^[^.]"
    max_age_days: int = 0  # 0: no limit
    max_tasks: int = 1
    ledger: Path | None = None  # None only when built by hand: <spool_dir>/ledger.jsonl
    map: tuple[tuple[str, str], ...] = ()  # (regex, destination), first match wins


@dataclass(frozen=True)
class StreamConfig:
    name: str
    global_file: Path
    stream_file: Path
    directory: Path
    transfer_unit: str  # "file" | "dir"
    status: str  # RUNNING | STOPPED | COMPLETE
    priority: int
    deletion_enabled: bool
    spool_dir: Path
    settle_seconds: float
    ignore_patterns: tuple[str, ...]
    ready_marker: str | None
    follow_symlinks: bool
    poll_interval: float
    log_level: str
    outgoing: OutgoingConfig
    rsync_ssh: RsyncSshConfig
    incoming: IncomingConfig
    runtime_dir: Path  # [global] runtime_dir: ssh control sockets and other runtime files
    rsync_native: RsyncNativeConfig = RsyncNativeConfig()
    sftp: SftpConfig = SftpConfig()
    ftp: FtpConfig = FtpConfig()
    delete_undelivered: bool = False  # [data_stream]; only with deletion_enabled
    direction: str = "push"  # [data_stream] direction: "push" | "pull"
    pull: PullConfig = PullConfig()

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"


# --------------------------------------------------------------------------- public API


def default_config_path(explicit: Path | None = None) -> Path:
    """The global file: *explicit* (--config), else $MSTM_CONFIG, else /etc/mstm/global.ini."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("MSTM_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_global(path: Path | None = None) -> GlobalConfig:
    """The global file alone, validated (stream files are only read for their references)."""
    setup = _open_global(path)
    _emit(setup.warnings)
    return setup.config


def load_stream(name: str, path: Path | None = None, role: str = "send") -> StreamConfig:
    """One stream: the global file merged with that stream's file, validated.

    Other streams' files are not validated: a broken proj2.ini does not stop proj1.
    """
    setup = _open_global(path)
    stream, warnings = _load_stream(setup, name, role)
    _emit(setup.warnings + warnings)
    return stream


def load_all(path: Path | None = None) -> tuple[GlobalConfig, dict[str, StreamConfig]]:
    """The global file and every listed stream; the first broken one raises."""
    setup = _open_global(path)
    streams: dict[str, StreamConfig] = {}
    warnings = list(setup.warnings)
    for name in setup.config.data_stream_list:
        streams[name], more = _load_stream(setup, name)
        warnings += more
    _emit(warnings)
    return setup.config, streams


# --------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _Layer:
    """One parsed file: section -> key -> raw text."""

    path: Path
    sections: dict[str, dict[str, str]]


def _read_layer(path: Path) -> _Layer:
    text = _read_text(path)
    parser = configparser.ConfigParser(
        interpolation=None, default_section=_NO_DEFAULT_SECTION, strict=True)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as err:
        raise _syntax_error(err, path, text.splitlines()) from None
    return _Layer(path, {s: dict(parser[s]) for s in parser.sections()})


def _read_text(path: Path) -> str:
    data = _read_regular_file(path, MAX_FILE_BYTES, "", file=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"line {line}: not valid UTF-8", file=str(path)) from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ConfigError(f"line {line}: a NUL byte (not a text file)", file=str(path))
    return text


def _read_regular_file(path: Path, limit: int, label: str, **where: str) -> bytes:
    """The content of *path*, which must be a regular file of at most *limit* bytes.

    Opened without blocking, so a FIFO or a device named by mistake is refused at once
    instead of hanging; a directory, a symlink loop or a missing file is one clear error.
    Every reason starts with *label* (the path, when the error's file is another one).
    """
    cannot = "not a readable file" if label else "cannot read"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ConfigError(f"{label}{cannot}: {_fs_reason(err)}", **where) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode)
                    else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ConfigError(f"{label}{cannot}: it is {kind}, not a regular file", **where)
        if st.st_size > limit:
            raise ConfigError(f"{label}too large ({st.st_size} bytes; at most {limit})", **where)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(f"{label}too large (more than {limit} bytes)", **where)
        return b"".join(chunks)
    except OSError as err:
        raise ConfigError(f"{label}{cannot}: {_fs_reason(err)}", **where) from None
    finally:
        os.close(fd)


def _fs_reason(err: OSError) -> str:
    return (err.strerror or str(err)).replace("\n", " ")


def _syntax_error(err: configparser.Error, path: Path, lines: list[str]) -> ConfigError:
    def quoted(lineno: int) -> str:
        return repr(lines[lineno - 1].strip()) if 0 < lineno <= len(lines) else "?"

    file = str(path)
    if isinstance(err, configparser.MissingSectionHeaderError):
        return ConfigError(f"line {err.lineno}: {quoted(err.lineno)} comes before any"
                           " [section] header", file=file)
    if isinstance(err, configparser.DuplicateOptionError):
        return ConfigError(f"line {err.lineno}: key given twice in this section", file=file,
                           section=err.section, key=err.option)
    if isinstance(err, configparser.DuplicateSectionError):
        return ConfigError(f"line {err.lineno}: section given twice", file=file,
                           section=err.section)
    if isinstance(err, configparser.ParsingError) and err.errors:
        lineno = err.errors[0][0]
        return ConfigError(f"line {lineno}: cannot parse {quoted(lineno)}"
                           " (expected 'key = value' or '[section]')", file=file)
    return ConfigError(f"cannot parse: {err}".replace("\n", " "), file=file)


def _references(layers: Iterable[_Layer]) -> set[Ref]:
    """Every well-formed $(section:key) written in *layers*."""
    refs: set[Ref] = set()
    for layer in layers:
        for keys in layer.sections.values():
            for raw in keys.values():
                for m in _REFERENCE.finditer(raw):
                    ref = _parse_reference(m.group(1))
                    if ref:
                        refs.add(ref)
    return refs


def _parse_reference(body: str) -> Ref | None:
    section, colon, key = body.partition(":")
    section, key = section.strip(), key.strip().lower()
    return (section, key) if colon and section and key else None


def _check_structure(layer: _Layer, refs: set[Ref]) -> list[str]:
    """Unknown sections and keys, refused keys; returns warnings for ignored keys."""
    warnings: list[str] = []
    for section, keys in layer.sections.items():
        known = SCHEMA.get(section)
        if known is None and (not keys or any((section, k) not in refs for k in keys)):
            raise ConfigError("unknown section" + _did_you_mean(section, SCHEMA),
                              file=str(layer.path), section=section)
        for key in keys:
            spec = (known or {}).get(key)
            if spec is None:
                if (section, key) not in refs:
                    raise ConfigError(_unknown_key_reason(section, key, refs),
                                      file=str(layer.path), section=section, key=key)
            elif spec.refused:
                raise ConfigError(spec.refused, file=str(layer.path), section=section, key=key)
            elif spec.ignored:
                warnings.append(f"{layer.path}: [{section}] {key}: ignored"
                                " (a MiStaMover setting mstm does not use)")
    return warnings


def _unknown_key_reason(section: str, key: str, refs: set[Ref]) -> str:
    known = SCHEMA.get(section, {})
    hint = _did_you_mean(key, [k for k, spec in known.items() if not spec.refused])
    homes = [s for s, keys in SCHEMA.items() if key in keys]
    near = difflib.get_close_matches(key, [k for s, k in refs if s == section], n=1)
    if not hint and homes:
        hint = f" (it belongs in [{homes[0]}])"
    elif not hint and near:  # a variable whose reference is misspelt
        hint = f" (and nothing refers to it; is $({section}:{near[0]}) a misspelling?)"
    return "unknown key" + hint


def _did_you_mean(word: str, candidates: Iterable[str], *, fold: bool = False) -> str:
    options = {c.lower() if fold else c: c for c in candidates}
    close = difflib.get_close_matches(word.lower() if fold else word, list(options), n=1)
    return f" (did you mean {options[close[0]]!r}?)" if close else ""


# --------------------------------------------------------------------------- the merged view


@dataclass(frozen=True)
class _Entry:
    raw: str
    file: Path


class _View:
    """Global and (optionally) stream layers merged key by key, read through SCHEMA.

    *home* is the file a missing key should be written in (the stream file when there is
    one); *implicit* holds the defaults that are computed, not written in SCHEMA (the
    global file's directory for config_dir, the stream's own name for name, ...).
    """

    def __init__(self, layers: Iterable[_Layer], home: Path, implicit: Mapping[Ref, str]) -> None:
        self.entries: dict[Ref, _Entry] = {}
        for layer in layers:
            for section, keys in layer.sections.items():
                for key, raw in keys.items():
                    self.entries[(section, key)] = _Entry(raw, layer.path)
        self.home = home
        self.implicit = implicit
        self._text: dict[Ref, str | None] = {}
        self._values: dict[Ref, object] = {}
        self.last: Ref | None = None  # the key read last: where an unforeseen error points

    def file_of(self, section: str, key: str) -> Path:
        entry = self.entries.get((section, key))
        return entry.file if entry else self.home

    def error(self, section: str, key: str, reason: str) -> ConfigError:
        return ConfigError(reason, file=str(self.file_of(section, key)), section=section,
                           key=key)

    # ---- text: interpolation

    def _source(self, section: str, key: str) -> tuple[str, Path] | None:
        """The raw text of a key and the file it came from, falling back to its default."""
        spec = SCHEMA.get(section, {}).get(key)
        entry = self.entries.get((section, key))
        if entry and (spec is None or entry.raw or spec.kind.empty_ok):
            return entry.raw, entry.file
        if (section, key) in self.implicit:
            return self.implicit[(section, key)], self.home
        if spec is not None and spec.default is not None:
            return spec.default, self.home
        return None

    def text(self, section: str, key: str, stack: tuple[Ref, ...] = ()) -> str | None:
        """The key's text with every $(section:key) replaced; None when unset."""
        ref = (section, key)
        if ref in self._text:
            return self._text[ref]
        source = self._source(section, key)
        if source is None:
            return None
        raw, file = source
        stack = (*stack, ref)
        where = {"file": str(file), "section": section, "key": key}
        if len(stack) > MAX_REFERENCE_DEPTH:
            raise ConfigError(f"references nested more than {MAX_REFERENCE_DEPTH} deep ("
                              + " -> ".join(f"$({s}:{k})" for s, k in stack[:3])
                              + " -> ...); refer to the value more directly", **where)

        def replace(m: re.Match[str]) -> str:
            target = _parse_reference(m.group(1))
            if not m.group(2) or target is None:
                raise ConfigError(f"malformed reference {show(m.group(0))} (write"
                                  " $(section:key))", **where)
            if target in stack:
                loop = (*stack[stack.index(target):], target)
                raise ConfigError("interpolation cycle: " + " -> ".join(
                    f"$({s}:{k})" for s, k in loop), **where)
            value = self.text(*target, stack=stack)
            if value is None:
                raise ConfigError(f"$({show(target[0], 40)[1:-1]}:{show(target[1], 40)[1:-1]})"
                                  " refers to a key that is not set"
                                  + self._ref_hint(*target), **where)
            if len(value) > MAX_VALUE_CHARS:
                raise ConfigError(f"longer than {MAX_VALUE_CHARS} characters once"
                                  " $(section:key) references are replaced", **where)
            return value

        result = _REFERENCE.sub(replace, raw)
        if len(result) > MAX_VALUE_CHARS:
            raise ConfigError(f"longer than {MAX_VALUE_CHARS} characters once $(section:key)"
                              " references are replaced", **where)
        self._text[ref] = result
        return result

    def _ref_hint(self, section: str, key: str) -> str:
        keys = [k for s, k in self.entries if s == section]
        return _did_you_mean(key, keys + list(SCHEMA.get(section, {})))

    # ---- values: types

    def value(self, section: str, key: str) -> object:
        """The key's value parsed by its schema type; None when unset and optional."""
        ref = (section, key)
        if ref not in self._values:
            self.last = ref
            self._values[ref] = self._parse(section, key)
        return self._values[ref]

    def _parse(self, section: str, key: str) -> object:
        spec = SCHEMA[section][key]
        text = self.text(section, key)
        if text is None:
            if spec.required:
                raise self.error(section, key, f"is required ({spec.doc})")
            return None
        try:
            return spec.kind.parse(text)
        except Invalid as err:
            raise self.error(section, key, str(err)) from None
        except _UNFORESEEN as err:  # a type's own check missed it: still a config error
            raise self.error(section, key, _unforeseen(err, text)) from None

    def validate(self, sections: Iterable[str]) -> None:
        """Parse every key of *sections*: written ones first, in schema order."""
        wanted = [(s, k) for s in sections for k, spec in SCHEMA[s].items()
                  if not spec.ignored and not spec.refused]
        for ref in sorted(wanted, key=lambda r: r not in self.entries):
            self.value(*ref)

    def get(self, section: str, key: str, typ: type[T]) -> T:
        value = self.value(section, key)
        if not isinstance(value, typ):
            raise TypeError(f"[{section}] {key}: {value!r} is not {typ.__name__}")
        return value

    def opt(self, section: str, key: str, typ: type[T]) -> T | None:
        return None if self.value(section, key) is None else self.get(section, key, typ)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _GlobalSetup:
    path: Path
    layer: _Layer
    implicit: Mapping[Ref, str]
    refs: set[Ref]
    config: GlobalConfig
    warnings: list[str]


# What a value that no check foresaw may raise while it is parsed or used to build the
# configuration.  It is still the configuration's fault, so it becomes a ConfigError
# (exit 78, one line) naming the key read last, never an internal error (exit 70).
_UNFORESEEN = (ValueError, ArithmeticError, RecursionError, OSError, LookupError,
               MemoryError)


def _unforeseen(err: BaseException, text: str | None = None) -> str:
    detail = " ".join(str(err).split())[:200]
    value = f" {show(text)}" if text is not None else ""
    return f"cannot use the value{value} ({type(err).__name__}: {detail})"


@contextlib.contextmanager
def _net(view: _View | None, file: Path) -> Iterator[None]:
    """Turn what escaped every check while *view* was built into a ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except _UNFORESEEN as err:
        if view is not None and view.last is not None:
            raise view.error(*view.last, _unforeseen(err)) from None
        raise ConfigError(_unforeseen(err), file=str(file)) from None


def _open_global(path: Path | None) -> _GlobalSetup:
    gpath = default_config_path(path).absolute()
    with _net(None, gpath):
        return _open_global_file(gpath)


def _open_global_file(gpath: Path) -> _GlobalSetup:
    layer = _read_layer(gpath)
    implicit = {
        ("global", "config_dir"): str(gpath.parent),
        ("global", "runtime_dir"): _runtime_directory(),
        ("email", "from"): f"mstm@{socket.gethostname()}",
    }
    view = _View([layer], gpath, implicit)
    with _net(view, gpath):
        config_dir = view.get("global", "config_dir", Path)
        names = view.get("global", "data_stream_list", tuple)
        # Keys used only through references are allowed "anywhere" they are referenced, so
        # the other stream files count too; one that cannot be read adds nothing here.
        refs = _references([layer, *_readable_stream_layers(config_dir, names, gpath)])
        warnings = _check_structure(layer, refs)
        view.validate(GLOBAL_SECTIONS)
        config = _build_global(view, gpath)
    return _GlobalSetup(gpath, layer, implicit, refs, config, warnings)


def _runtime_directory() -> str:
    # systemd's RuntimeDirectory= may list several, separated by ':'
    first = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return first or str(DEFAULT_RUNTIME_DIR)


def _readable_stream_layers(config_dir: Path, names: Iterable[str],
                            global_file: Path) -> list[_Layer]:
    layers = []
    for name in names:
        found = _stream_file(config_dir, name, global_file)
        if found:
            try:
                layers.append(_read_layer(found))
            except ConfigError:
                pass
    return layers


def _stream_file(config_dir: Path, name: str, global_file: Path) -> Path | None:
    for pattern in STREAM_FILE_NAMES:
        candidate = config_dir / pattern.format(name)
        # lexists: a dangling link or a symlink loop is found, then reported when read
        if os.path.lexists(candidate) and (
                os.path.realpath(candidate) != os.path.realpath(global_file)):
            return candidate
    return None


def _build_global(v: _View, path: Path) -> GlobalConfig:
    return GlobalConfig(
        path=path,
        config_dir=v.get("global", "config_dir", Path),
        data_stream_list=v.get("global", "data_stream_list", tuple),
        general_poll_interval=v.get("global", "general_poll_interval", float),
        spool_base_dir=v.get("global", "spool_base_dir", Path),
        runtime_dir=v.get("global", "runtime_dir", Path),
        log_level=v.get("logging", "log_level", str),
        disk_space_monitor=_build_disk_space(v),
        email=_build_email(v),
    )


def _build_disk_space(v: _View) -> DiskSpaceConfig:
    s = "disk_space_monitor"
    good, low, vlow = (v.get(s, k, str) for k in ("level_good", "level_low", "level_vlow"))
    for (lower_key, lower), (upper_key, upper) in ((("level_low", low), ("level_good", good)),
                                                   (("level_vlow", vlow), ("level_low", low))):
        (lo, lo_pct), (hi, hi_pct) = level_value(lower), level_value(upper)
        if lo_pct == hi_pct and lo >= hi:
            # blame the one written in a file (the other may be a default)
            key = lower_key if (s, lower_key) in v.entries else upper_key
            raise v.error(s, key, f"{lower_key} ({lower}) must be below {upper_key} ({upper})")
    return DiskSpaceConfig(
        base_priority=v.get(s, "base_priority", int),
        level_good=good,
        level_low=low,
        level_vlow=vlow,
        poll_interval=v.get(s, "poll_interval", float),
        hysteresis=v.get(s, "hysteresis", str),
    )


def _build_email(v: _View) -> EmailConfig:
    s = "email"
    if v.get(s, "starttls", bool) and v.get(s, "ssl", bool):
        raise v.error(s, "ssl", "starttls and ssl cannot both be on; choose one")
    username = v.opt(s, "username", str)
    return EmailConfig(
        sender=v.get(s, "from", str),
        recipient=v.get(s, "recipient", tuple),
        subject=v.get(s, "subject", str),
        smarthost=v.get(s, "smarthost", str),
        port=v.get(s, "port", int),
        threshold=v.get(s, "threshold", str),
        starttls=v.get(s, "starttls", bool),
        ssl=v.get(s, "ssl", bool),
        username=username or None,
        password_file=_secret_file(v, s, "password_file", mailer=True),
        email_timer=v.get("logging", "email_timer", float),
        password_credential=v.get(s, "password_credential", str),
        ca_file=v.opt(s, "ca_file", Path),
        timeout=v.get(s, "timeout", float),
        template_dir=v.opt(s, "template_dir", Path),
        state_dir=v.opt(s, "state_dir", Path),
    )


def _load_stream(setup: _GlobalSetup, name: str,
                 role: str = "send") -> tuple[StreamConfig, list[str]]:
    if role not in ("send", "receive"):
        raise ValueError(f"unknown role {role!r}")
    listed = setup.config.data_stream_list
    if name not in listed:
        raise ConfigError(f"stream {name!r} is not listed (listed: "
                          f"{', '.join(listed) or 'none'})", file=str(setup.path),
                          section="global", key="data_stream_list")
    config_dir = setup.config.config_dir
    spath = _stream_file(config_dir, name, setup.path)
    if spath is None:
        looked = ", ".join(p.format(name) for p in STREAM_FILE_NAMES)
        raise ConfigError(f"no file for stream {name!r} in {config_dir} (looked for {looked})",
                          file=str(setup.path), section="global", key="data_stream_list")
    layer = _read_layer(spath)
    warnings = _check_structure(layer, setup.refs)
    implicit = {**setup.implicit, ("data_stream", "name"): name}
    view = _View([setup.layer, layer], spath, implicit)
    with _net(view, spath):
        # role "receive" (mstm-receive): [outgoing] may be absent; what is written is
        # checked.  A pull stream needs only target_host (and port) of [outgoing]: checked
        # when built.
        pull = view.get("data_stream", "direction", str) == "pull"
        view.validate(SCHEMA if role == "send" and not pull
                      else [s for s in SCHEMA if s != "outgoing"])
        if role == "receive" or pull:
            for key, spec in SCHEMA["outgoing"].items():
                if ("outgoing", key) in view.entries and not (spec.ignored or spec.refused):
                    view.value("outgoing", key)
        return _build_stream(view, name, setup.path, spath, role), warnings


def _build_stream(v: _View, name: str, global_file: Path, stream_file: Path,
                  role: str = "send") -> StreamConfig:
    s = "data_stream"
    if v.get(s, "name", str) != name:
        raise v.error(s, "name", f"{v.get(s, 'name', str)!r} differs from the stream's name"
                      f" {name!r} in data_stream_list")
    directory = _check_directory(v, v.get(s, "directory", Path))
    if role == "send" and v.get(s, "direction", str) == "push":
        _check_no_overlap(v, directory)
    return StreamConfig(
        name=name,
        global_file=global_file,
        stream_file=stream_file,
        directory=directory,
        transfer_unit=v.get(s, "transfer_unit", str),
        status=v.get(s, "status", str),
        priority=v.get(s, "priority", int),
        deletion_enabled=v.get(s, "deletion_enabled", bool),
        delete_undelivered=v.get(s, "delete_undelivered", bool),
        spool_dir=_check_spool_dir(v, directory) if role == "send"
        else v.get(s, "spool_dir", Path),
        settle_seconds=v.get(s, "settle_seconds", float),
        ignore_patterns=v.get(s, "ignore_patterns", tuple),
        ready_marker=v.opt(s, "ready_marker", str),
        follow_symlinks=v.get(s, "follow_symlinks", bool),
        poll_interval=v.get(s, "poll_interval", float),
        log_level=v.get("logging", "log_level", str),
        outgoing=_pull_outgoing(v) if v.get(s, "direction", str) == "pull"
        else _build_outgoing(v) if role == "send" else _receive_outgoing(v),
        rsync_ssh=_build_rsync_ssh(v),
        incoming=_build_incoming(v),
        runtime_dir=v.get("global", "runtime_dir", Path),
        rsync_native=_build_rsync_native(v),
        sftp=_build_sftp(v),
        ftp=_build_ftp(v),
        direction=v.get(s, "direction", str),
        pull=_build_pull(v),
    )


def _check_no_overlap(v: _View, directory: Path) -> None:
    """A local target may not lie inside the stream directory, nor contain it: a
    published file would be the stream's own source (the next scan sends it again, and a
    rename into place could replace a source that was never sent)."""
    if v.opt("outgoing", "transfer_protocol", str) != "local":
        return
    target = v.opt("outgoing", "target_dir", str)
    if not target:
        return
    real_dir = os.path.realpath(directory)
    real_target = os.path.realpath(target)
    inside = os.path.commonpath([real_dir, real_target])
    if inside in (real_dir, real_target):
        raise v.error("outgoing", "target_dir",
                      f"{target} and the stream directory {directory} lie one inside the "
                      f"other; a local target must be elsewhere")


def _check_directory(v: _View, directory: Path) -> Path:
    try:
        st = os.stat(directory)
    except OSError as err:
        raise v.error("data_stream", "directory", f"{directory}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise v.error("data_stream", "directory", f"{directory}: not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise v.error("data_stream", "directory",
                      f"{directory}: not readable and searchable by uid {os.geteuid()}")
    return directory


def _check_spool_dir(v: _View, directory: Path) -> Path:
    spool = v.get("data_stream", "spool_dir", Path)
    real_spool, real_dir = Path(os.path.realpath(spool)), Path(os.path.realpath(directory))
    if real_spool.is_relative_to(real_dir):
        raise v.error("data_stream", "spool_dir",
                      f"{spool} is inside the stream's directory {directory}; put it elsewhere")
    if not os.path.isdir(spool.parent):
        raise v.error("data_stream", "spool_dir",
                      f"its parent directory {spool.parent} does not exist")
    return spool


def _build_outgoing(v: _View) -> OutgoingConfig:
    s = "outgoing"
    protocol = v.get(s, "transfer_protocol", str)
    host = v.opt(s, "target_host", str)
    if host is None and protocol != "local":
        raise v.error(s, "target_host", "is required (the host to send to)")
    backoff, backoff_max = v.get(s, "retry_backoff", float), v.get(s, "retry_backoff_max", float)
    if backoff_max < backoff:
        raise v.error(s, "retry_backoff_max",
                      f"{backoff_max:g} s is less than retry_backoff ({backoff:g} s)")
    return OutgoingConfig(
        target_host=host or "",
        target_port=v.opt(s, "target_port", int) or DEFAULT_PORTS[protocol],
        target_dir=v.get(s, "target_dir", str),
        transfer_protocol=protocol,
        transfer_mode=_transfer_mode(v),
        target_uses_arrival_monitor=v.get(s, "target_uses_arrival_monitor", bool),
        target_incoming_dir=v.get(s, "target_incoming_dir", str),
        retry_count=v.get(s, "retry_count", int),
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        batch_max_items=v.get(s, "batch_max_items", int),
        batch_max_bytes=v.get(s, "batch_max_bytes", int),
        connect_timeout=v.get(s, "connect_timeout", float),
        stall_seconds=v.get(s, "stall_seconds", float),
        lease_seconds=v.get(s, "lease_seconds", float),
        stop_file=v.get(s, "stop_file", str),
        stop_file_poll_interval=v.get(s, "stop_file_poll_interval", float),
        bwlimit=v.get(s, "bwlimit", int),
        receipt_file_poll_count=v.get(s, "receipt_file_poll_count", int),
        receipt_file_poll_interval=v.get(s, "receipt_file_poll_interval", float),
        control_file_extension=v.get(s, "control_file_extension", str),
        receipt_file_extension=v.get(s, "receipt_file_extension", str),
        thankyou_file_extension=v.get(s, "thankyou_file_extension", str),
    )


def _receive_outgoing(v: _View) -> OutgoingConfig:
    """[outgoing] of a stream loaded by mstm-receive: complete, or with empty targets."""
    try:
        return _build_outgoing(v)
    except ConfigError:
        pass  # a receive-only stream need not say where it would send to

    def value(key: str) -> object:
        try:
            return v.value("outgoing", key)
        except ConfigError:  # required, or refers to a key that is not set
            return None

    kw = {key: value(key) for key in OutgoingConfig.__dataclass_fields__}
    for key in ("target_host", "target_dir", "transfer_mode", "target_incoming_dir"):
        kw[key] = kw[key] or ""
    kw["target_port"] = kw["target_port"] or 0
    return OutgoingConfig(**kw)  # type: ignore[arg-type]


def _transfer_mode(v: _View) -> str:
    """[outgoing] transfer_mode, else MiStaMover's [rsync_ssh] one; never a silent default."""
    mode = v.opt("outgoing", "transfer_mode", str) or v.opt("rsync_ssh", "transfer_mode", str)
    if mode is None:
        raise v.error("outgoing", "transfer_mode",
                      "is required: set move or mirror (MiStaMover defaulted to move, which"
                      " deletes the source; mstm makes you choose)")
    return mode


def _build_rsync_ssh(v: _View) -> RsyncSshConfig:
    s = "rsync_ssh"
    identity = v.opt(s, "identity_file", Path)
    if identity is not None and not (os.path.isfile(identity) and os.access(identity, os.R_OK)):
        raise v.error(s, "identity_file", f"{identity}: not a readable file")
    known_hosts = v.opt(s, "known_hosts", Path)
    if known_hosts is not None and not os.path.exists(known_hosts):
        raise v.error(s, "known_hosts", f"{known_hosts}: no such file")
    return RsyncSshConfig(
        cmd=v.get(s, "cmd", str),
        ssh_cmd=v.get(s, "ssh_cmd", str),
        username=v.opt(s, "username", str),
        identity_file=identity,
        known_hosts=known_hosts,
    )


def _readable_file(v: _View, section: str, key: str) -> Path | None:
    path = v.opt(section, key, Path)
    if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise v.error(section, key, f"{path}: not a readable file")
    return path


def _secret_file(v: _View, section: str, key: str, *, mailer: bool = False) -> Path | None:
    """A password file: a regular file of one line of text, at most MAX_SECRET_BYTES.

    Its content never appears in a message.  One trailing newline is allowed (the
    readers drop it).  For [email] (*mailer*) a file that is missing, that this user may
    not read, or that is empty is left to mstm-alert, which says so (exit 78) when it
    needs the password: the other commands load [email] too but never read it, and
    mstm-alert may get the password from its systemd credential instead.
    """
    path = v.opt(section, key, Path)
    if path is None or (mailer and not (os.path.exists(path) and os.access(path, os.R_OK))):
        return path
    where = {"file": str(v.file_of(section, key)), "section": section, "key": key}
    label = f"{path}: "
    data = _read_regular_file(path, MAX_SECRET_BYTES, label, **where)
    unshown = " (its content is not shown)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{label}not UTF-8 text{unshown}", **where) from None
    secret = text[:-1] if text.endswith("\n") else text
    if "\n" in secret:
        raise ConfigError(f"{label}holds more than one line; write the password alone on one"
                          f" line{unshown}", **where)
    if _CONTROL.search(secret):
        raise ConfigError(f"{label}holds a control character (a NUL byte, a carriage return,"
                          f" ...){unshown}", **where)
    if not secret and not mailer:
        raise ConfigError(f"{label}is empty (leave {key} unset for no password)", **where)
    return path


def _build_rsync_native(v: _View) -> RsyncNativeConfig:
    s = "rsync_native"
    module = v.opt(s, "module", str)
    if module is None and v.get("outgoing", "transfer_protocol", str) == "rsync_native":
        raise v.error(s, "module", "is required with transfer_protocol rsync_native")
    return RsyncNativeConfig(cmd=v.get(s, "cmd", str), module=module,
                             username=v.opt(s, "username", str),
                             password_file=_secret_file(v, s, "password_file"))


def _build_sftp(v: _View) -> SftpConfig:
    s = "sftp"
    known_hosts = v.opt(s, "known_hosts", Path)
    if known_hosts is not None and not os.path.exists(known_hosts):
        raise v.error(s, "known_hosts", f"{known_hosts}: no such file")
    return SftpConfig(username=v.opt(s, "username", str),
                      identity_file=_readable_file(v, s, "identity_file"),
                      known_hosts=known_hosts,
                      remote_checksum=v.get(s, "remote_checksum", bool),
                      verify_readback=v.get(s, "verify_readback", bool))


def _build_ftp(v: _View) -> FtpConfig:
    s = "ftp"
    return FtpConfig(username=v.get(s, "username", str),
                     password_file=_secret_file(v, s, "password_file"),
                     tls=v.get(s, "tls", bool) or
                     v.get("outgoing", "transfer_protocol", str) == "ftps",
                     ca_file=_readable_file(v, s, "ca_file"),
                     passive=v.get(s, "passive", bool),
                     verify_readback=v.get(s, "verify_readback", bool))


def _build_incoming(v: _View) -> IncomingConfig:
    s = "incoming"
    exts = {k: v.get(s, k, str) for k in ("control_file_extension", "receipt_file_extension",
                                          "thankyou_file_extension")}
    for key, ext in exts.items():  # each kind of handshake file must be told apart by name
        for other_key, other in exts.items():
            if key != other_key and (ext == other or ext.endswith("." + other)):
                raise v.error(s, key, f"{ext!r} cannot be told apart from {other_key}"
                              f" {other!r}; choose distinct extensions")
    return IncomingConfig(
        require_arrival_monitor=v.get(s, "require_arrival_monitor", bool),
        control_file_extension=exts["control_file_extension"],
        thankyou_file_extension=exts["thankyou_file_extension"],
        stop_file=v.get(s, "stop_file", str),
        incoming_dir=v.get(s, "incoming_dir", Path),
        receipt_file_extension=exts["receipt_file_extension"],
        overwrite=v.get(s, "overwrite", bool),
        max_control_bytes=v.get(s, "max_control_bytes", int),
        abandoned_batch_seconds=v.get(s, "abandoned_batch_seconds", float),
    )


def _pull_outgoing(v: _View) -> OutgoingConfig:
    """[outgoing] of a pull stream: target_host is the host pulled from; no target_dir."""
    s = "outgoing"
    out = _receive_outgoing(v)
    if not out.target_host:
        raise v.error(s, "target_host", "is required (the host to pull from)")
    mode = (v.opt(s, "transfer_mode", str) or v.opt("rsync_ssh", "transfer_mode", str)
            or "mirror")
    if mode == "move":
        raise v.error(s, "transfer_mode", "move is not implemented for pull streams yet; use"
                      " mirror (the remote items are never deleted)")
    if out.transfer_protocol != "rsync_ssh":
        raise v.error(s, "transfer_protocol", "pull streams work over rsync_ssh only")
    return replace(out, transfer_mode=mode,
                   target_port=out.target_port or DEFAULT_PORTS[out.transfer_protocol])


def _build_pull(v: _View) -> PullConfig:
    s = "pull"
    source_dir = v.opt(s, "source_dir", str)
    if source_dir is None and v.get("data_stream", "direction", str) == "pull":
        raise v.error(s, "source_dir", "is required for a pull stream (the remote directory"
                      " whose entries are fetched)")
    return PullConfig(
        source_dir=source_dir or "",
        item_pattern=v.get(s, "item_pattern", str),
        max_age_days=v.get(s, "max_age_days", int),
        max_tasks=v.get(s, "max_tasks", int),
        ledger=v.get(s, "ledger", Path),
        map=v.get(s, "map", tuple),
    )


def _emit(warnings: Iterable[str]) -> None:
    for message in dict.fromkeys(warnings):  # once each, in order
        log.warning("%s", message)
