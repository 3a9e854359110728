"""The merged view: the files' raw texts read as typed values, with references replaced.

:class:`View` lays the stream file over the global file key by key, falls back to the
schema's defaults, replaces every ``$(section:key)`` and parses the result by the key's
kind.  Every problem is a ConfigError that names the file where the value was written
(or the file where a missing key belongs), its section and key.  :func:`safety_net`
turns what no check foresaw into such an error too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mstm.config.files import REFERENCE, Layer, parse_reference
from mstm.config.kinds import Invalid, did_you_mean, show
from mstm.config.schema import SCHEMA, Ref
from mstm.errors import ConfigError

MAX_REFERENCE_DEPTH = 32  # $(section:key) nested this deep at most
MAX_VALUE_CHARS = 65536  # a value after every $(section:key) is replaced

T = TypeVar("T")


# What a value that no check foresaw may raise while it is parsed or used to build the
# configuration.  It is still the configuration's fault, so it becomes a ConfigError
# (exit 78, one line) naming the key read last, never an internal error (exit 70).
_UNFORESEEN = (ValueError, ArithmeticError, RecursionError, OSError, LookupError,
               MemoryError)


def _unforeseen(err: BaseException, text: str | None = None) -> str:
    detail = " ".join(str(err).split())[:200]
    value = f" {show(text)}" if text is not None else ""
    return f"cannot use the value{value} ({type(err).__name__}: {detail})"


@dataclass(frozen=True)
class _Entry:
    """A value as written (before references are replaced), and the file it is in."""

    raw: str
    file: Path


class View:
    """Global and (optionally) stream layers merged key by key, read through SCHEMA.

    *home* is the file a missing key should be written in (the stream file when there is
    one); *implicit* holds the defaults that are computed, not written in SCHEMA (the
    global file's directory for config_dir, the stream's own name for name, ...).
    """

    def __init__(self, layers: Iterable[Layer], home: Path, implicit: Mapping[Ref, str]) -> None:
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
        """The file that sets [*section*] *key*, else the file where it belongs (home)."""
        entry = self.entries.get((section, key))
        return entry.file if entry else self.home

    def error(self, section: str, key: str, reason: str) -> ConfigError:
        """A ConfigError about [*section*] *key*, naming the file of :meth:`file_of`."""
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
            target = parse_reference(m.group(1))
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

        result = REFERENCE.sub(replace, raw)
        if len(result) > MAX_VALUE_CHARS:
            raise ConfigError(f"longer than {MAX_VALUE_CHARS} characters once $(section:key)"
                              " references are replaced", **where)
        self._text[ref] = result
        return result

    def _ref_hint(self, section: str, key: str) -> str:
        keys = [k for s, k in self.entries if s == section]
        return did_you_mean(key, keys + list(SCHEMA.get(section, {})))

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
        """The key's value, which its kind makes a *typ* (a TypeError is a bug here)."""
        value = self.value(section, key)
        if not isinstance(value, typ):
            raise TypeError(f"[{section}] {key}: {value!r} is not {typ.__name__}")
        return value

    def opt(self, section: str, key: str, typ: type[T]) -> T | None:
        """As :meth:`get`, or None when the key is unset and optional."""
        return None if self.value(section, key) is None else self.get(section, key, typ)


@contextlib.contextmanager
def safety_net(view: View | None, file: Path) -> Iterator[None]:
    """Turn what escaped every check while *view* was built into a ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except _UNFORESEEN as err:
        if view is not None and view.last is not None:
            raise view.error(*view.last, _unforeseen(err)) from None
        raise ConfigError(_unforeseen(err), file=str(file)) from None
