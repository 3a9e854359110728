"""Reading the configuration files and checking what they are made of.

A file is read into a :class:`Layer` (section -> key -> raw text) or refused with one
clear reason: not a regular file, too large, not UTF-8, a syntax error (with its line).
:func:`check_structure` then refuses unknown sections and keys, with a "did you mean"
hint, and keys that are never accepted, and warns of the MiStaMover keys that are
ignored.  A key the schema does not know is allowed where some file refers to it with
``$(section:key)``: a variable of the user's own.  A stream's file is found in
``config_dir`` by :func:`stream_file`.
"""

from __future__ import annotations

import configparser
import difflib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mstm.config.kinds import did_you_mean
from mstm.config.schema import SCHEMA, Ref
from mstm.errors import ConfigError

# Where a stream's file is looked for in config_dir, first match wins (MiStaMover names last).
STREAM_FILE_NAMES = ("{}.ini", "ds_{}.ini", "dataset_{}.ini")
MAX_FILE_BYTES = 1 << 20  # a configuration file
REFERENCE = re.compile(r"\$\(([^)]*)(\)?)")
# configparser's DEFAULT section would leak its keys into every section; a name that no
# header line can spell turns that feature off, so "[DEFAULT]" is just an unknown section.
_NO_DEFAULT_SECTION = "\n"


@dataclass(frozen=True)
class Layer:
    """One parsed file: section -> key -> raw text."""

    path: Path
    sections: dict[str, dict[str, str]]


def read_layer(path: Path) -> Layer:
    """The file at *path*, parsed; a ConfigError if it cannot be read or parsed."""
    text = _read_text(path)
    parser = configparser.ConfigParser(
        interpolation=None, default_section=_NO_DEFAULT_SECTION, strict=True)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as err:
        raise _syntax_error(err, path, text.splitlines()) from None
    return Layer(path, {s: dict(parser[s]) for s in parser.sections()})


def _read_text(path: Path) -> str:
    data = read_regular_file(path, MAX_FILE_BYTES, "", file=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"line {line}: not valid UTF-8", file=str(path)) from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ConfigError(f"line {line}: a NUL byte (not a text file)", file=str(path))
    return text


def read_regular_file(path: Path, limit: int, label: str, **where: str) -> bytes:
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


def references(layers: Iterable[Layer]) -> set[Ref]:
    """Every well-formed $(section:key) written in *layers*."""
    refs: set[Ref] = set()
    for layer in layers:
        for keys in layer.sections.values():
            for raw in keys.values():
                for m in REFERENCE.finditer(raw):
                    ref = parse_reference(m.group(1))
                    if ref:
                        refs.add(ref)
    return refs


def parse_reference(body: str) -> Ref | None:
    """(section, key) of the text between "$(" and ")", or None when it is not one."""
    section, colon, key = body.partition(":")
    section, key = section.strip(), key.strip().lower()
    return (section, key) if colon and section and key else None


def check_structure(layer: Layer, refs: set[Ref]) -> list[str]:
    """Unknown sections and keys, refused keys; returns warnings for ignored keys."""
    warnings: list[str] = []
    for section, keys in layer.sections.items():
        known = SCHEMA.get(section)
        if known is None and (not keys or any((section, k) not in refs for k in keys)):
            raise ConfigError("unknown section" + did_you_mean(section, SCHEMA),
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
    hint = did_you_mean(key, [k for k, spec in known.items() if not spec.refused])
    homes = [s for s, keys in SCHEMA.items() if key in keys]
    near = difflib.get_close_matches(key, [k for s, k in refs if s == section], n=1)
    if not hint and homes:
        hint = f" (it belongs in [{homes[0]}])"
    elif not hint and near:  # a variable whose reference is misspelt
        hint = f" (and nothing refers to it; is $({section}:{near[0]}) a misspelling?)"
    return "unknown key" + hint


def stream_file(config_dir: Path, name: str, global_file: Path) -> Path | None:
    """The file of stream *name* in *config_dir* (``STREAM_FILE_NAMES``), or None."""
    for pattern in STREAM_FILE_NAMES:
        candidate = config_dir / pattern.format(name)
        # lexists: a dangling link or a symlink loop is found, then reported when read
        if os.path.lexists(candidate) and (
                os.path.realpath(candidate) != os.path.realpath(global_file)):
            return candidate
    return None


def readable_stream_layers(config_dir: Path, names: Iterable[str],
                           global_file: Path) -> list[Layer]:
    """The files of the streams *names* that can be read; the others are left out."""
    layers = []
    for name in names:
        found = stream_file(config_dir, name, global_file)
        if found:
            try:
                layers.append(read_layer(found))
            except ConfigError:
                pass
    return layers
