"""What a stream must be able to write, and whether the sandbox it runs in lets it.

The shipped units run with ProtectSystem=strict: the whole file system is read-only but
for the paths they grant.  Which further paths a stream needs follows from its own
configuration, so it is computed here, once, for two users:

* the systemd generator (mstm.cli.generator, systemd.generator(7)) writes them into
  drop-ins of both ``mstm-stream@<name>.service`` and ``mstm-send-once@<name>.service``
  (and every stream's directory into ``mstm-diskwatch.service``), so the stream's own
  file is the one place an admin grants them;
* ``mstm-send --check`` warns when the process it runs in cannot write one of them
  (a read-only mount, as ProtectSystem= makes, or missing permission).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mstm.config import StreamConfig
from mstm.config.files import Layer, read_layer, stream_file
from mstm.config.view import View, safety_net
from mstm.errors import ConfigError

# The spool base directory the units grant themselves (ReadWritePaths=/var/spool/mstm).
UNIT_SPOOL_BASE = Path("/var/spool/mstm")

# The drop-in the generator writes.  Drop-ins apply in the order of their names, from
# every directory together: "50-" comes before `systemctl edit`'s override.conf, so an
# admin's own drop-in still has the last word (it may add paths, or reset the list with
# an empty ReadWritePaths=).
DROPIN_NAME = "50-mstm-write-paths.conf"

# A path is written into a unit file as one word: nothing that systemd would split,
# unquote or unescape.  Other paths are left to a drop-in written by hand.
_PLAIN_PATH = re.compile(r"^/[^\s\"'\\;]*$")
_SUBSTITUTION = re.compile(r"[\\$(){}\[\]*?+|^]")


@dataclass(frozen=True)
class WritePath:
    path: Path
    why: str  # e.g. "[data_stream] directory (move mode deletes delivered sources)"


@dataclass(frozen=True)
class Declared:
    """What a stream's files say about the paths it writes: read as written, with none of
    the checks that look at the file system (the generator runs at boot, maybe before the
    stream's file system is mounted, and must grant the path all the same)."""

    name: str
    stream_file: Path
    direction: str
    transfer_mode: str | None
    directory: Path
    spool_dir: Path
    pull_map: tuple[tuple[str, str], ...] = ()
    ledger: Path | None = None

    @classmethod
    def of(cls, cfg: StreamConfig) -> Declared:
        return cls(cfg.name, cfg.stream_file, cfg.direction, cfg.outgoing.transfer_mode,
                   cfg.directory, cfg.spool_dir, cfg.pull.map, cfg.pull.ledger)


def declared_streams(config_path: Path) -> tuple[list[Declared], list[str]]:
    """Every stream of the global file at *config_path*, and one problem line for each
    stream that could not be read (a ConfigError for the global file itself)."""
    gpath = config_path.absolute()
    glayer = read_layer(gpath)
    implicit = {("global", "config_dir"): str(gpath.parent),
                ("global", "runtime_dir"): "/run/mstm", ("email", "from"): "mstm@localhost"}
    gview = View([glayer], gpath, implicit)
    with safety_net(gview, gpath):
        config_dir = gview.get("global", "config_dir", Path)
        names = gview.get("global", "data_stream_list", tuple)
    found, problems = [], []
    for name in names:
        try:
            found.append(_declared(glayer, gpath, config_dir, name, implicit))
        except ConfigError as err:
            problems.append(f"stream {name}: {err.message}")
    return found, problems


def _declared(glayer: Layer, gpath: Path, config_dir: Path, name: str,
              implicit: dict[tuple[str, str], str]) -> Declared:
    spath = stream_file(config_dir, name, gpath)
    if spath is None:
        raise ConfigError(f"no file for stream {name!r} in {config_dir}", file=str(gpath))
    view = View([glayer, read_layer(spath)], spath,
                {**implicit, ("data_stream", "name"): name})
    with safety_net(view, spath):
        direction = view.get("data_stream", "direction", str)
        pull = direction == "pull"
        return Declared(
            name, spath, direction,
            None if pull else view.opt("outgoing", "transfer_mode", str),
            view.get("data_stream", "directory", Path),
            view.get("data_stream", "spool_dir", Path),
            view.get("pull", "map", tuple) if pull else (),
            view.opt("pull", "ledger", Path) if pull else None)


def write_paths(cfg: Declared) -> list[WritePath]:
    """The paths *cfg*'s sender must write, beyond what the units grant themselves."""
    out: list[WritePath] = []
    if cfg.direction == "pull":
        out.append(WritePath(cfg.directory, "[data_stream] directory (pull: the local target)"))
        for _pattern, dest in cfg.pull_map:
            fixed = _fixed_prefix(dest)
            if fixed is not None:
                out.append(WritePath(fixed, "[pull] map (a destination outside directory)"))
        if cfg.ledger is not None:
            out.append(WritePath(cfg.ledger.parent, "[pull] ledger"))
    elif cfg.transfer_mode == "move":
        out.append(WritePath(cfg.directory,
                             "[data_stream] directory (move mode deletes delivered sources)"))
    if not _below(cfg.spool_dir, UNIT_SPOOL_BASE):
        out.append(WritePath(cfg.spool_dir, "[data_stream] spool_dir"))
    return _unique(out)


def _fixed_prefix(dest: str) -> Path | None:
    """The leading directories of an absolute map destination before any regex
    substitution (``\\1``, ``\\g<name>``); None for a relative one (under directory)."""
    if not dest.startswith("/"):
        return None
    fixed: list[str] = []
    for part in dest.split("/")[1:]:
        if not part or _SUBSTITUTION.search(part):
            break
        fixed.append(part)
    return Path("/", *fixed) if fixed else None


def _below(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _unique(paths: list[WritePath]) -> list[WritePath]:
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p.path not in seen:
            seen.add(p.path)
            out.append(p)
    return out


def unit_line(path: Path) -> str | None:
    """``ReadWritePaths=-PATH`` for a unit file, or None if *path* cannot be written as
    one plain word.  The "-": a path that does not exist (yet) does not stop the unit
    from starting; mstm itself then says what is missing."""
    text = str(path)
    if not _PLAIN_PATH.match(text):
        return None
    return "ReadWritePaths=-" + text.replace("%", "%%")


def cannot_write(path: Path) -> str | None:
    """Why this process cannot create and delete entries in directory *path*, or None.

    A read-only mount (ProtectSystem=, ReadOnlyPaths=, a read-only NFS export) is
    reported as such, since it holds for root too; then plain permissions.  A path
    that does not exist is not this check's business (--check's own checks say so).
    """
    try:
        if not path.is_dir():
            return None
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only mount here"
    except OSError:
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return f"this user (uid {os.geteuid()}) may not write it"
    return None


def sandbox_warnings(cfg: StreamConfig) -> list[str]:
    """One line for each path *cfg* must write that this process cannot (--check)."""
    out = []
    for wp in write_paths(Declared.of(cfg)):
        why = cannot_write(wp.path)
        if why is None:
            continue
        out.append(
            f"{cfg.name}: cannot write {wp.path}: {why}; it is {wp.why}.  The units get"
            f" it from mstm-generator: run"
            f" 'systemctl daemon-reload' after changing {cfg.stream_file}, and see it with"
            f" 'systemctl cat mstm-stream@{cfg.name}'; elsewhere grant it yourself:"
            f" ReadWritePaths={wp.path} in a drop-in (systemctl edit mstm-stream@{cfg.name}"
            f" and mstm-send-once@{cfg.name}), or make it writable for this user.")
    return out
