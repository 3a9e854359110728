"""The kinds of value a key may hold, and how the text of each is checked and read.

A :class:`Kind` turns the text written for a key into its value (``parse``) or raises
:class:`Invalid` with the reason shown to the user, and says in a few words what it
expects (``describe``: used in messages and in mstm.conf(5)).  The schema
(mstm.config.schema) gives each key its kind.

Every value is bounded when it is loaded, so that nothing later (time.sleep, select,
threading waits, timedelta, a read of that many bytes) can overflow or wait for ever on
a value the file allowed.  The limits on values are below (those on files and
references are in files.py, view.py and build.py); conf/global.ini and mstm.conf(5)
state them.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

MAX_SECONDS = 365 * 86400  # the longest duration: 1 year
MAX_INT = 10**9  # an integer with no tighter bound of its own
MAX_SIZE = 1 << 50  # 1 PiB (1024T)
MAX_MEGABYTES = 10**12  # a free-space level: 10^12 MB (1 EB)
MAX_STREAM_NAME = 100  # characters (a unit instance name and a file name)
MAX_PATH_BYTES = 4095  # PATH_MAX less its NUL
MAX_NAME_BYTES = 255  # NAME_MAX

STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a control character (refused in most values)


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


def did_you_mean(word: str, candidates: Iterable[str], *, fold: bool = False) -> str:
    """" (did you mean 'x'?)" with the candidate closest to *word*, or "" if none is close.

    *fold*: compare without regard to case.
    """
    options = {c.lower() if fold else c: c for c in candidates}
    close = difflib.get_close_matches(word.lower() if fold else word, list(options), n=1)
    return f" (did you mean {options[close[0]]!r}?)" if close else ""


def _no_controls(text: str, what: str = "control characters") -> None:
    m = CONTROL.search(text)
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
        if text.startswith("-") or any(c.isspace() for c in text) or CONTROL.search(text):
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


_SECONDS = re.compile(r"([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([smhd]?)", re.IGNORECASE)
_SECONDS_PER = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Seconds(Kind):
    """A duration: a number of seconds, or with a suffix s, m, h or d ("90s", "5m", "30d")."""

    min: float = 0.0
    positive: bool = False  # must be more than min, not just at least
    max: float = MAX_SECONDS
    empty_ok = False

    def describe(self) -> str:
        bound = "more than" if self.positive else "at least"
        return (f"a duration of {bound} {self.min:g} s and at most {self._most()}"
                " (e.g. 30, 90s, 5m, 1h, 30d)")

    def _most(self) -> str:
        return "1 year" if self.max == MAX_SECONDS else f"{self.max:g} s"

    def parse(self, text: str) -> float:
        m = _SECONDS.fullmatch(text)
        if not m:
            raise self.wrong(text)
        value = float(m.group(1)) * _SECONDS_PER[m.group(2).lower()]
        if value < self.min or (self.positive and value == self.min):
            raise self.wrong(text)
        if value > self.max:
            raise Invalid(f"{show(text)} is too long: at most {self._most()} ({self.max:g} s)")
        return value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class Bool(Kind):
    """true or false, or another of their usual spellings."""

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
        raise Invalid(f"expected {self.describe()}, got {show(text)}" + did_you_mean(
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
    """The list of streams: distinct names, each fit for a unit instance and a file name."""

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
