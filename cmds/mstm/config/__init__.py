"""Configuration: the global file and one file per stream, validated into frozen dataclasses.

MiStaMover's layout and vocabulary (docs/design.md, "Configuration"): a global INI file
names the streams in ``[global] data_stream_list``; each stream has its own file in
``config_dir`` whose values override the global file's, key by key within each section;
``$(section:key)`` refers to another value of the merged view.

Every problem raises :class:`mstm.errors.ConfigError` naming the file where the offending
value was written, its section and key, and a short reason; the first problem found wins.
Nothing here looks at file modes (MiStaMover skipped streams whose file was not 0400).

This module holds the public API (``load_global``, ``load_stream``, ``load_all``,
``default_config_path``) and the order of the steps; each step lives in its own module:

* ``kinds.py``  -- the kinds of value (:class:`Kind`: Text, Word, Int, Seconds, Size, ...),
  how each is checked and read, and the limits every value is held to;
* ``schema.py`` -- ``SCHEMA``, the single source of every key: its kind, default and
  meaning (it drives parsing, validation, the "did you mean" hints and mstm.conf(5));
* ``files.py``  -- reading a file into a layer, its syntax errors, unknown and refused
  keys, ``$(section:key)`` references, where a stream's file is;
* ``view.py``   -- the merged view: layers over defaults, references replaced, values
  parsed by their kind;
* ``build.py``  -- the dataclasses built from the view, with the checks that span keys;
* ``model.py``  -- the dataclasses themselves: :class:`GlobalConfig`, :class:`StreamConfig`
  and the sections they hold.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mstm.config.build import build_global, build_stream
from mstm.config.files import (
    STREAM_FILE_NAMES,
    Layer,
    check_structure,
    read_layer,
    readable_stream_layers,
    references,
    stream_file,
)
from mstm.config.kinds import (
    MAX_SECONDS,
    MAX_SIZE,
    Int,
    Kind,
    Seconds,
    Size,
    level_value,
    show,
)
from mstm.config.model import (
    DiskSpaceConfig,
    EmailConfig,
    FtpConfig,
    GlobalConfig,
    IncomingConfig,
    OutgoingConfig,
    PullConfig,
    RsyncNativeConfig,
    RsyncSshConfig,
    SftpConfig,
    StreamConfig,
)
from mstm.config.schema import GLOBAL_SECTIONS, SCHEMA, Key, Ref
from mstm.config.view import View, safety_net
from mstm.errors import ConfigError

__all__ = [
    "GLOBAL_SECTIONS", "MAX_SECONDS", "MAX_SIZE", "SCHEMA", "DiskSpaceConfig", "EmailConfig",
    "FtpConfig", "GlobalConfig", "IncomingConfig", "Int", "Key", "Kind",
    "OutgoingConfig", "PullConfig", "RsyncNativeConfig", "RsyncSshConfig", "Seconds",
    "SftpConfig", "Size", "StreamConfig", "default_config_path", "level_value", "load_all",
    "load_global", "load_stream", "show",
]

log = logging.getLogger("mstm.config")

DEFAULT_CONFIG = Path("/etc/mstm/global.ini")
DEFAULT_RUNTIME_DIR = Path("/run/mstm")


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


@dataclass(frozen=True)
class _GlobalSetup:
    """The global file, read and checked: what loading each stream starts from."""

    path: Path
    layer: Layer
    implicit: Mapping[Ref, str]
    refs: set[Ref]
    config: GlobalConfig
    warnings: list[str]


def _open_global(path: Path | None) -> _GlobalSetup:
    gpath = default_config_path(path).absolute()
    with safety_net(None, gpath):
        return _open_global_file(gpath)


def _open_global_file(gpath: Path) -> _GlobalSetup:
    layer = read_layer(gpath)
    implicit = {
        ("global", "config_dir"): str(gpath.parent),
        ("global", "runtime_dir"): _runtime_directory(),
        # $MSTM_METRICS_DIR, when set, replaces the default (empty: no metrics files)
        ("global", "metrics_dir"): os.environ.get("MSTM_METRICS_DIR",
                                                  SCHEMA["global"]["metrics_dir"].default or ""),
        ("email", "from"): f"mstm@{socket.gethostname()}",
    }
    view = View([layer], gpath, implicit)
    with safety_net(view, gpath):
        config_dir = view.get("global", "config_dir", Path)
        names = view.get("global", "data_stream_list", tuple)
        # Keys used only through references are allowed "anywhere" they are referenced, so
        # the other stream files count too; one that cannot be read adds nothing here.
        refs = references([layer, *readable_stream_layers(config_dir, names, gpath)])
        warnings = check_structure(layer, refs)
        view.validate(GLOBAL_SECTIONS)
        config = build_global(view, gpath)
    return _GlobalSetup(gpath, layer, implicit, refs, config, warnings)


def _runtime_directory() -> str:
    # systemd's RuntimeDirectory= may list several, separated by ':'
    first = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return first or str(DEFAULT_RUNTIME_DIR)


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
    spath = stream_file(config_dir, name, setup.path)
    if spath is None:
        looked = ", ".join(p.format(name) for p in STREAM_FILE_NAMES)
        raise ConfigError(f"no file for stream {name!r} in {config_dir} (looked for {looked})",
                          file=str(setup.path), section="global", key="data_stream_list")
    layer = read_layer(spath)
    warnings = check_structure(layer, setup.refs)
    implicit = {**setup.implicit, ("data_stream", "name"): name}
    view = View([setup.layer, layer], spath, implicit)
    with safety_net(view, spath):
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
        return build_stream(view, name, setup.path, spath, role), warnings


def _emit(warnings: Iterable[str]) -> None:
    for message in dict.fromkeys(warnings):  # once each, in order
        log.warning("%s", message)
